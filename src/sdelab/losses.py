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
import torch.nn.functional as F
from torch import Tensor

from sdelab.parametrization import to_eps
from sdelab.sde import Schedule, ScheduleOutput
from sdelab.utils import append_dims, randn_like, sum_except_batch

__all__ = [
    "SECOND_ORDER_FORMS",
    "TIME_SAMPLERS",
    "WEIGHTINGS",
    "DSMOutput",
    "HighOrderDSMOutput",
    "HighOrderResiduals",
    "TimeSample",
    "draw_uniforms",
    "dsm_loss",
    "high_order_dsm_loss",
    "high_order_residuals",
    "rademacher_like",
    "sample_time",
    "sdeflow_dsm",
]

Weighting = Literal["score-matching", "likelihood"] | Callable[[ScheduleOutput], Tensor]

#: Named weightings w(t) as functions of the schedule values.
WEIGHTINGS: dict[str, Callable[[ScheduleOutput], Tensor]] = {
    "score-matching": lambda v: v.sigma**2,
    "likelihood": lambda v: v.g2,
}

TIME_SAMPLERS: tuple[str, ...] = ("uniform", "importance", "importance-velocity")


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
    time_sampling: str = "uniform",
    low_discrepancy: bool = False,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> TimeSample:
    r"""Draw ``n`` times in [t_min, T] with their importance weights.

    ``time_sampling="uniform"``: t ~ U[t_min, T], weight T − t_min.

    ``time_sampling="importance"``: t has density q(t) ∝ g(t)²/σ(t)², the density that makes the
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

    ``time_sampling="importance-velocity"``: i-DODE's density (Zheng et al. 2023) q(t) ∝
    −λ'(t) sigmoid(λ(t)), i.e. λ has density ∝ sigmoid(λ) = α²/(α² + σ²) on [λ(T), λ(t_min)].
    For a variance-preserving schedule sigmoid(λ) = α², and the likelihood-weighted loss in
    Salimans & Ho's v, ½ (g²/σ²) α² ‖v̂ − v‖², gets a constant weight: i-DODE's ½ Z ‖v̂ − v‖².
    The CDF in λ is softplus, so t = t(softplus⁻¹(softplus(λ(t_min)) − u Z)) with
    Z = softplus(λ(t_min)) − softplus(λ(T)), and the weight is Z / (−λ'(t) sigmoid(λ(t))).

    ``low_discrepancy=True`` replaces i.i.d. uniforms by VDM's evenly spaced draws
    u_i = (u_0 + i/n) mod 1, before any mapping.
    """
    if time_sampling not in TIME_SAMPLERS:
        raise ValueError(
            f"unknown time sampler {time_sampling!r}: choose one of {', '.join(TIME_SAMPLERS)}"
        )
    dtype = dtype or torch.get_default_dtype()
    u = draw_uniforms(n, low_discrepancy, generator, device, dtype)
    if time_sampling == "uniform":
        t = schedule.t_min + (schedule.T - schedule.t_min) * u
        return TimeSample(t, torch.full_like(t, schedule.T - schedule.t_min))
    ends = torch.tensor([schedule.t_min, schedule.T], dtype=dtype, device=u.device)
    lam_hi, lam_lo = schedule.log_snr(ends).unbind()
    if time_sampling == "importance-velocity":
        # in float64: softplus(λ_hi) − u Z cancels for u near 1
        sp_hi, sp_lo = F.softplus(lam_hi.double()), F.softplus(lam_lo.double())
        z = sp_hi - sp_lo
        y = sp_hi - u.double() * z  # softplus(λ), in (softplus(λ_lo), softplus(λ_hi)]
        lam = torch.where(y > 20, y + torch.log1p(-torch.exp(-y)), torch.log(torch.expm1(y)))
        t = schedule.t_of_log_snr(lam.to(dtype)).clamp(schedule.t_min, schedule.T)
        density = -schedule.d_log_snr(t) * torch.sigmoid(schedule.log_snr(t))
        return TimeSample(t, z.to(dtype) / density)
    big_lambda = lam_hi - lam_lo
    t = schedule.t_of_log_snr(lam_hi - u * big_lambda).clamp(schedule.t_min, schedule.T)
    return TimeSample(t, big_lambda / -schedule.d_log_snr(t))


def _weight_fn(weighting: Weighting) -> Callable[[ScheduleOutput], Tensor]:
    if isinstance(weighting, str):
        if weighting not in WEIGHTINGS:
            raise ValueError(
                f"unknown weighting {weighting!r}: choose one of {', '.join(WEIGHTINGS)} "
                "or pass a callable w(schedule_values)"
            )
        return WEIGHTINGS[weighting]
    if callable(weighting):
        return weighting
    raise ValueError("weighting must be a name or a callable w(schedule_values)")


@dataclass(frozen=True)
class DSMOutput:
    """Per-example loss ``(B,)`` and what produced it (for diagnostics and tests)."""

    loss: Tensor
    t: Tensor
    weight: Tensor
    noise: Tensor
    eps_hat: Tensor


def _time_and_noise(
    schedule: Schedule,
    x0: Tensor,
    time: TimeSample | None,
    noise: Tensor | None,
    time_sampling: str,
    low_discrepancy: bool,
    generator: torch.Generator | None,
) -> tuple[TimeSample, Tensor]:
    """The denoising losses' (t, weight) per example and their noise ε: drawn where not given
    (times first, then noise, from ``generator``), checked where given."""
    b = x0.shape[0]
    if time is None:
        time = sample_time(
            schedule,
            b,
            time_sampling=time_sampling,
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
    return time, noise


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
    weight_fn = _weight_fn(weighting)
    time, noise = _time_and_noise(
        schedule, x0, time, noise, time_sampling, low_discrepancy, generator
    )
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


# ---- high-order denoising score matching (Lu et al. 2022) ------------------------------------
SCORE_MATCHING_ORDERS: tuple[int, ...] = (1, 2, 3)
SECOND_ORDER_FORMS: tuple[str, ...] = ("full", "trace")


@dataclass(frozen=True)
class HighOrderResiduals:
    """The residuals of the second- and third-order DSM terms, flattened to ``(B, D)``.

    With ℓ = σ ŝ + ε (ŝ the model's score, its gradient stopped) each residual's mean given
    (x_t, v) vanishes when the model's score, Jacobian and ∇ of its trace are exact (see
    :func:`high_order_dsm_loss`). ``frobenius`` ``(B, D)``: σ² J v + v − (ℓ·v) ℓ (``None`` for
    the trace form); ``trace`` ``(B,)``: σ² v·Jv + v·v − (ℓ·v)² (full form) or
    σ² v·Jv + D − ‖ℓ‖² (trace form); ``third`` ``(B, D)`` or ``None`` below order 3.
    """

    frobenius: Tensor | None
    trace: Tensor
    third: Tensor | None


def high_order_residuals(
    score: Tensor,
    jvp: Tensor,
    noise: Tensor,
    probe: Tensor,
    sigma: Tensor,
    *,
    grad_vjv: Tensor | None = None,
    second_order_form: str = "full",
) -> HighOrderResiduals:
    r"""Residuals of Lu et al.'s second- and third-order DSM, given the model's derivatives.

    Args:
        score: the model's score ŝ(x_t) ``(B, D)``; only its value is used (ℓ = σ ŝ + ε).
        jvp: J v = ∇_x ŝ(x_t) v for the probe v, ``(B, D)``; gradients flow through it.
        noise: ε ``(B, D)``.  probe: v ``(B, D)`` with E[v vᵀ] = I (Rademacher).
        sigma: σ_t ``(B,)``.
        grad_vjv: ∇_x (v·J v) ``(B, D)`` for the third order (``None``: second order only).
        second_order_form: ``"full"`` (Frobenius + trace terms, Lu et al.) or ``"trace"``
            (the trace term with the exact ‖ℓ‖², i-DODE's second-order flow matching).

    Returns:
        :class:`HighOrderResiduals`.
    """
    if second_order_form not in SECOND_ORDER_FORMS:
        raise ValueError(
            f"unknown second_order_form {second_order_form!r}: choose one of "
            f"{', '.join(SECOND_ORDER_FORMS)}"
        )
    sig = sigma[:, None]
    ell = sig * score.detach() + noise  # ℓ = σ ŝ + ε, a stopped target
    ell_v = (ell * probe).sum(1, keepdim=True)  # (B, 1)
    vjv = (probe * jvp).sum(1)  # (B,)
    vv = (probe * probe).sum(1)
    s2 = sigma**2
    if second_order_form == "full":
        frobenius = s2[:, None] * jvp + probe - ell_v * ell
        trace = s2 * vjv + vv - ell_v[:, 0] ** 2
    else:
        frobenius = None
        trace = s2 * vjv + probe.shape[1] - (ell * ell).sum(1)
    third = None
    if grad_vjv is not None:
        jv_sg, vjv_sg = jvp.detach(), vjv.detach()[:, None]
        third = (
            sig**3 * grad_vjv
            + ell_v**2 * ell
            - (s2[:, None] * vjv_sg + vv[:, None]) * ell
            - 2 * ell_v * (s2[:, None] * jv_sg + probe)
        )
    return HighOrderResiduals(frobenius=frobenius, trace=trace, third=third)


@dataclass(frozen=True)
class HighOrderDSMOutput:
    """Per-example ``loss`` ``(B,)`` = ½ W (first + λ (second + third)), its terms (each
    ``(B,)``, before the time weight W and λ) and the draws that produced it."""

    loss: Tensor
    first: Tensor
    second: Tensor
    third: Tensor
    t: Tensor
    weight: Tensor
    noise: Tensor
    probe: Tensor


def rademacher_like(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """±1 with probability ½ each, shaped like ``x``."""
    bits = torch.randint(0, 2, x.shape, generator=generator, device=x.device)
    return (2 * bits - 1).to(x.dtype)


def high_order_dsm_loss(
    net: Callable[[Tensor, Tensor], Tensor],
    schedule: Schedule,
    x0: Tensor,
    *,
    order: int = 2,
    parametrization: str = "eps",
    weighting: Weighting = "likelihood",
    high_order_weight: float = 1.0,
    second_order_form: str = "full",
    time_sampling: str = "uniform",
    low_discrepancy: bool = False,
    generator: torch.Generator | None = None,
    time: TimeSample | None = None,
    noise: Tensor | None = None,
    probe: Tensor | None = None,
) -> HighOrderDSMOutput:
    r"""High-order denoising score matching (Lu, Zheng, Bao, Chen, Li & Zhu 2022): first-order
    DSM bounds the reverse SDE's likelihood; adding the second- and third-order terms also
    bounds the gap to the probability-flow ODE's likelihood.

    With x_t = α x_0 + σ ε, ŝ the model's score and ℓ = σ ŝ + ε (ŝ's gradient stopped), the
    true score s satisfies (the posterior of ε given x_t has mean −σ s, covariance
    C = I + σ² ∇s and third cumulant −σ³ ∇³ log p_t):

        second order:  σ² ∇s + I = E[ℓ ℓᵀ | x_t],
        trace:         σ² tr ∇s + D = E[‖ℓ‖² | x_t],
        third order:   σ³ ∇ tr ∇s = −E[‖ℓ‖² ℓ − (σ² tr ∇ŝ + D) ℓ − 2 (σ² ∇ŝ + I) ℓ | x_t],

    and with ŝ = s + δ the targets' errors are σ² δδᵀ and σ³ ‖δ‖² δ: bounded by the first-order
    error (the terms with ∇ŝ in the third-order target cancel its first-order bias). Each is
    matched in mean square with one Rademacher probe v (Hutchinson) on J = ∇ŝ (J v by forward-
    mode autodiff, ∇(v·J v) by reverse mode over it; see :func:`high_order_residuals`):

        first  = ‖σ ŝ + ε‖²                                        (= ‖ε̂ − ε‖²)
        second = ((σ² v·Jv + v·v − (ℓ·v)²)² + ‖σ² Jv + v − (ℓ·v) ℓ‖²) / D    (form "full")
               = (σ² v·Jv + D − ‖ℓ‖²)² / D                         (form "trace")
        third  = ‖σ³ ∇(v·Jv) + (ℓ·v)² ℓ − (σ² v·Jv + v·v) ℓ − 2 (ℓ·v)(σ² Jv + v)‖² / D²

    (the normalisation by D and D² is that of Lu et al.'s code relative to the first-order
    sum), all with the first-order time weight W = weight(t) · w(t)/σ² (with likelihood
    weighting and importance-sampled t, as in the paper, a constant), so the per-example loss
    is ½ W (first + λ (second + third)) with λ = ``high_order_weight``. Form ``"trace"`` is
    i-DODE's error-bounded second-order flow matching (Zheng et al. 2023, fine-tuning with
    λ = 0.1): the same trace identity written in the velocity.

    Args:
        net: ``net(x_t, t)`` predicting ``parametrization`` (any kind of
            :mod:`sdelab.parametrization`); it is differentiated in x_t.
        schedule: the forward process.  x0: clean data ``(B, ...)``.
        order: 1, 2 or 3 (1 is :func:`dsm_loss`'s loss).
        weighting, time_sampling, low_discrepancy, generator, time, noise: as in
            :func:`dsm_loss`; ``probe``: a fixed v (default Rademacher from ``generator``,
            drawn after the noise).
        high_order_weight: λ ≥ 0.
        second_order_form: ``"full"`` or ``"trace"``.

    Orders 2 and 3 run the network in full precision even under ``torch.autocast`` (forward-
    mode autodiff has no autocast rules).

    Returns:
        :class:`HighOrderDSMOutput`; average ``loss`` for training.

    Raises:
        ValueError: bad order, form, weight or shapes.
    """
    if order not in SCORE_MATCHING_ORDERS:
        raise ValueError(f"score matching order {order!r}: choose one of 1, 2, 3")
    if high_order_weight < 0:
        raise ValueError(f"high_order_weight must be >= 0, got {high_order_weight}")
    if second_order_form not in SECOND_ORDER_FORMS:
        raise ValueError(
            f"unknown second_order_form {second_order_form!r}: choose one of "
            f"{', '.join(SECOND_ORDER_FORMS)}"
        )
    weight_fn = _weight_fn(weighting)
    time, noise = _time_and_noise(
        schedule, x0, time, noise, time_sampling, low_discrepancy, generator
    )
    b = x0.shape[0]
    if probe is None:
        probe = rademacher_like(x0, generator)
    elif probe.shape != x0.shape:
        raise ValueError(f"probe shape {tuple(probe.shape)} differs from data {tuple(x0.shape)}")
    vals = schedule(time.t)
    sigma = append_dims(vals.sigma, x0.ndim)
    x_t = append_dims(vals.alpha, x0.ndim) * x0 + sigma * noise

    def score_of(x: Tensor) -> Tensor:
        return -to_eps(net(x, time.t), parametrization, x, vals) / sigma

    zero = torch.zeros(b, dtype=x0.dtype, device=x0.device)
    grad_vjv = None
    if order == 1:
        score, jvp = score_of(x_t), None
    else:
        # forward-mode autodiff has no autocast rules: the derivatives run in full precision
        with torch.autocast(x0.device.type, enabled=False):
            x_in = x_t.detach().requires_grad_(True) if order == 3 else x_t
            score, jvp = torch.func.jvp(score_of, (x_in,), (probe,))
            if order == 3:
                vjv = (probe * jvp).sum()
                (grad_vjv,) = torch.autograd.grad(vjv, x_in, create_graph=True)
    flat = (b, -1)
    first = sum_except_batch((sigma * score + noise) ** 2)
    second = third = zero
    if jvp is not None:
        res = high_order_residuals(
            score.reshape(flat),
            jvp.reshape(flat),
            noise.reshape(flat),
            probe.reshape(flat),
            vals.sigma,
            grad_vjv=None if grad_vjv is None else grad_vjv.reshape(flat),
            second_order_form=second_order_form,
        )
        d = float(noise[0].numel())
        second = res.trace**2 / d
        if res.frobenius is not None:
            second = second + (res.frobenius**2).sum(1) / d
        if res.third is not None:
            third = (res.third**2).sum(1) / d**2
    w = time.weight * weight_fn(vals) / vals.sigma**2
    loss = 0.5 * w * (first + high_order_weight * (second + third))
    return HighOrderDSMOutput(
        loss=loss,
        first=first,
        second=second,
        third=third,
        t=time.t,
        weight=time.weight,
        noise=noise,
        probe=probe,
    )
