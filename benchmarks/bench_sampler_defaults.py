"""The measurements behind the samplers' defaults (issue 15), all exact output laws on the
Gaussian oracle (no Monte Carlo: see bench_samplers.py for how they are computed).

    .venv/bin/python benchmarks/bench_sampler_defaults.py          # ~2 min on 1 CPU thread
    .venv/bin/python benchmarks/bench_sampler_defaults.py --quick  # fewer rows, seconds

Tables:

1. DPM-Solver++ 2M vs 3M at equal NFE (5 … 100), log-SNR grid, VP and VE, D = 2 and 64,
   from the prior and from the exact p_T (discretisation error alone): the crossover behind
   ``DPM_3M_FROM_NFE``.
2. Lower-order final steps on / off at few steps: ``DPM_LOWER_ORDER_FINAL_STEPS``.
3. The step-ratio guard ``min_step_ratio`` on grids with uneven steps (uniform t, edm), every
   schedule: ``DPM_MIN_STEP_RATIO``.
4. Old defaults (uniform-t grid, 2M) against the new ones for every sampler with an exact
   law, every schedule, 10 / 20 / 50 NFE, with whether ``sample`` warns.
5. Issue 15's reported calls, sampled as a user would (covariance of 20,000 samples).
"""

from __future__ import annotations

import argparse
import datetime
import math
import platform
import time
import warnings

import torch

from bench_samplers import affine_map, euler_maruyama_law, oracle
from sdelab import FunctionSchedule, GaussianData, Schedule
from sdelab.metrics import w2_between_gaussians
from sdelab.samplers import sample
from sdelab.samplers.ode import dpm_solver_default_order
from sdelab.sde import make_schedule

D64 = torch.float64


class OU(Schedule):
    """The README's user-defined schedule."""

    def alpha_sigma(self, t):
        return torch.exp(-t), torch.sqrt(-torch.expm1(-2 * t))


def schedules() -> dict[str, Schedule]:
    out = {n: make_schedule(n) for n in ("ve", "vp", "subvp", "cosine", "tutorial", "vdm")}
    out["OU (README)"] = OU(t_min=1e-3, T=5.0)
    out["σ = t on [0.002, 80]"] = FunctionSchedule(
        torch.ones_like, lambda t: t, t_min=0.002, T=80.0
    )
    return out


def readme_data() -> GaussianData:
    return GaussianData(
        torch.tensor([1.0, -0.5], dtype=D64), torch.tensor([[1.0, 0.7], [0.7, 0.8]], dtype=D64)
    )


def exact_w2(data, schedule, sampler, steps, options, start=None) -> tuple[float, bool]:
    """Exact-law W2 to the data and whether ``sample`` warned, from ``start`` = (mean, cov) at
    T (default: the prior)."""
    d = data.dim
    if start is None:
        start = (torch.zeros(d, dtype=D64), schedule.prior_std**2 * torch.eye(d, dtype=D64))
    score_fn = data.score_fn(schedule)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if sampler in ("euler_maruyama", "lambda"):
            # one draw tells the grid `sample` picks (and raises its warnings)
            ts = sample(
                score_fn, schedule, (1, d), sampler=sampler, steps=steps, dtype=D64, **options
            ).grid_times
            m, c = euler_maruyama_law(score_fn, schedule, ts, *start, lam=options.get("lam", 0.0))
        else:
            a, b = affine_map(score_fn, schedule, d, sampler, steps, options)
            m, c = a @ start[0] + b, a @ start[1] @ a.T
    # sdelab's own warnings (not torch's deprecation notes)
    warned = any(w.category is UserWarning and "jit" not in str(w.message) for w in caught)
    if not (torch.isfinite(m).all() and torch.isfinite(c).all()):
        return float("inf"), warned
    return w2_between_gaussians(m, c, data.mean, data.cov), warned


def fmt(v: float) -> str:
    if not math.isfinite(v):
        return "inf"
    return f"{v:.3g}" if v >= 1e-3 else f"{v:.1e}"


# ---- 1. 2M vs 3M ------------------------------------------------------------------------------
def crossover(nfes) -> list[str]:
    lines = [
        "### 1. DPM-Solver++ 2M vs 3M at equal NFE (log-SNR grid, exact-law W2)",
        "",
        "2M runs NFE steps, 3M NFE − 1 (its midpoint start costs one evaluation); both with the",
        'default lower-order final steps. "prior": x_T from N(0, s² I) as `sample` draws it;',
        '"p_T": x_T from the exact marginal (discretisation error alone).',
        "",
        "| D | schedule | start | " + " | ".join(f"{n}" for n in nfes) + " |",
        "|---|---|---|" + "---:|" * len(nfes),
    ]
    first_win = {}
    for d in (2, 64):
        data = oracle(d)
        for name in ("vp", "ve"):
            schedule = make_schedule(name)
            for start_name, start in (
                ("prior", None),
                ("p_T", data.marginal(schedule, schedule.T)),
            ):
                cells, wins = [], []
                for n in nfes:
                    w2m, _ = exact_w2(data, schedule, "dpm_solver", n, {"order": 2}, start)
                    w3m, _ = exact_w2(data, schedule, "dpm_solver", n - 1, {"order": 3}, start)
                    wins.append(w3m < w2m)
                    cells.append(
                        f"{fmt(w2m)} / {'**' + fmt(w3m) + '**' if w3m < w2m else fmt(w3m)}"
                    )
                # smallest NFE from which 3M wins at every larger NFE of the table
                k = next((i for i in range(len(nfes)) if all(wins[i:])), None)
                first_win[(d, name, start_name)] = None if k is None else nfes[k]
                lines.append(f"| {d} | {name.upper()} | {start_name} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Cells: 2M / 3M, the better 3M in bold. 3M wins at every NFE from: "
        + "; ".join(
            f"D = {d} {n.upper()} {s}: {'never' if v is None else v}"
            for (d, n, s), v in first_win.items()
        )
        + ".",
        "",
    ]
    return lines


# ---- 2. lower-order final steps ------------------------------------------------------------
def lower_order_final(steps_list) -> list[str]:
    lines = [
        "### 2. Lower-order final steps (log-SNR grid, from the prior, exact-law W2)",
        "",
        "Each cell: on / off. D = 2 and 64 oracles of bench_samplers.py.",
        "",
        "| D | schedule | order | " + " | ".join(f"{n} steps" for n in steps_list) + " |",
        "|---|---|---:|" + "---:|" * len(steps_list),
    ]
    for d in (2, 64):
        data = oracle(d)
        for name in ("vp", "ve"):
            schedule = make_schedule(name)
            for order in (2, 3):
                cells = []
                for n in steps_list:
                    # the threshold is lifted so "on" really lowers the final orders here
                    on = _with_threshold(n + 1, data, schedule, n, order, True)
                    off = _with_threshold(n + 1, data, schedule, n, order, False)
                    cells.append(f"{'**' + fmt(on) + '**' if on < off else fmt(on)} / {fmt(off)}")
                lines.append(f"| {d} | {name.upper()} | {order} | " + " | ".join(cells) + " |")
    lines += ["", "Bold: lowering the final orders helps.", ""]
    return lines


def _with_threshold(below, data, schedule, n, order, lof) -> float:
    """W2 with the final orders lowered at every step count below ``below`` (or never)."""
    from sdelab.samplers import ode

    saved = ode.DPM_LOWER_ORDER_FINAL_STEPS
    ode.DPM_LOWER_ORDER_FINAL_STEPS = range(1, below)
    try:
        opts = {"order": order, "lower_order_final": lof}
        return exact_w2(data, schedule, "dpm_solver", n, opts)[0]
    finally:
        ode.DPM_LOWER_ORDER_FINAL_STEPS = saved


# ---- 3. the step-ratio guard -----------------------------------------------------------------
def ratio_guard(ratios, steps_list) -> list[str]:
    data = readme_data()
    lines = [
        "### 3. Step-ratio guard `min_step_ratio` on uneven grids (README data, exact-law W2)",
        "",
        "Default order (2M below 15 NFE, 3M from 15). Each cell: worst / median over the 8",
        "schedules (6 built-in, OU, σ = t) of the exact-law W2 from the prior.",
        "",
        "| grid | steps | " + " | ".join(f"r_min = {r}" for r in ratios) + " |",
        "|---|---:|" + "---:|" * len(ratios),
    ]
    scheds = schedules()
    for grid in ("uniform", "edm", "logsnr"):
        for n in steps_list:
            cells = []
            for r in ratios:
                w = torch.tensor(
                    [
                        exact_w2(data, s, "dpm_solver", n, {"grid": grid, "min_step_ratio": r})[0]
                        for s in scheds.values()
                    ]
                )
                cells.append(f"{fmt(float(w.max()))} / {fmt(float(w.median()))}")
            lines.append(f"| {grid} | {n} | " + " | ".join(cells) + " |")
    return [*lines, ""]


# ---- 4. old vs new defaults ------------------------------------------------------------------
OLD_VS_NEW = [
    # (label, sampler, options, stages per step)
    ("DPM-Solver++", "dpm_solver", {}, 1),
    ("PF-ODE RK4", "ode", {"method": "rk4"}, 4),
    ("PF-ODE Heun", "ode", {"method": "heun"}, 2),
    ("PF-ODE Euler", "ode", {"method": "euler"}, 1),
    ("Euler–Maruyama", "euler_maruyama", {}, 1),
    ("λ-family λ = 0.5", "lambda", {"lam": 0.5}, 1),
]


def old_vs_new(nfes) -> list[str]:
    data = readme_data()
    lines = [
        "### 4. Old defaults vs new defaults (README data, from the prior, exact-law W2)",
        "",
        'Old: `grid="uniform"`, DPM-Solver `order=2`. New: `DEFAULT_GRIDS` (log-SNR for',
        "DPM-Solver, the probed grid for the rest), DPM-Solver's order by NFE, lower-order",
        "final steps, step-ratio guard. Cells: old → new at "
        + " / ".join(str(n) for n in nfes)
        + " NFE; ⚠ marks a call on which `sample` warns.",
        "",
        "| sampler | " + " | ".join(scheds := list(schedules())) + " |",
        "|---|" + "---|" * len(scheds),
    ]
    worst_old = {n: 0.0 for n in nfes}
    worst_new = {n: 0.0 for n in nfes}
    for label, sampler, options, stages in OLD_VS_NEW:
        cells = []
        for s in schedules().values():
            parts = []
            for nfe in nfes:
                steps = max(1, nfe // stages)
                old_opts = {**options, "grid": "uniform"}
                if sampler == "dpm_solver":
                    old_opts["order"] = 2
                    old_opts.update(lower_order_final=False, min_step_ratio=0.0)
                old, _ = exact_w2(data, s, sampler, steps, old_opts)
                new_steps = steps  # equal NFE: the default 3M spends one more per run
                if sampler == "dpm_solver" and dpm_solver_default_order(steps - 1) == 3:
                    new_steps = steps - 1
                new, warned = exact_w2(data, s, sampler, new_steps, options)
                worst_old[nfe] = max(worst_old[nfe], old)
                worst_new[nfe] = max(worst_new[nfe], new)
                parts.append(f"{fmt(old)}→{fmt(new)}{'⚠' if warned else ''}")
            cells.append("<br>".join(parts))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Worst case over all rows and schedules, old → new: "
        + "; ".join(f"{n} NFE {fmt(worst_old[n])} → {fmt(worst_new[n])}" for n in nfes)
        + ".",
        "",
    ]
    return lines


# ---- 5. the issue's cases, as a user samples ---------------------------------------------------
def issue_cases(n: int) -> list[str]:
    """Σ₀₁ (0.70 in the data) of n samples of the README's calls that issue 15 reported."""
    data = readme_data().to(dtype=torch.float32)
    scheds = schedules()
    cases = [
        ("VP, 3M, 30 steps, uniform t", scheds["vp"], {"order": 3, "steps": 30}),
        (
            "σ = t, 2M, 100 steps, uniform t",
            scheds["σ = t on [0.002, 80]"],
            {"order": 2, "steps": 100},
        ),
        (
            "σ = t, 3M, 30 steps, uniform t",
            scheds["σ = t on [0.002, 80]"],
            {"order": 3, "steps": 30},
        ),
        (
            "OU (README, T = 5), 3M, 30 steps, uniform t",
            scheds["OU (README)"],
            {"order": 3, "steps": 30},
        ),
    ]
    lines = [
        f"### 5. The issue's cases: Σ₀₁ of {n:,} samples (data: 0.70)",
        "",
        "| call | old (no guard, no lower-order final) | new, same grid and order | new defaults "
        "(`grid`, `order` unset) |",
        "|---|---:|---:|---:|",
    ]
    for label, schedule, kw in cases:
        score_fn = data.score_fn(schedule)
        cells = []
        for opts in (
            {**kw, "grid": "uniform", "lower_order_final": False, "min_step_ratio": 0.0},
            {**kw, "grid": "uniform"},
            {"steps": kw["steps"]},
        ):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                x = sample(score_fn, schedule, (n, 2), sampler="dpm_solver", generator=0, **opts)
            cells.append(f"{float(torch.cov(x.samples.T)[0, 1]):.3f}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="fewer rows, seconds")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    print("## Sampler defaults (issue 15)\n")
    print(
        f"Command: `.venv/bin/python benchmarks/bench_sampler_defaults.py"
        f"{' --quick' if args.quick else ''}`. "
        f"Date: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC; "
        f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{args.threads} thread(s).\n"
    )
    if args.quick:
        sections = [
            crossover([5, 10, 20]),
            ratio_guard([0.0, 0.2], [10]),
            old_vs_new([10]),
            issue_cases(2000),
        ]
    else:
        sections = [
            crossover([5, 6, 8, 10, 12, 15, 20, 25, 30, 40, 50, 75, 100]),
            lower_order_final([4, 6, 8, 10, 12, 15, 20, 30]),
            ratio_guard([0.0, 0.1, 0.2, 0.3, 0.5], [10, 20, 50, 100]),
            old_vs_new([10, 20, 50]),
            issue_cases(20_000),
        ]
    for lines in sections:
        print("\n".join(lines), flush=True)
    print(f"Total wall time: {time.perf_counter() - t0:.0f} s.")


if __name__ == "__main__":
    main()
