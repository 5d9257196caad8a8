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
    generator: torch.Generator | None = None,
    constraint: Constraint | None = None,
    callback: Callback | None = None,
) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2): second-order multistep exponential integrator
    of the probability-flow ODE in log-SNR time with data prediction, for any schedule; the
    first step is first order (DDIM). NFE = steps. Best with ``grid="logsnr"`` or ``"edm"``.
    """
    vals = schedule(ts)
    alpha, sigma, ell = vals.alpha, vals.sigma, 0.5 * vals.log_snr  # ℓ = log(α/σ)
    x0_prev, h_prev = None, None
    for i in range(len(ts) - 1):
        x0 = x0_from_score(score_at(score_fn, x, ts[i]), schedule, x, ts[i])
        h = ell[i + 1] - ell[i]
        if x0_prev is None:
            d = x0
        else:
            r = h_prev / h
            d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * x0_prev
        x = (sigma[i + 1] / sigma[i]) * x - (alpha[i + 1] * torch.expm1(-h)) * d
        x = _apply(constraint, x, ts[i + 1])
        x0_prev, h_prev = x0, h
        if callback is not None:
            callback(x, ts[i + 1])
    return x
