r"""Measured defaults of the samplers and warnings for combinations measured to go wrong.

The numbers behind every choice come from ``benchmarks/bench_sampler_defaults.py`` on the
Gaussian oracle (exact output laws; tables on ``docs/benchmarks/samplers.md``), over the six
built-in schedules and two user-defined ones (an OU process and σ = t):

- :func:`linear_probe` scores a sampler on one schedule and grid by its exact output law on
  Gaussian test data N(1, diag(0.1, 1, 10)) with a closed-form score (float64, a few ms).
- ``DEFAULT_GRIDS``: DPM-Solver++ takes equal steps in log-SNR, its own time variable (on a
  uniform-t grid its multistep correction blows up on VP, sub-VP, cosine, OU and σ = t). No
  one grid suits the other samplers on every schedule — uniform t is the most accurate on VP,
  sub-VP and cosine but diverges on σ = t ∈ [0.002, 80] (Euler–Maruyama's exact-law W2 is 26
  at 10 steps) and blows up fixed-step ODE solvers on VE with few steps, where the ρ-ramp of
  Karras et al. (``edm``) is best — so each picks the grid its probe (or, for the
  discrete-chain samplers, Euler–Maruyama's) finds most accurate on the schedule at hand.
- :func:`resolve_options` fills DPM-Solver's order by step count, records the per-step orders
  and warns (``UserWarning``) where a combination is in a measured bad region.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from sdelab.samplers.grids import time_grid
from sdelab.samplers.ode import (
    DPM_3M_FROM_NFE,
    DPM_MIN_STEP_RATIO,
    TABLEAUX,
    dpm_solver_default_order,
    dpm_solver_orders,
    sample_dpm_solver,
    sample_ode,
)
from sdelab.samplers.registry import sampler_options
from sdelab.sde import Schedule

__all__ = ["DEFAULT_GRIDS", "PROBE_GRIDS", "PROBE_TOL", "default_grid", "linear_probe"]

#: Grid used when ``sample`` is called without ``grid``: a grid name, or ``"probe"``: the
#: grid among ``PROBE_GRIDS`` on which :func:`linear_probe` (of the sampler itself, or for the
#: discrete-chain samplers of Euler–Maruyama as their proxy) is most accurate.
DEFAULT_GRIDS: dict[str, str] = {
    "euler_maruyama": "probe",
    "reverse_diffusion": "probe",
    "ancestral": "probe",
    "pc": "probe",
    "annealed_langevin": "edm",
    "lambda": "probe",
    "ode": "probe",
    "dpm_solver": "logsnr",
}
#: Candidates of the probed default, in order of preference on ties; also the fallback
#: (the first) where no probe applies (adaptive ODE solvers, more than ``PROBE_MAX_NFE``).
PROBE_GRIDS: tuple[str, ...] = ("edm", "logsnr", "uniform")
#: ``sample`` warns when the probe's error (in standard deviations of the target) exceeds this.
PROBE_TOL = 0.5
#: Probes run up to this many NFE (instabilities of fixed-step schemes show at few steps;
#: a probe costs as many evaluations of a closed-form score on a (2, 3) state, ~0.5 ms each).
PROBE_MAX_NFE = 200
_PROBE_VARIANCES = (0.1, 1.0, 10.0)
_PROBE_MEAN = 1.0

D64 = torch.float64


def _probe_setup(schedule: Schedule, ts: Tensor):
    """Variances v, the grid in float64 on the CPU, and the marginals' (mean, variance)
    at T and at t_min for data N(μ = 1, v)."""
    var = torch.tensor(_PROBE_VARIANCES, dtype=D64)
    ts64 = ts.detach().to(device="cpu", dtype=D64)
    ends = schedule(ts64[[0, -1]])
    start = (ends.alpha[0] * _PROBE_MEAN, ends.alpha[0] ** 2 * var + ends.sigma[0] ** 2)
    target = (ends.alpha[1] * _PROBE_MEAN, ends.alpha[1] ** 2 * var + ends.sigma[1] ** 2)
    return var, ts64, start, target


def _law_error(mean: Tensor, variance: Tensor, target: tuple[Tensor, Tensor]) -> float:
    """max over dimensions of the whitened mean error and the relative error of the std."""
    std = target[1].sqrt()
    err = torch.maximum((mean - target[0]).abs() / std, (variance.sqrt() - std).abs() / std)
    err = err.max()
    return float(err) if bool(torch.isfinite(err)) else float("inf")


def _deterministic_probe(sampler, schedule: Schedule, ts: Tensor, options: dict) -> float:
    """A deterministic sampler on this data is affine, x_T ↦ m x_T + c: read m and c off the
    probes x_T = 0 and 1 and push the law of p_T through."""
    var, ts64, start, target = _probe_setup(schedule, ts)

    def score_fn(x: Tensor, t: Tensor) -> Tensor:
        v = schedule(t.to(D64))
        alpha, sigma = v.alpha[:, None], v.sigma[:, None]
        return -(x - alpha * _PROBE_MEAN) / (alpha**2 * var + sigma**2)

    x = torch.stack([torch.zeros_like(var), torch.ones_like(var)])
    with torch.no_grad():
        out = sampler(score_fn, schedule, x, ts64, **options)
    c, m = out[0], out[1] - out[0]
    return _law_error(m * start[0] + c, m**2 * start[1], target)


def _euler_maruyama_probe(schedule: Schedule, ts: Tensor, lam: float) -> float:
    """Euler–Maruyama on the λ-family SDE is x ← a x + b + √((1 − λ) g² h) z per step with
    a = 1 − (f + (1 − λ/2) g²/M) h, b = (1 − λ/2) g² α μ h / M and M = α² v + σ²: propagate
    the mean and variance exactly."""
    var, ts64, (mean, variance), target = _probe_setup(schedule, ts)
    with torch.no_grad():
        vals = schedule(ts64[:-1])
        h = -ts64.diff()
        c = 1 - 0.5 * lam
        for i in range(h.numel()):
            marginal = vals.alpha[i] ** 2 * var + vals.sigma[i] ** 2
            a = 1 - (vals.f[i] + c * vals.g2[i] / marginal) * h[i]
            mean = a * mean + c * vals.g2[i] * vals.alpha[i] * _PROBE_MEAN * h[i] / marginal
            variance = a**2 * variance + (1 - lam) * vals.g2[i] * h[i]
    return _law_error(mean, variance, target)


def linear_probe(name: str, schedule: Schedule, ts: Tensor, options: dict) -> float | None:
    """Error of sampler ``name``'s exact output law on Gaussian test data.

    The test data are N(1, diag(v)) for v = 0.1, 1, 10, whose score −(x − α_t)/(α_t² v + σ_t²)
    is known in closed form; the sampler starts from the exact p_T, in float64. A
    deterministic sampler (a fixed-step ``ode`` method, ``dpm_solver``) is then an affine map
    whose output law is exact to compute; Euler–Maruyama and the λ-family propagate mean and
    variance exactly; ``reverse_diffusion``, ``ancestral`` and ``pc``, discretisations of the
    same reverse SDE, are scored by Euler–Maruyama's probe as a proxy. Cost: about one
    sampler step on a (2, 3) state per grid step.

    Returns:
        max over v of the whitened mean error |m − m*|/s* and the relative std error
        |s − s*|/s* (``inf`` when non-finite), or ``None`` where no probe applies (adaptive
        solvers, annealed Langevin, invalid options).
    """
    options = {k: v for k, v in options.items() if k not in ("denoise", "rho")}  # not the sampler's
    with torch.no_grad():  # a learned schedule's parameters need no graph here
        return _linear_probe(name, schedule, ts, options)


def _linear_probe(name: str, schedule: Schedule, ts: Tensor, options: dict) -> float | None:
    if name == "ode" and options.get("method") in TABLEAUX:
        return _deterministic_probe(sample_ode, schedule, ts, options)
    if name == "dpm_solver":
        if options.get("order") not in (1, 2, 3) or isinstance(options.get("order"), bool):
            return None  # the sampler raises the error
        if not 0 <= options.get("min_step_ratio", DPM_MIN_STEP_RATIO) < 1:
            return None
        return _deterministic_probe(sample_dpm_solver, schedule, ts, options)
    if name == "lambda":
        lam = options.get("lam", 0.0)
        return _euler_maruyama_probe(schedule, ts, lam) if 0 <= lam <= 1 else None
    if name in ("euler_maruyama", "reverse_diffusion", "ancestral", "pc"):
        return _euler_maruyama_probe(schedule, ts, 0.0)
    return None


def _probe_nfe(name: str, steps: int, options: dict) -> int:
    """Score evaluations one probe of ``steps`` steps costs (what ``PROBE_MAX_NFE`` caps)."""
    if name == "ode" and options.get("method") in TABLEAUX:
        return steps * len(TABLEAUX[options["method"]].b)
    return steps


def default_grid(
    name: str, schedule: Schedule, steps: int, options: dict, *, errors: dict | None = None
) -> str:
    """The grid ``sample`` uses for sampler ``name`` when none is given (see
    ``DEFAULT_GRIDS``); ``options`` are the sampler's options with defaults filled in.

    For a probed sampler with at most ``PROBE_MAX_NFE`` NFE, each grid of ``PROBE_GRIDS`` is
    scored by :func:`linear_probe` and the most accurate wins (ties: the first); the scores
    land in ``errors`` when a dict is given. Otherwise the first of ``PROBE_GRIDS``.
    """
    choice = DEFAULT_GRIDS[name]
    if choice != "probe":
        return choice
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        return PROBE_GRIDS[0]  # time_grid raises the error
    if _probe_nfe(name, steps, options) > PROBE_MAX_NFE:
        return PROBE_GRIDS[0]
    scores = {}
    for grid in PROBE_GRIDS:
        ts = time_grid(schedule, steps, grid, dtype=D64)
        scores[grid] = linear_probe(name, schedule, ts, options)
    if errors is not None:
        errors.update(scores)
    if any(e is None for e in scores.values()):
        return PROBE_GRIDS[0]
    return min(PROBE_GRIDS, key=lambda g: scores[g])


def resolve_options(
    name: str,
    schedule: Schedule,
    ts: Tensor,
    grid: str,
    options: dict,
    *,
    errors: dict | None = None,
) -> tuple[dict, dict]:
    """The options sampler ``name`` runs with and the record of what it used.

    Fills the defaults that depend on the step count (DPM-Solver's ``order``), records the
    per-step orders of DPM-Solver (``step_orders``) and warns (``UserWarning``) where the
    combination is in a measured bad region: DPM-Solver++(3M) below ``DPM_3M_FROM_NFE`` NFE, a
    grid whose step-size ratios force DPM-Solver to lower its order, or an ``ode``
    (fixed-step), ``dpm_solver``, ``euler_maruyama`` or ``lambda`` run whose
    :func:`linear_probe` error exceeds ``PROBE_TOL``.

    ``errors``: probe scores by grid name already computed by :func:`default_grid`.

    Returns:
        ``(run, record)``: keyword options for the sampler and the dict stored in
        ``SampleResult.options``.
    """
    defaults = {k: v for k, v in sampler_options(name).items() if k not in ("denoise", "rho")}
    run = {**defaults, **options}
    record = dict(run)
    steps = len(ts) - 1
    if name == "dpm_solver":
        if run["order"] is None:
            run["order"] = dpm_solver_default_order(steps)
        elif run["order"] == 3 and steps + 1 < DPM_3M_FROM_NFE:
            warnings.warn(
                f"DPM-Solver++(3M) with {steps + 1} NFE is less accurate than 2M below "
                f"{DPM_3M_FROM_NFE} NFE (measured: docs/benchmarks/samplers.md): use order=2 or "
                "None",
                stacklevel=3,
            )
        if run["order"] in (1, 2, 3):
            with torch.no_grad():
                ell = 0.5 * schedule.log_snr(ts.detach().to(device="cpu", dtype=D64))
            common = {"order": run["order"], "lower_order_final": run["lower_order_final"]}
            orders = dpm_solver_orders(ell, min_step_ratio=run["min_step_ratio"], **common)
            unguarded = dpm_solver_orders(ell, min_step_ratio=0.0, **common)
            lowered = [i for i, (a, b) in enumerate(zip(orders, unguarded)) if a < b]
            if lowered:
                warnings.warn(
                    f"grid {grid!r} has step-size ratios h_prev/h < {run['min_step_ratio']} at "
                    f"step(s) {lowered[:5]}{' …' if len(lowered) > 5 else ''}, where "
                    f"DPM-Solver lowers its order; grid='logsnr' keeps every step at full order",
                    stacklevel=3,
                )
            record.update(order=run["order"], step_orders=orders)
    if name in _WARN_ON_PROBE and _probe_nfe(name, steps, run) <= PROBE_MAX_NFE:
        known = errors or {}
        err = known[grid] if grid in known else linear_probe(name, schedule, ts, run)
        if err is not None and err > PROBE_TOL:
            what = f"sampler={name!r}" + (f", method={run['method']!r}" if name == "ode" else "")
            warnings.warn(
                f"{what} with {steps} steps on grid {grid!r} is inaccurate or unstable on this "
                f"schedule: on Gaussian test data its output is off by "
                f"{'> 1e6' if err > 1e6 else f'{err:.2g}'} standard deviations; use more steps"
                + ("" if name == "dpm_solver" else " or sampler='dpm_solver'"),
                stacklevel=3,
            )
    return run, record


#: Samplers whose own exact law the probe computes (the others are only proxied by it).
_WARN_ON_PROBE = ("ode", "dpm_solver", "euler_maruyama", "lambda")
