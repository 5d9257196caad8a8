"""Issue 6 benchmark: every 2-D toy, trained on this CPU, against the data's true entropy.

For each toy: train the built-in config (plus overrides) for ``--steps`` steps, then report
the test NLL by the exact-trace probability-flow ODE (``ODE(tol=--tol,
divergence=Exact(), integrator=Augmented())``: the augmented dopri5 solve with its
two-tolerance check, every point within ``--tol`` nats, default 1e-2; mean ± SE over
``--n-test`` held-out points), the ELBO and ScoreFlow bounds (``ELBO()``, ``ScoreFlow()``: 16
time draws per point), the true entropy H (closed form or quadrature from
``sdelab.data.toy_entropy``; pinwheel, whose density has no closed form, by the
Kozachenko–Leonenko k-NN estimator on 200,000 samples), the gap NLL − H and the training
time (process CPU time, which on one thread is the time on an idle machine, and wall time).
Then the MLP training step's throughput and achieved GFLOP/s against the measured matmul peak.

    .venv/bin/python benchmarks/bench_toys.py --steps 20000 --n-test 20000
"""

from __future__ import annotations

import argparse
import math
import platform
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch
from scipy.spatial import cKDTree
from scipy.special import digamma

from sdelab.data import TOYS, sample_toy
from sdelab.likelihood.bpd import ELBO, ODE, ScoreFlow
from sdelab.likelihood.options import Augmented, Exact
from sdelab.runs import run_likelihood
from sdelab.train.build import build_run, resolve_config
from sdelab.train.config import load_config
from sdelab.train.loop import train, train_step


def knn_entropy(x: np.ndarray, k: int = 5) -> float:
    """Kozachenko–Leonenko estimate of differential entropy (nats) from samples (N, d)."""
    n, d = x.shape
    dist, _ = cKDTree(x).query(x, k=k + 1)
    eps = dist[:, k]
    log_vd = d / 2 * math.log(math.pi) - math.lgamma(d / 2 + 1)  # log volume of the unit ball
    return float(digamma(n) - digamma(k) + log_vd + d * np.mean(np.log(eps)))


def true_entropy(name: str) -> tuple[float, str]:
    from sdelab.data import toy_entropy

    h = toy_entropy(name)
    if h is not None:
        return h, "exact/quadrature"
    x = sample_toy(name, 200_000, torch.Generator().manual_seed(123)).double().numpy()
    return knn_entropy(x), "k-NN estimate"


def matmul_peak(n: int = 1024, reps: int = 20) -> float:
    """GFLOP/s of float32 n×n matmul on this machine (best of ``reps``)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def mlp_step_flops(config) -> float:
    """FLOPs of one training step of the time-conditioned MLP: every weight is used once per
    example in the forward pass (2 FLOPs per multiply-add) and twice in the backward pass."""
    m = config.model
    w, d, e = m.width, m.dim, m.embedding_dim
    weights = d * w + m.depth * w * w + w * d + e * w + w * w * m.depth
    return 6 * weights * config.train.batch_size


def step_throughput(config, steps: int = 300) -> tuple[float, float]:
    run = build_run(resolve_config(config), Path("/tmp/sdelab_bench_throughput"))
    for _ in range(20):
        train_step(run)
    t0 = time.perf_counter()
    for _ in range(steps):
        train_step(run)
    rate = steps / (time.perf_counter() - t0)
    return rate, rate * mlp_step_flops(run.config) / 1e9


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--toys", nargs="*", default=list(TOYS))
    p.add_argument("--steps", type=int, default=20000)
    p.add_argument("--n-test", type=int, default=20000)
    p.add_argument("--tol", type=float, default=1e-2, help="ODE: per-example target in nats")
    p.add_argument("--out", default="runs/bench_toys")
    p.add_argument("overrides", nargs="*", help="config overrides for every toy")
    args = p.parse_args()

    print(
        f"# 2-D toys — {date.today()}, {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} torch threads"
    )
    print(
        f"steps={args.steps}, n_test={args.n_test}, ODE tol={args.tol:g} nats, "
        f"overrides={' '.join(args.overrides) or '(none)'}\n"
    )
    print(
        "| toy | NLL ODE (nats) | ELBO bound | ScoreFlow bound | true H | H method | "
        "NLL − H | training time |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for toy in args.toys:
        run_dir = Path(args.out) / toy
        config = load_config(
            f"toy/{toy}",
            [
                f"train.steps={args.steps}",
                "train.log_every=500",
                "train.ckpt_every=100000",
                *args.overrides,
            ],
        )
        t0, c0 = time.perf_counter(), time.process_time()
        if not run_dir.exists():
            train(config, run_dir)
        minutes = (time.perf_counter() - t0) / 60
        cpu_minutes = (time.process_time() - c0) / 60
        estimators = {
            "ode": ODE(tol=args.tol, divergence=Exact(), integrator=Augmented()),
            "elbo": ELBO(),
            "scoreflow": ScoreFlow(),
        }
        res = {
            m: run_likelihood(
                run_dir, estimator=est, n=args.n_test, progress=False, batch_size=5000
            )
            for m, est in estimators.items()
        }
        h, how = true_entropy(toy)
        ode = res["ode"]
        print(
            f"| {toy} | {ode.nll_mean:.3f} ± {ode.nll_se:.3f} | "
            f"{res['elbo'].nll_mean:.3f} ± {res['elbo'].nll_se:.3f} | "
            f"{res['scoreflow'].nll_mean:.3f} ± {res['scoreflow'].nll_se:.3f} | {h:.3f} | "
            f"{how} | {ode.nll_mean - h:+.3f} | {cpu_minutes:.1f} min CPU "
            f"({minutes:.1f} min wall) |",
            flush=True,
        )

    config = load_config("toy/checkerboard", list(args.overrides))
    peak = matmul_peak()
    rate, gflops = step_throughput(config)
    print(
        f"\nMLP training step (width {config.model.width}, depth {config.model.depth}, "
        f"batch {config.train.batch_size}): {rate:.1f} steps/s, {gflops:.1f} GFLOP/s "
        f"= {100 * gflops / peak:.0f}% of the measured float32 matmul peak "
        f"({peak:.1f} GFLOP/s, 1024×1024)."
    )


if __name__ == "__main__":
    main()
