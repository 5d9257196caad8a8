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

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torchdiffeq
from torch import Tensor

from sdelab.samplers.stochastic import (
    Callback,
    Constraint,
    ScoreFn,
    _apply,
    score_at,
    x0_from_score,
)
from sdelab.sde import Schedule

__all__ = [
    "ADAPTIVE_METHODS",
    "ODE_METHODS",
    "TABLEAUX",
    "ButcherTableau",
    "rk_step",
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
ADAPTIVE_METHODS: tuple[str, ...] = ("dopri5", "dopri8", "bosh3", "fehlberg2", "adaptive_heun")
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
            x = _apply(constraint, x, ts[i + 1])
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


def sample_dpm_solver(
    score_fn: ScoreFn,
    schedule: Schedule,
    x: Tensor,
    ts: Tensor,
    *,
    order: int = 2,
    generator: torch.Generator | None = None,
    constraint: Constraint | None = None,
    callback: Callback | None = None,
) -> Tensor:
    """DPM-Solver++ (Lu et al. 2022): multistep exponential integrator of the probability-flow
    ODE in log-SNR time with data prediction x̂_0, for any schedule. NFE = steps.

    With ℓ = log(α/σ) and h = ℓ_s − ℓ_t, the exact step is
    x_s = (σ_s/σ_t) x_t + α_s ∫ e^{−(ℓ_s−ℓ)} x̂_0(ℓ) dℓ; ``order=2`` (2M) extrapolates x̂_0 from
    the last two evaluations, ``order=3`` (3M) from the last three (a quadratic in ℓ, with the
    φ-functions φ₁ = e^{−h} − 1, φ₂ = φ₁/h + 1, φ₃ = φ₂/h − ½ of the DPM-Solver++(3M)
    update). ``order=1`` is DDIM. 2M starts with one DDIM step (its O(h²) local error keeps
    global order 2). A multistep method of order 3 needs a start that accurate too, so 3M
    starts with one midpoint step in ℓ (DPM-Solver-2, one extra evaluation at ℓ_0 + h/2 whose
    x̂_0 joins the history): NFE = steps for orders 1 and 2, steps + 1 for order 3. Best with
    ``grid="logsnr"`` or ``"edm"``.
    """
    if isinstance(order, bool) or order not in (1, 2, 3):
        raise ValueError(f"order must be 1, 2 or 3, got {order!r}")
    vals = schedule(ts)
    alpha, sigma, ell = vals.alpha, vals.sigma, 0.5 * vals.log_snr  # ℓ = log(α/σ)
    hist: list[tuple[Tensor, Tensor]] = []  # (x̂_0, ℓ) of the last evaluations, newest last
    for i in range(len(ts) - 1):
        x0 = x0_from_score(score_at(score_fn, x, ts[i]), schedule, x, ts[i])
        h, ell_i = ell[i + 1] - ell[i], ell[i]
        phi1 = torch.expm1(-h)
        k = min(order, len(hist) + 1)
        x_next = (sigma[i + 1] / sigma[i]) * x - alpha[i + 1] * phi1 * x0
        if order == 3 and i == 0:  # midpoint start: local error O(h³)
            ell_m = ell[0] + 0.5 * h
            t_m = schedule.t_of_log_snr(2 * ell_m).to(ts.dtype)
            v_m = schedule(t_m)
            x_m = (v_m.sigma / sigma[0]) * x - v_m.alpha * torch.expm1(-0.5 * h) * x0
            x_m = _apply(constraint, x_m, t_m)
            x0_m = x0_from_score(score_at(score_fn, x_m, t_m), schedule, x_m, t_m)
            x_next = (sigma[1] / sigma[0]) * x - alpha[1] * phi1 * x0_m
            hist = [(x0, ell[0])]
            x0 = x0_m
            ell_i = ell_m
        elif k == 2:
            r0 = (ell_i - hist[-1][1]) / h
            x_next = x_next - (0.5 * alpha[i + 1] * phi1 / r0) * (x0 - hist[-1][0])
        elif k == 3:
            (x0_2, ell_2), (x0_1, ell_1) = hist[-2], hist[-1]
            r0, r1 = (ell_i - ell_1) / h, (ell_1 - ell_2) / h
            d1_0, d1_1 = (x0 - x0_1) / r0, (x0_1 - x0_2) / r1
            d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)  # h x̂_0' + O(h³)
            d2 = 2 * (d1_0 - d1_1) / (r0 + r1)  # h² x̂_0'' + O(h³)
            phi2 = phi1 / h + 1
            phi3 = phi2 / h - 0.5
            x_next = x_next + alpha[i + 1] * (phi2 * d1 - phi3 * d2)
        x = _apply(constraint, x_next, ts[i + 1])
        hist = [*hist[-1:], (x0, ell_i)]
        if callback is not None:
            callback(x, ts[i + 1])
    return x
