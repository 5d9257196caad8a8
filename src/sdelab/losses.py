r"""Weighted denoising score matching and the time samplers that go with it.

The per-example loss estimates the time integral

    L(x_0) = ½ ∫_{t_min}^{T} w(t) E_ε ‖s_θ(x_t, t) − ∇ log p_{0t}(x_t | x_0)‖² dt,
    ∇ log p_{0t}(x_t | x_0) = −ε/σ_t,

which is computed in ε-space for stability, ½ (w(t)/σ_t²) ‖ε̂ − ε‖², with ε̂ obtained from any
network output kind through :mod:`sdelab.parametrization`. Weightings:

- ``"score-matching"``: w = σ² (Song & Ermon), giving ½‖ε̂ − ε‖², DDPM's "simple" loss;
- ``"likelihood"``:    w = g² (ScoreFlow); then L(x_0) plus prior and boundary terms bounds
  −log p(x_0), and L equals VDM's continuous diffusion loss ½∫ γ'(t)‖ε − ε̂‖² dt since
  g²/σ² = −dλ/dt = γ'(t);
- any callable ``w(vals) -> (B,)`` of the :class:`~sdelab.sde.ScheduleOutput`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from sdelab.parametrization import to_eps
from sdelab.sde import Schedule, ScheduleOutput
from sdelab.utils import append_dims, randn_like, sum_except_batch

__all__ = [
    "TIME_SAMPLERS",
    "WEIGHTINGS",
    "DSMOutput",
    "TimeSample",
    "draw_uniforms",
    "dsm_loss",
    "sample_time",
    "sdeflow_dsm",
]

Weighting = Literal["score-matching", "likelihood"] | Callable[[ScheduleOutput], Tensor]

#: Named weightings w(t) as functions of the schedule values.
WEIGHTINGS: dict[str, Callable[[ScheduleOutput], Tensor]] = {
    "score-matching": lambda v: v.sigma**2,
    "likelihood": lambda v: v.g2,
}

TIME_SAMPLERS: tuple[str, ...] = ("uniform", "importance")


@dataclass(frozen=True)
class TimeSample:
    """Times and their integration weights: ``weight * h(t)`` is unbiased for ∫_{t_min}^T h dt.

    ``weight = 1/q(t)`` for the sampling density q; uniform sampling gives T − t_min.
    """

    t: Tensor
    weight: Tensor


def draw_uniforms(
    n: int, low_discrepancy: bool, generator: torch.Generator | None, device, dtype
) -> Tensor:
    """``n`` draws from U[0, 1): independent, or (``low_discrepancy``) VDM's evenly spaced
    points u0 + i/n mod 1 with one random offset u0."""
    if low_discrepancy:
        # VDM's antithetic/low-discrepancy draw: one shared offset, evenly spaced in [0, 1).
        u0 = torch.rand((), generator=generator, dtype=dtype, device=device)
        return torch.remainder(u0 + torch.arange(n, dtype=dtype, device=device) / n, 1.0)
    return torch.rand(n, generator=generator, dtype=dtype, device=device)


def sample_time(
    schedule: Schedule,
    n: int,
    *,
    method: str = "uniform",
    low_discrepancy: bool = False,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> TimeSample:
    r"""Draw ``n`` times in [t_min, T] with their importance weights.

    ``method="uniform"``: t ~ U[t_min, T], weight T − t_min.

    ``method="importance"``: t has density q(t) ∝ g(t)²/σ(t)², the density that makes the
    likelihood-weighted integrand flat in its time factor (ScoreFlow's importance sampling,
    sdeflow-light's ``--debias``). Derivation: for every schedule g²/σ² = −dλ/dt, so

        q(t) = −λ'(t) / Λ,    Λ = λ(t_min) − λ(T),
        F(t) = ∫_{t_min}^t q = (λ(t_min) − λ(t)) / Λ,

    i.e. *λ(t) is uniform on [λ(T), λ(t_min)]*. Inverting the CDF, u ~ U[0, 1) gives

        t = t(λ(t_min) − u Λ),

    with t(λ) the schedule's inverse log-SNR (closed-form for the built-in schedules,
    bisection otherwise). The weight is 1/q(t) = Λ σ²/g², so the likelihood-weighted loss
    term ½ w/σ² ‖ε̂ − ε‖² · weight with w = g² collapses to ½ Λ ‖ε̂ − ε‖²: the same expectation
    as with uniform t and a far smaller variance, because the 1/σ² blow-up near t_min is
    absorbed into the sampling density.

    ``low_discrepancy=True`` replaces i.i.d. uniforms by VDM's evenly spaced draws
    u_i = (u_0 + i/n) mod 1, before either mapping.
    """
    if method not in TIME_SAMPLERS:
        raise ValueError(
            f"unknown time sampler {method!r}: choose one of {', '.join(TIME_SAMPLERS)}"
        )
    dtype = dtype or torch.get_default_dtype()
    u = draw_uniforms(n, low_discrepancy, generator, device, dtype)
    if method == "uniform":
        t = schedule.t_min + (schedule.T - schedule.t_min) * u
        return TimeSample(t, torch.full_like(t, schedule.T - schedule.t_min))
    ends = torch.tensor([schedule.t_min, schedule.T], dtype=dtype, device=u.device)
    lam_hi, lam_lo = schedule.log_snr(ends).unbind()
    big_lambda = lam_hi - lam_lo
    t = schedule.t_of_log_snr(lam_hi - u * big_lambda).clamp(schedule.t_min, schedule.T)
    return TimeSample(t, big_lambda / -schedule.d_log_snr(t))


@dataclass(frozen=True)
class DSMOutput:
    """Per-example loss ``(B,)`` and what produced it (for diagnostics and tests)."""

    loss: Tensor
    t: Tensor
    weight: Tensor
    noise: Tensor
    eps_hat: Tensor


def dsm_loss(
    net: Callable[[Tensor, Tensor], Tensor],
    schedule: Schedule,
    x0: Tensor,
    *,
    parametrization: str = "eps",
    weighting: Weighting = "score-matching",
    time_sampling: str = "uniform",
    low_discrepancy: bool = False,
    generator: torch.Generator | None = None,
    time: TimeSample | None = None,
    noise: Tensor | None = None,
) -> DSMOutput:
    """Per-example weighted denoising score-matching loss (see the module docstring).

    Args:
        net: ``net(x_t, t)`` predicting ``parametrization`` (``score``, ``eps``, ``x0``, ``v``
            or ``drift``); a plain ``score_fn`` with ``parametrization="score"`` works too.
        schedule: the forward process.
        x0: clean data, shape ``(B, ...)``.
        weighting: ``"score-matching"`` (σ²), ``"likelihood"`` (g²) or ``w(vals) -> (B,)``.
        time_sampling: ``"uniform"`` or ``"importance"`` (density ∝ g²/σ², see
            :func:`sample_time`); ignored when ``time`` is given.
        low_discrepancy: VDM's evenly spaced times.
        generator: the source of all randomness (times and noise).
        time, noise: fixed draws, to evaluate the loss on given (t, ε).

    Returns:
        :class:`DSMOutput` whose ``loss`` has shape ``(B,)``; average it for training.
    """
    if isinstance(weighting, str):
        if weighting not in WEIGHTINGS:
            raise ValueError(
                f"unknown weighting {weighting!r}: choose one of {', '.join(WEIGHTINGS)} "
                "or pass a callable w(schedule_values)"
            )
        weight_fn = WEIGHTINGS[weighting]
    elif callable(weighting):
        weight_fn = weighting
    else:
        raise ValueError("weighting must be a name or a callable w(schedule_values)")
    b = x0.shape[0]
    if time is None:
        time = sample_time(
            schedule,
            b,
            method=time_sampling,
            low_discrepancy=low_discrepancy,
            generator=generator,
            device=x0.device,
            dtype=x0.dtype,
        )
    if time.t.shape != (b,):
        raise ValueError(f"need one time per example: t has shape {tuple(time.t.shape)}, B={b}")
    if noise is None:
        noise = randn_like(x0, generator)
    elif noise.shape != x0.shape:
        raise ValueError(f"noise shape {tuple(noise.shape)} differs from data {tuple(x0.shape)}")
    vals = schedule(time.t)
    x_t = append_dims(vals.alpha, x0.ndim) * x0 + append_dims(vals.sigma, x0.ndim) * noise
    eps_hat = to_eps(net(x_t, time.t), parametrization, x_t, vals)
    lam = weight_fn(vals) / vals.sigma**2
    loss = 0.5 * time.weight * lam * sum_except_batch((eps_hat - noise) ** 2)
    return DSMOutput(loss=loss, t=time.t, weight=time.weight, noise=noise, eps_hat=eps_hat)


def sdeflow_dsm(
    drift_net: Callable[[Tensor, Tensor], Tensor],
    schedule: Schedule,
    x0: Tensor,
    *,
    debias: bool = False,
    generator: torch.Generator | None = None,
) -> Tensor:
    """sdeflow-light's ``dsm``: ½‖a σ/g + ε‖² with the network predicting the drift a = g·s.

    ``debias=False`` draws t uniformly (score-matching weighting); ``debias=True`` draws t with
    density ∝ g²/σ², which turns the same integrand into the likelihood-weighted loss. Both
    equal sdeflow-light's per-example loss times a positive constant (T − t_min, resp. Λ), so
    the gradients point the same way. Returns the per-example loss ``(B,)``.
    """
    return dsm_loss(
        drift_net,
        schedule,
        x0,
        parametrization="drift",
        weighting="likelihood" if debias else "score-matching",
        time_sampling="importance" if debias else "uniform",
        generator=generator,
    ).loss
