"""A bits/dim reference table of a trained image run: every dequantization, the ODE and the
bounds, next to simple baselines computed with the same accounting.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_reference.py RUN [--n 1000]
        [--dequantizer DIR] [--skip-bounds]

Rows, all on the first ``--n`` test images of RUN's data set, with 95 % intervals
(mean ± 1.96 SE, the SE over images and the estimator's own noise together):

- the probability-flow ODE (the default estimator: :func:`sdelab.default_policy`) with uniform,
  truncated-normal and — with ``--dequantizer DIR`` from ``sdelab train-dequantizer`` —
  variational dequantization;
- the bounds with uniform dequantization: the ELBO (sdeflow-light's, uniform time) and
  ScoreFlow's bound (importance-sampled time), 16 draws each;
- baselines: independent per-pixel categorical (each pixel's level frequencies on the training
  split, add-one smoothing: an exact discrete model, so its bits/dim is −log₂ P(k)/D), and a
  full-covariance Gaussian fitted to uniformly dequantized training images in model space,
  evaluated by :func:`sdelab.likelihood.bits_per_dim` like the ODE (uniform dequantization);
  and the uniform law over the levels, log₂ L.

Prints a Markdown table with the CPU seconds of each row; the training CPU time is the run's
own record where it has one.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import time
from pathlib import Path

import torch

from sdelab.likelihood import ELBO, ODE, Levels, ScoreFlow, bits_per_dim, default_policy
from sdelab.runs import run_likelihood
from sdelab.runs.core import split_levels
from sdelab.train.build import dequantization_options, load_run, make_run_dataset

Z95 = 1.96


def interval(mean: float, se: float) -> str:
    return f"{mean:.4f} ± {Z95 * se:.4f}"


def categorical_baseline(train_k: torch.Tensor, test_k: torch.Tensor, num_levels: int):
    """Per-pixel categorical with add-one smoothing: per-image bits/dim of the test images."""
    n, dim = train_k.shape[0], train_k[0].numel()
    flat = train_k.reshape(n, dim).to(torch.int64)
    counts = torch.ones(dim, num_levels, dtype=torch.float64)  # add-one
    counts.scatter_add_(1, flat.T, torch.ones_like(flat.T, dtype=torch.float64))
    logp = (counts / counts.sum(1, keepdim=True)).log2()
    test = test_k.reshape(test_k.shape[0], dim).to(torch.int64)
    return -logp.gather(1, test.T).T.sum(1) / dim


def gaussian_baseline(train_k, test_k, levels: Levels, seed: int = 0):
    """Full-covariance Gaussian on uniformly dequantized training images in model space; the
    per-image bits/dim of the test images by bits_per_dim (uniform dequantization)."""
    g = torch.Generator().manual_seed(seed)
    n, dim = train_k.shape[0], train_k[0].numel()
    u = torch.rand(train_k.shape, generator=g, dtype=torch.float64)
    y = (levels.scale * (train_k.double() + u) / levels.num_levels + levels.shift).reshape(n, dim)
    mean = y.mean(0)
    cov = torch.cov(y.T) + 1e-6 * torch.eye(dim, dtype=torch.float64)
    law = torch.distributions.MultivariateNormal(mean, covariance_matrix=cov)

    def logp(x: torch.Tensor) -> torch.Tensor:
        return law.log_prob(x.reshape(x.shape[0], dim).double())

    return bits_per_dim(logp, test_k.double(), levels, generator=g).bpd


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run")
    p.add_argument("--n", type=int, default=1000, help="test images")
    p.add_argument("--batch", type=int, default=250)
    p.add_argument("--dequantizer", default=None, help="a train-dequantizer folder")
    p.add_argument("--skip-bounds", action="store_true")
    p.add_argument(
        "--rows",
        nargs="*",
        default=None,
        choices=["uniform", "truncated_normal", "variational", "elbo", "scoreflow", "baselines"],
        help="only these rows (default: all)",
    )
    args = p.parse_args()
    config, _, _ = load_run(args.run)
    dataset = make_run_dataset(config)
    deq = dequantization_options(dataset)
    levels = Levels(deq["levels"], deq["scale"], deq["shift"])
    test_k = split_levels(dataset, "test", args.n).to(torch.int64)
    dim = test_k[0].numel()
    policy = default_policy(tuple(test_k.shape[1:]))
    now = datetime.datetime.now(datetime.UTC)
    print(f"Command: bench_reference.py {args.run} --n {args.n}"
          + (f" --dequantizer {args.dequantizer}" if args.dequantizer else ""))  # fmt: skip
    print(f"Date: {now:%Y-%m-%d %H:%M} UTC. Machine: {platform.machine()}, "
          f"{torch.get_num_threads()} torch thread(s), torch {torch.__version__}. "
          f"Data: {dataset.name}, first {len(test_k)} test images, D = {dim}, "
          f"L = {levels.num_levels}. ODE: {policy.tag}.")  # fmt: skip
    cpu_file = Path(args.run) / "cpu.json"
    if cpu_file.exists():
        print(f"Training CPU time: {json.loads(cpu_file.read_text())['cpu_s'] / 60:.1f} min.")
    print()
    print("| model / estimator | dequantization | test bits/dim (95 % interval) | CPU s |")
    print("|---|---|---:|---:|")
    rows = [("ODE (exact likelihood)", ODE(), "uniform", None),
            ("ODE (exact likelihood)", ODE(), "truncated_normal", None)]  # fmt: skip
    if args.dequantizer:
        rows.append(("ODE (exact likelihood)", ODE(), "variational", args.dequantizer))
    if not args.skip_bounds:
        rows += [("ELBO (bound)", ELBO(), "uniform", None),
                 ("ScoreFlow bound", ScoreFlow(), "uniform", None)]  # fmt: skip

    def wanted(key: str) -> bool:
        return args.rows is None or key in args.rows

    # an ODE row is named by its dequantization, a bound by its estimator
    rows = [r for r in rows if wanted(r[2] if r[1].name == "ode" else r[1].name)]
    for label, est, kind, dq in rows:
        t0 = time.process_time()
        res = run_likelihood(
            args.run, estimator=est, n=len(test_k), batch_size=args.batch,
            dequantization="uniform" if dq else kind, dequantizer=dq, progress=False,
        )  # fmt: skip
        cpu = time.process_time() - t0
        bias = getattr(res, "bias_bound_bpd", float("nan"))
        extra = f" (solver bias ≤ {bias:.4f})" if math.isfinite(bias) and bias > 0 else ""
        print(f"| {label} | {kind} | {interval(res.bpd_mean, res.bpd_se)}{extra} | {cpu:.0f} |",
              flush=True)  # fmt: skip
    if not wanted("baselines"):
        return
    train_k = dataset.load("train").levels.to(torch.int64)
    t0 = time.process_time()
    cat = categorical_baseline(train_k, test_k, levels.num_levels)
    cpu = time.process_time() - t0
    n = len(cat)
    cat_bpd = interval(float(cat.mean()), float(cat.std()) / math.sqrt(n))
    print(f"| per-pixel categorical (baseline) | none: discrete | {cat_bpd} | {cpu:.0f} |")
    t0 = time.process_time()
    gauss = gaussian_baseline(train_k, test_k, levels)
    cpu = time.process_time() - t0
    g_bpd = interval(float(gauss.mean()), float(gauss.std()) / math.sqrt(n))
    print(f"| full-covariance Gaussian (baseline) | uniform | {g_bpd} | {cpu:.0f} |")
    print(f"| uniform over the levels | none | {math.log2(levels.num_levels):.4f} | 0 |")


if __name__ == "__main__":
    main()
