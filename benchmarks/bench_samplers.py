"""Every sampler on the Gaussian oracle: NFE, wall-seconds and 2-Wasserstein distance.

    .venv/bin/python benchmarks/bench_samplers.py            # ~5 min on 2 shared CPU cores
    .venv/bin/python benchmarks/bench_samplers.py --quick    # smoke run, seconds

Data: N(μ, Σ) in D = 2 and 64 with μ ~ N(0, I) and Σ = U diag(0.25 … 4) Uᵀ (the tests' oracle),
under VP and VE. Two distances to N(μ, Σ) are printed:

- ``W2 (samples)``: closed-form W2 of the Gaussian fitted to n samples. Even exact samples give
  a positive value, the Monte-Carlo floor printed above each table.
- ``W2 (exact law)``: the W2 of the sampler's exact output distribution, free of Monte-Carlo
  noise. On this oracle the score is affine in x, so a deterministic sampler is an affine map
  x_T ↦ M x_T + c (read off by running it on the D + 1 probes 0, e_1, …, e_D) and Euler–Maruyama
  is a linear-Gaussian recursion whose mean and covariance we propagate step by step through
  ``schedule.reverse_sde``. The other stochastic samplers get "—".
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import math
import platform
import time

import torch

from sdelab.metrics import gaussian_w2, w2_between_gaussians
from sdelab.oracle import GaussianData
from sdelab.samplers import sample, time_grid
from sdelab.sde import Schedule, VESchedule, VPSchedule

D64 = torch.float64

# (label, sampler, options, steps). Issue 4's table: the grids and orders are spelled out, as
# they were the defaults then (uniform t; 2M); issue 15's defaults: bench_sampler_defaults.py.
U = {"grid": "uniform"}
ROWS = [
    ("Euler–Maruyama", "euler_maruyama", U, 1000),
    ("Euler–Maruyama", "euler_maruyama", U, 50),
    ("reverse diffusion", "reverse_diffusion", U, 1000),
    ("ancestral", "ancestral", U, 1000),
    ("PC: reverse diffusion + Langevin", "pc", {**U, "snr": 0.16}, 500),
    (
        "annealed Langevin (10/level, snr 0.5)",
        "annealed_langevin",
        {**U, "n_corrector_steps": 10, "snr": 0.5},
        100,
    ),
    ("λ-family λ = 0.5", "lambda", {**U, "lam": 0.5}, 1000),
    ("PF-ODE Euler", "ode", {**U, "method": "euler"}, 100),
    ("PF-ODE Heun", "ode", {**U, "method": "heun"}, 50),
    ("PF-ODE RK4", "ode", {**U, "method": "rk4"}, 25),
    ("PF-ODE dopri5 (rtol = atol = 1e-5)", "ode", {**U, "method": "dopri5"}, 1),
    ("DPM-Solver++(2M), log-SNR grid", "dpm_solver", {"grid": "logsnr", "order": 2}, 10),
    ("DPM-Solver++(2M), log-SNR grid", "dpm_solver", {"grid": "logsnr", "order": 2}, 20),
    ("DPM-Solver++(2M), log-SNR grid", "dpm_solver", {"grid": "logsnr", "order": 2}, 50),
    ("DPM-Solver++(3M), log-SNR grid", "dpm_solver", {"grid": "logsnr", "order": 3}, 19),
    ("DPM-Solver++(3M), log-SNR grid", "dpm_solver", {"grid": "logsnr", "order": 3}, 49),
]


def oracle(d: int, seed: int = 0) -> GaussianData:
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=D64))
    evals = torch.logspace(math.log10(0.25), math.log10(4.0), d, dtype=D64)
    return GaussianData(torch.randn(d, generator=g, dtype=D64), u @ torch.diag(evals) @ u.T)


# ---- exact output laws (no Monte Carlo) ------------------------------------------------------
def affine_map(score_fn, schedule: Schedule, d: int, sampler: str, steps: int, options):
    """(M, c) of a deterministic sampler x_T ↦ M x_T + c, from the probes 0, e_1, …, e_D."""
    probes = torch.cat([torch.zeros(1, d, dtype=D64), torch.eye(d, dtype=D64)])
    out = sample(score_fn, schedule, None, sampler=sampler, steps=steps, x_init=probes, **options)
    c = out.samples[0]
    return (out.samples[1:] - c).T, c


def euler_maruyama_law(score_fn, schedule: Schedule, ts, mean, cov, lam: float = 0.0):
    """Mean and covariance after Euler–Maruyama on the λ-family reverse SDE from N(mean, cov):
    each step x ← x − drift(x) h + diffusion √h z is affine in x plus isotropic noise."""
    d = mean.numel()
    probes = torch.cat([torch.zeros(1, d, dtype=D64), torch.eye(d, dtype=D64)])
    for t, s in itertools.pairwise(ts):
        h = t - s
        tb = t.expand(d + 1).contiguous()
        drift, diffusion = schedule.reverse_sde(probes, t, score_fn(probes, tb), lam)
        out = probes - drift * h
        b, a = out[0], (out[1:] - out[0]).T
        mean = a @ mean + b
        cov = a @ cov @ a.T + float(diffusion[0, 0] ** 2 * h) * torch.eye(d, dtype=D64)
    return mean, cov


def exact_w2(data, schedule, sampler, steps, options, start) -> float | None:
    """W2 of the exact output law, starting from ``start`` = (mean, cov) at T."""
    score_fn = data.score_fn(schedule)
    d = data.dim
    if sampler in ("euler_maruyama", "lambda"):
        ts = time_grid(schedule, steps, options.get("grid", "uniform"), dtype=D64)
        m, c = euler_maruyama_law(score_fn, schedule, ts, *start, lam=options.get("lam", 0.0))
        return w2_between_gaussians(m, c, data.mean, data.cov)
    if sampler in ("ode", "dpm_solver"):
        a, b = affine_map(score_fn, schedule, d, sampler, steps, options)
        m, c = a @ start[0] + b, a @ start[1] @ a.T
        return w2_between_gaussians(m, c, data.mean, data.cov)
    return None


# ---- the benchmark -------------------------------------------------------------------------
def fmt(v: float | None) -> str:
    return "—" if v is None else f"{v:.4f}" if v >= 1e-3 else f"{v:.1e}"


def run_setting(d: int, name: str, schedule: Schedule, n: int, rows, seed: int) -> list[str]:
    data = oracle(d)  # float64: exact laws and W2
    score_fn = data.to(dtype=torch.float32).score_fn(schedule)  # float32 sampling
    prior = (torch.zeros(d, dtype=D64), schedule.prior_std**2 * torch.eye(d, dtype=D64))
    # W2 of n exact data samples, over 20 draws: the noise level of the "samples" column.
    floors = torch.tensor(
        [
            gaussian_w2(
                data.sample(n, generator=torch.Generator().manual_seed(1000 + k)),
                data.mean,
                data.cov,
            )
            for k in range(20)
        ]
    )
    lines = [
        f"### D = {d}, {name} — n = {n:,} samples; Monte-Carlo floor (W2 of n exact data "
        f"samples, mean ± sd of 20 draws) = {floors.mean():.4f} ± {floors.std():.4f}",
        "",
        "| sampler | steps | NFE | wall s | W2 (samples) | W2 (exact law) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    results = {}
    for label, sampler, options, steps in rows:
        t0 = time.perf_counter()
        res = sample(
            score_fn, schedule, (n, d), sampler=sampler, steps=steps, generator=seed, **options
        )
        wall = time.perf_counter() - t0
        w2 = gaussian_w2(res.samples, data.mean, data.cov)
        exact = exact_w2(data, schedule, sampler, steps, options, prior)
        adaptive = options.get("method") == "dopri5"  # its probes take their own steps: ≈
        results[(sampler, steps, options.get("order", 2))] = (res.nfe, exact)
        lines.append(
            f"| {label} | {'adaptive' if adaptive else steps} | {res.nfe} | {wall:.1f} "
            f"| {fmt(w2)} | {fmt(exact)}{' ≈' if adaptive else ''} |"
        )
    lines += ["", *claim(results)]
    lines += ["", *from_exact_prior(data, schedule, d, name), ""]
    return lines


def claim(results) -> list[str]:
    """Does a DPM-Solver++ with ≤ 50 NFE reach the exact-law W2 of 1000-step EM?"""
    em = results.get(("euler_maruyama", 1000, 2), (None, None))[1]
    dpm = [
        (order, nfe, w)
        for (s, _, order), (nfe, w) in results.items()
        if s == "dpm_solver" and nfe <= 50
    ]
    if em is None or not dpm:
        return []
    order, nfe, best = min(dpm, key=lambda r: r[2])
    verdict = "yes" if best <= em else "no"
    return [
        f"DPM-Solver++ at ≤ 50 NFE from the prior reaches EM-1000 (exact law): **{verdict}** — "
        f"best {fmt(best)} ({order}M, {nfe} NFE) vs {fmt(em)} for EM at 1000 NFE."
    ]


def from_exact_prior(data, schedule, d: int, name: str) -> list[str]:
    """Exact-law W2 when x_T is drawn from the true p_T instead of the prior N(0, s² I):
    discretisation error alone, without the prior mismatch the ODE cannot contract."""
    start = data.marginal(schedule, schedule.T)
    cells = []
    for label, sampler, options, steps in [
        ("EM", "euler_maruyama", U, 1000),
        ("DPM++2M", "dpm_solver", {"grid": "logsnr", "order": 2}, 20),
        ("DPM++2M", "dpm_solver", {"grid": "logsnr", "order": 2}, 50),
        ("DPM++2M", "dpm_solver", {"grid": "logsnr", "order": 2}, 100),
        ("DPM++3M", "dpm_solver", {"grid": "logsnr", "order": 3}, 19),
        ("DPM++3M", "dpm_solver", {"grid": "logsnr", "order": 3}, 49),
        ("RK4", "ode", {**U, "method": "rk4"}, 12),
        ("RK4", "ode", {**U, "method": "rk4"}, 25),
    ]:
        exact = exact_w2(data, schedule, sampler, steps, options, start)
        nfe = steps * (4 if options.get("method") == "rk4" else 1) + (options.get("order") == 3)
        cells.append((f"{label} {nfe}", fmt(exact)))
    return [
        f"Exact-law W2 from x_T ~ p_T (no prior mismatch), D = {d}, {name}:",
        "",
        "| " + " | ".join(c[0] + " NFE" for c in cells) + " |",
        "|" + "---:|" * len(cells),
        "| " + " | ".join(c[1] for c in cells) + " |",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n2", type=int, default=50_000, help="samples for D = 2")
    parser.add_argument("--n64", type=int, default=4_000, help="samples for D = 64")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="tiny smoke run")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = ROWS
    if args.quick:
        args.n2, args.n64 = 2_000, 500
        rows = [(lbl, s, o, max(2, st // 20)) for lbl, s, o, st in ROWS]
    print("## Samplers (issue 4)\n")
    print(
        f"Date: {datetime.date.today()}; machine: {platform.processor() or platform.machine()}, "
        f"torch {torch.__version__}, {args.threads} thread(s).\n"
    )
    t0 = time.perf_counter()
    for d, n in ((2, args.n2), (64, args.n64)):
        for name, schedule in (("VP", VPSchedule()), ("VE", VESchedule())):
            print("\n".join(run_setting(d, name, schedule, n, rows, args.seed)), flush=True)
    print(f"Total wall time: {time.perf_counter() - t0:.0f} s.")


if __name__ == "__main__":
    main()
