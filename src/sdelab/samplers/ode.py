r"""Deterministic samplers: the probability-flow ODE and DPM-Solver++(2M).

The probability-flow ODE (Song et al. 2021, Eq. 13) dx/dt = f x − ½ g² ∇log p_t(x) is
integrated from T to t_min with

- fixed-step explicit Runge–Kutta methods given as Butcher tableaux (``TABLEAUX``: Euler,
  Heun, midpoint, RK4), one step per grid interval, or
- torchdiffeq's adaptive solvers (``dopri5``, ``dopri8``, ``bosh3``, ``fehlberg2``,
  ``adaptive_heun``) with ``rtol``/``atol``; the grid then only fixes the output times.

DPM-Solver++(2M) (Lu et al. 2022) is an exponential integrator in half-log-SNR time
ℓ = λ/2 = log(α/σ) using the data prediction x̂_0: with h = ℓ_s − ℓ_t,

    x_s = (σ_s/σ_t) x_t − α_s (e^{−h} − 1) D,
    D = (1 + 1/(2r)) x̂_0(t) − 1/(2r) x̂_0(t_prev),   r = h_prev / h   (D = x̂_0(t) at first),

which needs only α, σ and λ of the schedule, so it runs on any schedule.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torchdiffeq
from torch import Tensor

from sdelab.samplers.stochastic import (
    Callback,
    Constraint,
    ScoreFn,
    apply_constraint,
    score_at,
    x0_from_score,
)
from sdelab.sde import Schedule
from sdelab.utils import ADAPTIVE_SOLVERS

__all__ = [
    "DPM_3M_FROM_NFE",
    "DPM_LOWER_ORDER_FINAL_STEPS",
    "DPM_MIN_STEP_RATIO",
    "ODE_METHODS",
    "TABLEAUX",
    "ButcherTableau",
    "dpm_solver_default_order",
    "dpm_solver_orders",
    "dpm_update",
    "sample_dpm_solver",
    "sample_ode",
]


@dataclass(frozen=True)
class ButcherTableau:
    """An explicit Runge–Kutta method: nodes c, strictly lower-triangular a, weights b."""

    c: tuple[float, ...]
    a: tuple[tuple[float, ...], ...]  # row i holds a_{i,0..i-1}
    b: tuple[float, ...]
    order: int


#: Fixed-step methods by name (solvers as data).
TABLEAUX: dict[str, ButcherTableau] = {
    "euler": ButcherTableau(c=(0.0,), a=((),), b=(1.0,), order=1),
    "heun": ButcherTableau(c=(0.0, 1.0), a=((), (1.0,)), b=(0.5, 0.5), order=2),
    "midpoint": ButcherTableau(c=(0.0, 0.5), a=((), (0.5,)), b=(0.0, 1.0), order=2),
    "rk4": ButcherTableau(
        c=(0.0, 0.5, 0.5, 1.0),
        a=((), (0.5,), (0.0, 0.5), (0.0, 0.0, 1.0)),
        b=(1 / 6, 1 / 3, 1 / 3, 1 / 6),
        order=4,
    ),
}

#: torchdiffeq's adaptive-step solvers that ``sample_ode`` accepts.
ADAPTIVE_METHODS: tuple[str, ...] = ADAPTIVE_SOLVERS  # torchdiffeq's, read from it
ODE_METHODS: tuple[str, ...] = (*TABLEAUX, *ADAPTIVE_METHODS)

Velocity = Callable[[Tensor, Tensor], Tensor]


def rk_step(tableau: ButcherTableau, velocity: Velocity, x: Tensor, t: Tensor, h: Tensor) -> Tensor:
    """One explicit Runge–Kutta step x(t + h) of dx/dt = velocity(x, t); ``t``, ``h`` scalars."""
    ks: list[Tensor] = []
    for c_i, a_i in zip(tableau.c, tableau.a):
        x_i = x
        for a_ij, k_j in zip(a_i, ks):
            if a_ij != 0:
                x_i = x_i + (h * a_ij) * k_j
        ks.append(velocity(x_i, t + c_i * h))
    return x + h * sum(b_i * k_i for b_i, k_i in zip(tableau.b, ks) if b_i != 0)


def _pf_velocity(score_fn: ScoreFn, schedule: Schedule) -> Velocity:
    """dx/dt = f x − ½ g² s of the probability-flow ODE at a scalar time t."""

    def velocity(x: Tensor, t: Tensor) -> Tensor:
        return schedule.probability_flow(x, t, score_at(score_fn, x, t))

    return velocity


def sample_ode(
    score_fn: ScoreFn,
    schedule: Schedule,
    x: Tensor,
    ts: Tensor,
    *,
    method: str = "rk4",
    rtol: float = 1e-5,
    atol: float = 1e-5,
    generator: torch.Generator | None = None,
    constraint: Constraint | None = None,
    callback: Callback | None = None,
) -> Tensor:
    """Probability-flow ODE sampling (Song et al. 2021, Sec. 4.3).

    ``method`` is a fixed-step tableau in ``TABLEAUX`` (``euler``, ``heun``, ``midpoint``,
    ``rk4``; NFE = stages × steps, ``constraint`` applied after each step) or an adaptive
    torchdiffeq solver in ``ADAPTIVE_METHODS`` (Chen et al. 2018; ``dopri5`` is Dormand &
    Prince 1980) with tolerances ``rtol``, ``atol``: it integrates in torch on ``x``'s device,
    returns the solution at every grid time, and takes no ``constraint``. ``generator`` is
    unused (the sampler is deterministic given x_T).
    """
    if method not in ODE_METHODS:
        raise ValueError(f"unknown ODE method {method!r}: choose one of {', '.join(ODE_METHODS)}")
    if not (rtol > 0 and atol > 0):
        raise ValueError(f"rtol and atol must be > 0, got rtol={rtol}, atol={atol}")
    velocity = _pf_velocity(score_fn, schedule)
    if method in TABLEAUX:
        tableau = TABLEAUX[method]
        for i in range(len(ts) - 1):
            x = rk_step(tableau, velocity, x, ts[i], ts[i + 1] - ts[i])
            x = apply_constraint(constraint, x, ts[i + 1])
            if callback is not None:
                callback(x, ts[i + 1])
        return x
    if constraint is not None:
        raise ValueError(
            f"an adaptive solver ({method}) cannot apply a constraint after each step: "
            f"use a fixed-step method ({', '.join(TABLEAUX)}) or sampler='dpm_solver'"
        )
    # step_t: land exactly on t_min; adaptive steps otherwise overshoot it and evaluate the
    # score outside [t_min, T] (torchdiffeq interpolates back to the output times).
    xs = torchdiffeq.odeint(
        lambda t, y: velocity(y, t),
        x,
        ts,
        method=method,
        rtol=rtol,
        atol=atol,
        options={"step_t": ts[-1:]},
    )  # (len(ts), B, ...)
    if callback is not None:
        for x_i, t_i in zip(xs[1:], ts[1:]):
            callback(x_i, t_i)
    return xs[-1]


# ---- DPM-Solver++: measured defaults --------------------------------------------------------
# All three are measured on the Gaussian oracle by benchmarks/bench_sampler_defaults.py
# (exact-law W2, VP and VE, D = 2 and 64; tables on docs/benchmarks/samplers.md).

#: ``order=None`` picks 3M from this many NFE on, 2M below: up to 12 NFE 3M is worse than 2M
#: (its quadratic extrapolation over three wide steps overshoots: 3.6× 2M's W2 at 10 NFE on
#: VP), from 15 NFE it wins on VP and VE in D = 2 and 64 at every NFE measured (up to 100).
DPM_3M_FROM_NFE = 15
#: Step counts at which the last steps lower their order (Lu et al. 2022's
#: "lower_order_final"): the final step is first order, the one before at most second. It
#: helps 2M from 8 steps (up to 17 % lower W2), is neutral from 20, hurts at 4–6 steps.
DPM_LOWER_ORDER_FINAL_STEPS = range(8, 15)
#: A multistep correction divides differences of x̂_0 by r = h_prev/h (in ℓ = log(α/σ)); a
#: step whose r falls below this drops to the next lower order instead (the error constant
#: grows like 1/r: a small step followed by a huge one, as on a uniform-t grid near t_min).
DPM_MIN_STEP_RATIO = 0.2


def dpm_solver_default_order(steps: int) -> int:
    """The order ``order=None`` resolves to: 3 (3M, steps + 1 NFE) when that reaches
    ``DPM_3M_FROM_NFE``, else 2 (2M)."""
    return 3 if steps + 1 >= DPM_3M_FROM_NFE else 2


def dpm_solver_orders(
    ell: Tensor,
    order: int,
    *,
    lower_order_final: bool = True,
    min_step_ratio: float = DPM_MIN_STEP_RATIO,
) -> tuple[int, ...]:
    """The order DPM-Solver++ uses at each of its ``len(ell) − 1`` steps.

    Args:
        ell: ``(N + 1,)`` half-log-SNR ℓ = λ/2 of the grid, increasing.
        order: the method's order, 1, 2 or 3. Order 3 starts with a midpoint step in ℓ
            (reported as order 2), so its step 1 already has three x̂_0 values.
        lower_order_final: with N in ``DPM_LOWER_ORDER_FINAL_STEPS`` (8 to 14) steps, step i
            uses at most order N − i (the last step is DDIM).
        min_step_ratio: a step of order k ≥ 2 whose spacing ratios r = (ℓ_j − ℓ_{j−1})/h
            (over the x̂_0 values it extrapolates from) include one below this uses order
            k − 1, and so on; 0 disables the guard.

    Returns:
        the N orders, e.g. ``(1, 2, 2, …)`` for 2M.
    """
    ell = ell.detach().to(torch.float64).cpu()
    n = ell.numel() - 1
    # ℓ of the x̂_0 evaluations in order: the grid points, plus the midpoint of the first
    # interval that 3M's start evaluates (it joins the history before ℓ_1).
    nodes = [float(v) for v in ell[:-1]]
    if order == 3:
        nodes.insert(1, float(ell[0] + 0.5 * (ell[1] - ell[0])))
    orders = []
    for i in range(n):
        if order == 3 and i == 0:
            orders.append(2)  # the midpoint start
            continue
        j = i + 1 if order == 3 else i  # index of ℓ_i among the nodes
        h = float(ell[i + 1] - ell[i])
        k = min(order, j + 1)
        if lower_order_final and n in DPM_LOWER_ORDER_FINAL_STEPS:
            k = min(k, n - i)
        while k >= 2:
            ratios = [(nodes[j - m] - nodes[j - m - 1]) / h for m in range(k - 1)]
            if min(ratios) >= min_step_ratio:
                break
            k -= 1
        orders.append(k)
    return tuple(orders)


def dpm_update(
    x: Tensor,
    x0: Tensor,
    hist: Sequence[tuple[Tensor, Tensor | float]],
    ell_i: Tensor | float,
    h: Tensor | float,
    sigma_ratio: Tensor | float,
    alpha: Tensor | float,
) -> Tensor:
    """One DPM-Solver++ update from ℓ_i to ℓ_i + h (either direction), of order
    ``len(hist) + 1``: x(ℓ) = (σ/σ_i) x + α ∫_{ℓ_i}^{ℓ} e^{−(ℓ−m)} x̂_0(m) dm with x̂_0 the
    polynomial through ``x0`` (at ℓ_i) and the ``hist`` values ``(x̂_0, ℓ)``, newest last:
    DDIM (none), 2M (one) or 3M (two; its φ-functions φ₁ = e^{−h} − 1, φ₂ = φ₁/h + 1,
    φ₃ = φ₂/h − ½). ``sigma_ratio`` = σ/σ_i and ``alpha`` = α at the target."""
    phi1 = torch.expm1(torch.as_tensor(-h, dtype=torch.float64))
    out = sigma_ratio * x - alpha * phi1 * x0
    if len(hist) == 1:
        x0_1, ell_1 = hist[-1]
        r0 = (ell_i - ell_1) / h
        out = out - (0.5 * alpha * phi1 / r0) * (x0 - x0_1)
    elif len(hist) == 2:
        (x0_2, ell_2), (x0_1, ell_1) = hist
        r0, r1 = (ell_i - ell_1) / h, (ell_1 - ell_2) / h
        d1_0, d1_1 = (x0 - x0_1) / r0, (x0_1 - x0_2) / r1
        d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)  # h x̂_0' + O(h³)
        d2 = 2 * (d1_0 - d1_1) / (r0 + r1)  # h² x̂_0'' + O(h³)
        phi2 = phi1 / h + 1
        phi3 = phi2 / h - 0.5
        out = out + alpha * (phi2 * d1 - phi3 * d2)
    elif hist:
        raise ValueError(f"DPM-Solver++ has orders 1 to 3: got {len(hist)} past values")
    return out


def sample_dpm_solver(
    score_fn: ScoreFn,
    schedule: Schedule,
    x: Tensor,
    ts: Tensor,
    *,
    order: int | None = None,
    lower_order_final: bool = True,
    min_step_ratio: float = DPM_MIN_STEP_RATIO,
    generator: torch.Generator | None = None,
    constraint: Constraint | None = None,
    callback: Callback | None = None,
) -> Tensor:
    """DPM-Solver++ (Lu et al. 2022): multistep exponential integrator of the probability-flow
    ODE in log-SNR time with data prediction x̂_0, for any schedule.

    With ℓ = log(α/σ) and h = ℓ_s − ℓ_t, the exact step is
    x_s = (σ_s/σ_t) x_t + α_s ∫ e^{−(ℓ_s−ℓ)} x̂_0(ℓ) dℓ; ``order=2`` (2M) extrapolates x̂_0 from
    the last two evaluations, ``order=3`` (3M) from the last three (a quadratic in ℓ, with the
    φ-functions φ₁ = e^{−h} − 1, φ₂ = φ₁/h + 1, φ₃ = φ₂/h − ½ of the DPM-Solver++(3M)
    update). ``order=1`` is DDIM. 2M starts with one DDIM step (its O(h²) local error keeps
    global order 2). A multistep method of order 3 needs a start that accurate too, so 3M
    starts with one midpoint step in ℓ (DPM-Solver-2, one extra evaluation at ℓ_0 + h/2 whose
    x̂_0 joins the history): NFE = steps for orders 1 and 2, steps + 1 for order 3.

    ``order=None`` picks :func:`dpm_solver_default_order` (3M from ``DPM_3M_FROM_NFE`` NFE).
    The order of each step comes from :func:`dpm_solver_orders`: lower at the end for 8 to 14
    steps (``lower_order_final``) and wherever the step-size ratio is below
    ``min_step_ratio``. Best with ``grid="logsnr"`` (the default in :func:`sample`).
    """
    if order is None:
        order = dpm_solver_default_order(len(ts) - 1)
    if isinstance(order, bool) or order not in (1, 2, 3):
        raise ValueError(f"order must be 1, 2 or 3 (or None for the default), got {order!r}")
    if not 0 <= min_step_ratio < 1:
        raise ValueError(f"min_step_ratio must be in [0, 1), got {min_step_ratio}")
    vals = schedule(ts)
    alpha, sigma, ell = vals.alpha, vals.sigma, 0.5 * vals.log_snr  # ℓ = log(α/σ)
    orders = dpm_solver_orders(
        ell, order, lower_order_final=lower_order_final, min_step_ratio=min_step_ratio
    )
    hist: list[tuple[Tensor, Tensor]] = []  # (x̂_0, ℓ) of the last evaluations, newest last
    for i, k in enumerate(orders):
        x0 = x0_from_score(score_at(score_fn, x, ts[i]), schedule, x, ts[i])
        h, ell_i = ell[i + 1] - ell[i], ell[i]
        phi1 = torch.expm1(-h)
        if order == 3 and i == 0:  # midpoint start: local error O(h³)
            ell_m = ell[0] + 0.5 * h
            t_m = schedule.t_of_log_snr(2 * ell_m).to(ts.dtype)
            v_m = schedule(t_m)
            x_m = (v_m.sigma / sigma[0]) * x - v_m.alpha * torch.expm1(-0.5 * h) * x0
            x_m = apply_constraint(constraint, x_m, t_m)
            x0_m = x0_from_score(score_at(score_fn, x_m, t_m), schedule, x_m, t_m)
            x_next = (sigma[1] / sigma[0]) * x - alpha[1] * phi1 * x0_m
            hist = [(x0, ell[0])]
            x0 = x0_m
            ell_i = ell_m
        else:
            past = hist[len(hist) - (k - 1) :] if k > 1 else []
            x_next = dpm_update(x, x0, past, ell_i, h, sigma[i + 1] / sigma[i], alpha[i + 1])
        x = apply_constraint(constraint, x_next, ts[i + 1])
        hist = [*hist[-1:], (x0, ell_i)]
        if callback is not None:
            callback(x, ts[i + 1])
    return x
