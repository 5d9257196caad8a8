"""Benchmark: training and likelihood throughput of 1 vs 2 processes (torchrun, gloo, CPU).

Run:  .venv/bin/python benchmarks/bench_distributed.py          (prints a markdown table)

Launches itself under ``python -m torch.distributed.run --nproc_per_node N`` for N = 1, 2 on
loopback, one torch thread per process, for two models:

- the toy MLP on checkerboard (width 128, depth 3, global batch 512): training, then
  ``run_likelihood`` (exact-trace ODE, ``ODE(tol=1e-2, divergence=Exact(),
  integrator=Augmented())``: every point within 1e-2 nats) over ``--n-test`` test points in
  batches of 50, timed from a barrier to the gathered result;
- the small U-Net of ``images/digits`` (8×8 digits, global batch 128): training only.

Training examples/s is the median of the loop's own ``steps_per_s`` over the logged intervals
after the first (start-up excluded) × the global batch.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(args: argparse.Namespace) -> None:
    import torch

    from sdelab import distributed
    from sdelab.likelihood.bpd import ODE
    from sdelab.likelihood.options import Augmented, Exact
    from sdelab.runs import run_likelihood
    from sdelab.train.config import load_config
    from sdelab.train.loop import train

    torch.set_num_threads(1)
    info = distributed.init("cpu")
    batch = MODELS[args.model]["batch"]
    over = [
        f"train.steps={args.steps}",
        f"train.batch_size={batch}",
        f"train.log_every={max(args.steps // 10, 1)}",
        f"train.ckpt_every={args.steps}",
    ]
    run_dir = Path(args.out) / "run"
    train(load_config(MODELS[args.model]["config"], over), run_dir)
    distributed.barrier(info)
    result: dict = {"procs": info.world_size}
    if args.model == "mlp":
        t0 = time.perf_counter()
        ode = ODE(tol=1e-2, divergence=Exact(), integrator=Augmented())
        res = run_likelihood(run_dir, estimator=ode, n=args.n_test, batch_size=50, progress=False)
        result.update(lik_ex_s=args.n_test / (time.perf_counter() - t0), nll=res.nll_mean)
    if info.is_main:
        rates = [json.loads(line)["steps_per_s"] for line in (run_dir / "metrics.jsonl").open()]
        result["train_ex_s"] = batch * statistics.median(rates[1:])
        print("RESULT " + json.dumps(result))
    if info.enabled:
        torch.distributed.destroy_process_group()


MODELS = {
    "mlp": {"config": "checkerboard", "batch": 512},
    "unet": {"config": "images/digits", "batch": 128},
}


def launch(nproc: int, model: str, steps: int, args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nnodes=1",
            f"--nproc_per_node={nproc}",
            "--master_addr=127.0.0.1",
            f"--master_port={_free_port()}",
            __file__,
            "--worker",
            "--out",
            tmp,
            "--model",
            model,
            "--steps",
            str(steps),
            "--n-test",
            str(args.n_test),
        ]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
    line = next(line for line in out.splitlines() if line.startswith("RESULT "))
    return json.loads(line.removeprefix("RESULT "))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--model", choices=MODELS, help=argparse.SUPPRESS)
    p.add_argument("--steps", type=int, default=200, help="MLP training steps (default 200)")
    p.add_argument("--unet-steps", type=int, default=60, help="U-Net training steps (default 60)")
    p.add_argument("--n-test", type=int, default=400, help="test points (default 400)")
    args = p.parse_args()
    if args.worker:
        return worker(args)
    import torch

    rows = [launch(n, "mlp", args.steps, args) for n in (1, 2)]
    unet = [launch(n, "unet", args.unet_steps, args) for n in (1, 2)]
    print(
        f"Date: {datetime.date.today()}. Machine: {platform.machine()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__}, gloo, 1 thread per process.\n"
    )
    print(
        "| processes | train: examples/s (MLP, batch 512) | likelihood: examples/s (ODE) "
        "| test NLL |"
    )
    print("|---:|---:|---:|---:|")
    base = rows[0]
    for r in rows:
        print(
            f"| {r['procs']} | {r['train_ex_s']:.0f} ({r['train_ex_s'] / base['train_ex_s']:.2f}×) "
            f"| {r['lik_ex_s']:.1f} ({r['lik_ex_s'] / base['lik_ex_s']:.2f}×) | {r['nll']:.4f} |"
        )
    print("\n| processes | train: images/s (U-Net of images/digits, 8×8, batch 128) |")
    print("|---:|---:|")
    for r in unet:
        speed = r["train_ex_s"] / unet[0]["train_ex_s"]
        print(f"| {r['procs']} | {r['train_ex_s']:.0f} ({speed:.2f}×) |")


if __name__ == "__main__":
    main()
