r"""Variational diffusion models (Kingma et al. 2021): the VLB in nats and bits/dim.

For a variance-preserving schedule with γ_t = −λ_t on t ∈ [0, 1] and data x,

    −log p(x) ≤ VLB(x) = KL(q(z_1|x) ‖ N(0, I))          prior term
                       + E_q[−log p(x | z_0)]              reconstruction term
                       + L_T(x)                            diffusion term

with the diffusion term in continuous time (T = ∞)

    L_∞(x) = ½ E_{t~U[0,1], ε} [γ'(t) ‖ε − ε̂(z_t; t)‖²]

— which is :func:`sdelab.losses.dsm_loss` with likelihood weighting, written once there — or
with T discrete steps s = t − 1/T (VDM eq. 13 in ε-form)

    L_T(x) = ½ T E_{i~U{1..T}, ε} [expm1(γ_t − γ_s) ‖ε − ε̂(z_t; t)‖²].

Discrete data with L levels k ∈ {0..L−1} sit at the bin centres x_k = (2k + 1)/L − 1 in
[−1, 1], and the decoder is VDM's p(x_k | z_0) ∝ q(z_0 | x_k) = N(z_0; α_0 x_k, σ_0²)
normalised over the L levels, so the VLB bounds the *discrete* −log P(k) and needs no
dequantization. For continuous data (the Gaussian oracle) the decoder is the density
N(x; z_0/α_0, σ_0²/α_0²).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn

from sdelab.likelihood.dequantization import to_model_space
from sdelab.likelihood.terms import VLBResult
from sdelab.losses import TIME_SAMPLERS, TimeSample, draw_uniforms, dsm_loss, sample_time
from sdelab.sde import LogSNRSchedule
from sdelab.utils import append_dims, randn_like, sum_except_batch

__all__ = [
    "check_vdm_schedule",
    "levels_to_centres",
    "variance_gradient_step",
    "vdm_vlb",
    "vlb_times",
]


def levels_to_centres(k: Tensor, num_levels: int) -> Tensor:
    """Map integer levels k ∈ {0..L−1} to VDM's bin centres (2k + 1)/L − 1 in (−1, 1)."""
    if k.is_floating_point() and not bool((k == k.round()).all()):
        raise ValueError("levels must be integers (pass the raw pixel levels, not scaled data)")
    if int(k.min()) < 0 or int(k.max()) >= num_levels:
        raise ValueError(
            f"levels must lie in [0, {num_levels - 1}], got [{int(k.min())}, "
            f"{int(k.max())}]: pass the number of levels of your data"
        )
    return to_model_space(k, num_levels, 2.0, -1.0)


def _prior_kl(schedule: LogSNRSchedule, x: Tensor) -> Tensor:
    one = torch.ones(x.shape[0], dtype=x.dtype, device=x.device) * schedule.T
    alpha, sigma = (append_dims(v, x.ndim) for v in schedule.alpha_sigma(one))
    kl = 0.5 * (sigma**2 + (alpha * x) ** 2 - 1) - torch.log(sigma)
    return sum_except_batch(kl.expand_as(x))


def _reconstruction(
    schedule: LogSNRSchedule,
    x: Tensor,
    k: Tensor | None,
    num_levels: int | None,
    z0_noise: Tensor,
) -> Tensor:
    zero = torch.full((x.shape[0],), schedule.t_min, dtype=x.dtype, device=x.device)
    alpha, sigma = (append_dims(v, x.ndim) for v in schedule.alpha_sigma(zero))
    z0 = alpha * x + sigma * z0_noise
    if k is None:  # continuous data: N(x; z_0/α_0, σ_0²/α_0²)
        std = sigma / alpha
        nll = 0.5 * ((x - z0 / alpha) / std) ** 2 + torch.log(std) + 0.5 * math.log(2 * math.pi)
        return sum_except_batch(nll.expand_as(x))
    grid = to_model_space(
        torch.arange(num_levels, dtype=x.dtype, device=x.device), num_levels, 2.0, -1.0
    )
    logits = -0.5 * ((z0.unsqueeze(-1) - alpha.unsqueeze(-1) * grid) / sigma.unsqueeze(-1)) ** 2
    logp = torch.log_softmax(logits, dim=-1).gather(-1, k.long().unsqueeze(-1)).squeeze(-1)
    return -sum_except_batch(logp)


def vlb_times(
    schedule: LogSNRSchedule,
    n: int,
    *,
    n_steps: int | None = None,
    time_sampling: str = "uniform",
    low_discrepancy: bool = True,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """The ``n`` times of the diffusion term, drawn as :func:`vdm_vlb` draws them: t ∈ [0, 1]
    (``time_sampling`` uniform or importance ∝ γ'), or for ``n_steps`` = T the grid points
    t = i/T with i uniform on {1..T}; ``low_discrepancy`` spaces them evenly (antithetic)."""
    if n_steps is None:
        return sample_time(
            schedule,
            n,
            time_sampling=time_sampling,
            low_discrepancy=low_discrepancy,
            generator=generator,
            device=device,
            dtype=dtype,
        ).t
    if n_steps < 1:
        raise ValueError(f"n_steps must be a positive number of steps, got {n_steps}")
    if time_sampling != "uniform":
        raise ValueError(
            f"the {n_steps}-step VLB draws its step uniformly: time_sampling must be 'uniform', "
            f"got {time_sampling!r}"
        )
    u = draw_uniforms(n, low_discrepancy, generator, device, dtype or torch.get_default_dtype())
    return (torch.floor(u * n_steps) + 1) / n_steps  # t = i/T, i ∈ {1..T}


def check_vdm_schedule(schedule: object) -> None:
    if not isinstance(schedule, LogSNRSchedule) or schedule.t_min != 0.0 or schedule.T != 1.0:
        raise ValueError(
            "the VDM bound needs a variance-preserving log-SNR schedule on [0, 1] "
            "(e.g. make_schedule('vdm') or 'vdm-learned')"
        )


def vdm_vlb(
    eps_fn: Callable[[Tensor, Tensor], Tensor],
    schedule: LogSNRSchedule,
    x: Tensor,
    *,
    num_levels: int | None = None,
    n_steps: int | None = None,
    parametrization: str = "eps",
    time_sampling: str = "uniform",
    low_discrepancy: bool = True,
    generator: torch.Generator | None = None,
    t: Tensor | None = None,
    noise: Tensor | None = None,
    z0_noise: Tensor | None = None,
) -> VLBResult:
    """Per-example VDM variational bound (see the module docstring).

    Args:
        eps_fn: ``eps_fn(z_t, t)`` predicting ``parametrization`` (default ε; a plain score
            function works with ``parametrization="score"``).
        schedule: a variance-preserving schedule on [0, 1] (``vdm``, ``vdm-learned``, …).
        x: integer levels ``(B, ...)`` when ``num_levels`` is given (discrete data, the bound is on
            −log P(k)), else continuous data in model space.
        num_levels: number of data levels L (e.g. 256), or ``None`` for continuous data.
        n_steps: ``None`` for the continuous-time diffusion loss, or T for T discrete steps.
        parametrization: what ``eps_fn`` predicts (eps, score, x0, v, drift).
        time_sampling: continuous time only: ``"uniform"`` (VDM) or ``"importance"`` (t with
            density ∝ γ'(t), i.e. log-SNR uniform: the same expectation, smaller variance).
        low_discrepancy: VDM's evenly spaced (antithetic) times across the batch.
        generator: source of all randomness, drawn in the order t, noise, z0_noise.
        t, noise, z0_noise: fixed draws (``(B,)`` times from :func:`vlb_times`, the diffusion
            noise and the reconstruction noise, both shaped like ``x``), e.g. the rows of a
            larger batch.

    Returns:
        :class:`VLBResult` with ``prior``, ``reconstruction``, ``diffusion``, ``total`` and
        ``bpd``, each ``(B,)``.
    """
    check_vdm_schedule(schedule)
    if time_sampling not in TIME_SAMPLERS:
        raise ValueError(
            f"unknown time sampler {time_sampling!r}: choose one of {', '.join(TIME_SAMPLERS)}"
        )
    k = None
    if num_levels is not None:
        k = x
        x = levels_to_centres(k, num_levels).to(x.device)
    elif not x.is_floating_point():
        raise ValueError("integer data needs num_levels=L (the number of pixel levels)")
    b = x.shape[0]
    if t is None:
        t = vlb_times(
            schedule,
            b,
            n_steps=n_steps,
            time_sampling=time_sampling,
            low_discrepancy=low_discrepancy,
            generator=generator,
            device=x.device,
            dtype=x.dtype,
        )
    if noise is None:
        noise = randn_like(x, generator)
    if z0_noise is None:
        z0_noise = randn_like(x, generator)
    if n_steps is None:
        if time_sampling == "uniform":
            weight = torch.full_like(t, schedule.T - schedule.t_min)
        else:  # 1/q(t) for q ∝ −λ'(t), as sample_time computes it
            ends = torch.tensor([schedule.t_min, schedule.T], dtype=t.dtype, device=t.device)
            lam_hi, lam_lo = schedule.log_snr(ends).unbind()
            weight = (lam_hi - lam_lo) / -schedule.d_log_snr(t)
        weighting = "likelihood"
    else:
        # ½ T expm1(γ_t − γ_s)·‖ε − ε̂‖² is the per-t integrand times weight expm1(...)·T/(w/σ²)
        # with w = σ²: reuse dsm_loss by giving it the matching weighting and time weights.
        s = (torch.round(t * n_steps) - 1) / n_steps
        weight = n_steps * torch.expm1(schedule.log_snr(s) - schedule.log_snr(t))
        weighting = lambda v: v.sigma**2  # noqa: E731
    diffusion = dsm_loss(
        eps_fn,
        schedule,
        x,
        parametrization=parametrization,
        weighting=weighting,
        time=TimeSample(t, weight),
        noise=noise,
    ).loss
    return VLBResult(
        prior=_prior_kl(schedule, x),
        reconstruction=_reconstruction(schedule, x, k, num_levels, z0_noise),
        diffusion=diffusion,
        dims=x[0].numel(),
    )


def variance_gradient_step(
    loss: Tensor,
    model_params: Iterable[nn.Parameter],
    schedule_params: Iterable[nn.Parameter],
    *,
    total: Tensor | None = None,
    denominator: int | None = None,
    scale: Callable[[Tensor], Tensor] | None = None,
) -> None:
    """VDM's variance-minimising gradients: ∇_θ E[L] for the model, ∇_η E[L²] for the schedule.

    In continuous time E[L] does not depend on the schedule between its end points, so the
    schedule is free to minimise the estimator's variance E[L²] − E[L]²; its gradient is that
    of the second moment. ``loss`` is the per-example diffusion loss ``(B,)``;
    ``schedule_params`` are the schedule's shape parameters
    (:meth:`~sdelab.sde.Schedule.shape_parameters`); learned end points get the full VLB's
    gradient: pass them with the model parameters and the whole VLB as ``total``.

    Args:
        loss: per-example diffusion loss ``(B,)``; the schedule gets ∇ Σ L²/n.
        model_params: parameters that get ∇ Σ total/n.
        schedule_params: parameters that get ∇ Σ loss²/n.
        total: per-example objective of the model parameters (default: ``loss``).
        denominator: n (default B): pass the size of the whole batch when ``loss`` holds only
            a micro-batch or one process's share of it, so the gradients accumulate to the
            whole batch's means.
        scale: applied to both scalars before differentiating (an fp16 gradient scaler's
            ``scale``).

    Fills ``.grad`` of both groups (accumulating, like ``backward``).
    """
    model_params = [p for p in model_params if p.requires_grad]
    schedule_params = [p for p in schedule_params if p.requires_grad]
    n = loss.shape[0] if denominator is None else denominator
    total = loss if total is None else total
    scale = scale or (lambda v: v)
    if schedule_params:
        grads = torch.autograd.grad(
            scale((loss**2).sum() / n), schedule_params, retain_graph=True, allow_unused=True
        )
        for p, g in zip(schedule_params, grads):
            if g is not None:
                p.grad = g if p.grad is None else p.grad + g
    if model_params:
        scale(total.sum() / n).backward(inputs=model_params)
