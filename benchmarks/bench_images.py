"""Images (issue 7): test bits/dim after a CPU-time budget, sample grids, U-Net throughput.

    .venv/bin/python benchmarks/bench_images.py digits      # ≈ 15 CPU-min training + eval
    .venv/bin/python benchmarks/bench_images.py fashion     # Fashion-MNIST (Debian package)
    .venv/bin/python benchmarks/bench_images.py throughput  # U-Net training images/s

Every part runs one torch thread (``--threads``) and measures *CPU time* (``time.process_time``)
as well as wall time, so the numbers mean something on a machine whose cores are shared.

``digits``: trains ``images/digits`` (scikit-learn 8×8 digits, 17 levels, 1438 train / 359
test) through ``sdelab.train.train`` in stages of ``--eval-every`` steps (each stage resumes
the last), and after every stage evaluates the test set's bits/dim with uniform
dequantization: the probability-flow ODE likelihood by the Score-SDE design —
``ODE(divergence=Hutchinson(n_probes=--probes), integrator=Augmented(check=False), tol=--tol)``:
one augmented dopri5 solve with ``--probes`` Rademacher probes fixed along the path, no
two-tolerance check, ``--tol`` a per-example target in nats (default 1e-5) — and, after the
last stage, the ScoreFlow and sdeflow (ELBO) bounds (``ScoreFlow()``, ``ELBO()``: 16 time
draws per image).
The reference points on the same split are printed with it: uniform over 17 levels
log2(17) = 4.087, full-covariance Gaussian 2.956, per-pixel categorical 2.431 bpd.

``fashion``: trains ``images/fashion_mnist_small`` for ``--steps`` steps, writes a 64-sample
grid (``--grid``) and evaluates ODE bits/dim on ``--n`` test images (256 levels).

``throughput``: median images/s of the training step (forward, backward, Adam) of the
digits U-Net (8×8) and the Fashion-MNIST small U-Net (28×28), with 1 and 2 threads.
"""

from __future__ import annotations

import argparse
import datetime
import math
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from sdelab.likelihood.bpd import ELBO, ODE, Estimator, ScoreFlow
from sdelab.likelihood.options import Augmented, Hutchinson
from sdelab.runs import run_likelihood, sample_run
from sdelab.train.build import build_run, make_run_dataset
from sdelab.train.config import load_config
from sdelab.train.loop import train, train_step

REFERENCES = [
    ("uniform over 17 levels", math.log2(17)),
    ("full-covariance Gaussian", 2.956),
    ("independent per-pixel categorical", 2.431),
]


def _header(args: argparse.Namespace) -> str:
    return (
        f"Date: {datetime.date.today()}. Machine: {platform.machine()}, "
        f"torch {torch.__version__}, {args.threads} thread(s); CPU time = process time."
    )


def _train_stage(config_name: str, over: list[str], run_dir: Path, resume: bool) -> float:
    """Train (or continue) a run; returns the CPU seconds it took."""
    t0 = time.process_time()
    train(load_config(config_name, over), run_dir, resume=resume)
    return time.process_time() - t0


def _estimator(method: str, args: argparse.Namespace) -> Estimator:
    """``"ode"``: the Score-SDE design (one augmented solve, ``--probes`` probes fixed along
    the path, ``--tol`` nats); ``"scoreflow"``/``"elbo"``: the bounds at their defaults."""
    if method == "ode":
        return ODE(
            tol=args.tol,
            divergence=Hutchinson(n_probes=args.probes),
            integrator=Augmented(check=False),
        )
    return {"scoreflow": ScoreFlow(), "elbo": ELBO()}[method]


def _evaluate(
    run_dir: Path, method: str, n: int, args: argparse.Namespace
) -> tuple[str, float, float, float]:
    t0 = time.process_time()
    res = run_likelihood(
        run_dir, estimator=_estimator(method, args), n=n, batch_size=n, progress=False
    )
    return method, res.bpd_mean, res.bpd_se, time.process_time() - t0


def digits(args: argparse.Namespace, out: Path) -> None:
    run_dir = out / "digits"
    common = [f"train.ckpt_every={args.eval_every}", "train.keep_last=1", "train.log_every=50"]
    print("## Digits 8×8 (issue 7)\n")
    print(_header(args) + f" Config `images/digits`, {args.steps} steps.\n")
    print("| steps | training CPU-min | ODE bpd (uniform deq.) | eval CPU-s |")
    print("|---:|---:|---:|---:|")
    cpu = 0.0
    for step in range(args.eval_every, args.steps + 1, args.eval_every):
        cpu += _train_stage(
            "images/digits",
            [f"train.steps={step}", *common],
            run_dir,
            resume=step > args.eval_every,
        )
        _, bpd, se, ecpu = _evaluate(run_dir, "ode", 359, args)
        print(f"| {step} | {cpu / 60:.1f} | {bpd:.3f} ± {se:.3f} | {ecpu:.0f} |", flush=True)
    print("\nAfter the last stage, the bounds (same weights, same test set):\n")
    print("| estimator | bpd | eval CPU-s |")
    print("|---|---:|---:|")
    for method in ("scoreflow", "elbo"):
        _, bpd, se, ecpu = _evaluate(run_dir, method, 359, args)
        print(f"| {method} bound | {bpd:.3f} ± {se:.3f} | {ecpu:.0f} |", flush=True)
    print("\n| reference on the same split | bpd |")
    print("|---|---:|")
    for name, bpd in REFERENCES:
        print(f"| {name} | {bpd:.3f} |")
    if args.grid:
        _grid(run_dir, Path(args.grid), GRID_KIND[args.part])


#: Grid samplers: name -> (label, sampler, steps, options). On the briefly trained
#: Fashion-MNIST model part of the probability-flow ODE samples (any solver) end as speckle;
#: Euler–Maruyama with the final denoising step does not.
GRID_SAMPLERS = {
    "dpm3": ("DPM-Solver++(3M), 50 steps", "dpm_solver", 50, {"grid": "logsnr", "order": 3}),
    "em": ("Euler–Maruyama, 500 steps + denoising", "euler_maruyama", 500, {"denoise": True}),
}
GRID_KIND = {"digits": "dpm3", "fashion": "em"}


def _grid(run_dir: Path, path: Path, kind: str) -> None:
    """64 samples of ``run_dir`` as a PNG grid, drawn with ``GRID_SAMPLERS[kind]``."""
    from sdelab.data.images import model_to_levels
    from sdelab.data.png import save_level_grid
    from sdelab.train.build import load_run

    config, _, _ = load_run(run_dir)
    dataset = make_run_dataset(config)
    label, sampler, steps, options = GRID_SAMPLERS[kind]
    res = sample_run(run_dir, n=64, sampler=sampler, steps=steps, seed=0, options=options)
    x = res.samples.reshape(64, *dataset.image_shape)
    levels = model_to_levels(x, dataset.num_levels, data_range=dataset.data_range)
    save_level_grid(levels, dataset.num_levels, path, ncol=8)
    from PIL import Image

    with Image.open(path) as img:  # nearest-neighbour upscale to ≈ 300 px, for the README
        factor = max(1, 300 // img.width)
        big = img.resize((img.width * factor, img.height * factor), Image.NEAREST)
    big.save(path)
    print(f"\nSample grid ({label}, NFE {res.nfe}): `{path}`")


def fashion(args: argparse.Namespace, out: Path) -> None:
    run_dir = out / "fashion"
    over = [f"train.steps={args.steps}", f"train.ckpt_every={args.steps}", "train.log_every=50"]
    print("## Fashion-MNIST 28×28, small CPU config (issue 7)\n")
    print(_header(args) + f" Config `images/fashion_mnist_small`, {args.steps} steps.\n")
    cpu = _train_stage("images/fashion_mnist_small", over, run_dir, resume=False)
    t0 = time.perf_counter()
    _, bpd, se, ecpu = _evaluate(run_dir, "ode", args.n, args)
    wall = time.perf_counter() - t0
    print(
        "| steps | training CPU-min | test images | ODE bpd (uniform deq., 256 levels) "
        "| eval CPU-min |"
    )
    print("|---:|---:|---:|---:|---:|")
    print(f"| {args.steps} | {cpu / 60:.1f} | {args.n} | {bpd:.3f} ± {se:.3f} | {ecpu / 60:.1f} |")
    print(f"\n(eval wall time {wall / 60:.1f} min)")
    if args.grid:
        _grid(run_dir, Path(args.grid), GRID_KIND[args.part])


def throughput(args: argparse.Namespace, out: Path) -> None:
    print("## U-Net training throughput on this CPU (issue 7)\n")
    print(_header(args).replace(f"{args.threads} thread(s)", "threads as listed") + "\n")
    print("| model | input | parameters | batch | threads | images/s | ms/step |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for name, batch in (("images/digits", 128), ("images/fashion_mnist_small", 64)):
        for threads in (1, 2):
            torch.set_num_threads(threads)
            over = [f"train.batch_size={batch}"]
            run = build_run(load_config(name, over), out / f"tp_{threads}_{name.replace('/', '_')}")
            n_par = sum(p.numel() for p in run.model.parameters())
            for _ in range(3):  # warm-up
                train_step(run)
            times = []
            for _ in range(args.reps):
                t0 = time.perf_counter()
                train_step(run)
                times.append(time.perf_counter() - t0)
            sec = statistics.median(times)
            shape = "×".join(map(str, run.dataset.image_shape))
            print(
                f"| `{name}` | {shape} | {n_par:,} | {batch} | {threads} | {batch / sec:.0f} "
                f"| {1000 * sec:.0f} |",
                flush=True,
            )
    torch.set_num_threads(args.threads)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("part", choices=("digits", "fashion", "throughput"))
    parser.add_argument("--steps", type=int, default=None, help="training steps")
    parser.add_argument("--eval-every", type=int, default=500, help="digits: steps per stage")
    parser.add_argument("--probes", type=int, default=1, help="Hutchinson probes (ODE bpd)")
    parser.add_argument(
        "--tol", type=float, default=1e-5, help="ODE bpd: per-example target in nats"
    )
    parser.add_argument("--n", type=int, default=500, help="fashion: test images")
    parser.add_argument("--reps", type=int, default=10, help="throughput: timed steps")
    parser.add_argument("--grid", default=None, help="write a 64-sample PNG grid here")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None, help="keep the runs here (default: temporary)")
    args = parser.parse_args()
    if args.steps is None:
        args.steps = {"digits": 2500, "fashion": 3000}.get(args.part, 0)
    torch.set_num_threads(args.threads)
    part = {"digits": digits, "fashion": fashion, "throughput": throughput}[args.part]
    if args.out:
        out = Path(args.out)
        if out.exists() and any(out.iterdir()):
            raise SystemExit(f"{out} is not empty: choose another --out")
        part(args, out)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            part(args, Path(tmp))


if __name__ == "__main__":
    main()
