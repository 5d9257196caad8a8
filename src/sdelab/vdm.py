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
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from sdelab.losses import TimeSample, dsm_loss
from sdelab.sde import LogSNRSchedule
from sdelab.utils import append_dims, randn_like, sum_except_batch

__all__ = ["VLBResult", "levels_to_centres", "variance_gradient_step", "vdm_vlb"]


@dataclass(frozen=True)
class VLBResult:
    """Per-example VLB terms, each ``(B,)`` in nats; ``bpd`` = total / (D log 2)."""

    prior: Tensor
    reconstruction: Tensor
    diffusion: Tensor
    dims: int

    @property
    def total(self) -> Tensor:
        return self.prior + self.reconstruction + self.diffusion

    @property
    def bpd(self) -> Tensor:
        return self.total / (self.dims * math.log(2))


def levels_to_centres(k: Tensor, levels: int) -> Tensor:
    """Map integer levels k ∈ {0..L−1} to VDM's bin centres (2k + 1)/L − 1 in (−1, 1)."""
    if k.is_floating_point() and not bool((k == k.round()).all()):
        raise ValueError("levels must be integers (pass the raw pixel levels, not scaled data)")
    if int(k.min()) < 0 or int(k.max()) >= levels:
        raise ValueError(
            f"levels must lie in [0, {levels - 1}], got [{int(k.min())}, "
            f"{int(k.max())}]: pass the number of levels of your data"
        )
    return (2 * k.to(torch.get_default_dtype()) + 1) / levels - 1


def _prior_kl(schedule: LogSNRSchedule, x: Tensor) -> Tensor:
    one = torch.ones(x.shape[0], dtype=x.dtype, device=x.device) * schedule.T
    alpha, sigma = (append_dims(v, x.ndim) for v in schedule.alpha_sigma(one))
    kl = 0.5 * (sigma**2 + (alpha * x) ** 2 - 1) - torch.log(sigma)
    return sum_except_batch(kl.expand_as(x))


def _reconstruction(
    schedule: LogSNRSchedule,
    x: Tensor,
    k: Tensor | None,
    levels: int | None,
    generator: torch.Generator | None,
) -> Tensor:
    zero = torch.full((x.shape[0],), schedule.t_min, dtype=x.dtype, device=x.device)
    alpha, sigma = (append_dims(v, x.ndim) for v in schedule.alpha_sigma(zero))
    z0 = alpha * x + sigma * randn_like(x, generator)
    if k is None:  # continuous data: N(x; z_0/α_0, σ_0²/α_0²)
        std = sigma / alpha
        nll = 0.5 * ((x - z0 / alpha) / std) ** 2 + torch.log(std) + 0.5 * math.log(2 * math.pi)
        return sum_except_batch(nll.expand_as(x))
    grid = (2 * torch.arange(levels, dtype=x.dtype, device=x.device) + 1) / levels - 1
    logits = -0.5 * ((z0.unsqueeze(-1) - alpha.unsqueeze(-1) * grid) / sigma.unsqueeze(-1)) ** 2
    logp = torch.log_softmax(logits, dim=-1).gather(-1, k.long().unsqueeze(-1)).squeeze(-1)
    return -sum_except_batch(logp)


def vdm_vlb(
    eps_fn: Callable[[Tensor, Tensor], Tensor],
    schedule: LogSNRSchedule,
    x: Tensor,
    *,
    levels: int | None = None,
    n_steps: int | None = None,
    low_discrepancy: bool = True,
    generator: torch.Generator | None = None,
) -> VLBResult:
    """Per-example VDM variational bound (see the module docstring).

    Args:
        eps_fn: ``eps_fn(z_t, t)`` predicting ε (wrap other kinds with
            :func:`sdelab.parametrization.score_fn_to_kind`).
        schedule: a variance-preserving schedule on [0, 1] (``vdm``, ``vdm-learned``, …).
        x: integer levels ``(B, ...)`` when ``levels`` is given (discrete data, the bound is on
            −log P(k)), else continuous data in model space.
        levels: number of data levels L (e.g. 256), or ``None`` for continuous data.
        n_steps: ``None`` for the continuous-time diffusion loss, or T for T discrete steps.
        low_discrepancy: VDM's evenly spaced times across the batch.
        generator: source of all randomness.

    Returns:
        :class:`VLBResult` with ``prior``, ``reconstruction``, ``diffusion``, ``total`` and
        ``bpd``, each ``(B,)``.
    """
    if not isinstance(schedule, LogSNRSchedule) or schedule.t_min != 0.0 or schedule.T != 1.0:
        raise ValueError(
            "the VDM bound needs a variance-preserving log-SNR schedule on [0, 1] "
            "(e.g. make_schedule('vdm') or 'vdm-learned')"
        )
    k = None
    if levels is not None:
        k = x
        x = levels_to_centres(k, levels).to(x.device)
    elif not x.is_floating_point():
        raise ValueError("integer data needs levels=L (the number of pixel levels)")
    b = x.shape[0]
    if n_steps is None:
        diffusion = dsm_loss(
            eps_fn,
            schedule,
            x,
            parametrization="eps",
            weighting="likelihood",
            low_discrepancy=low_discrepancy,
            generator=generator,
        ).loss
    else:
        if n_steps < 1:
            raise ValueError(f"n_steps must be a positive number of steps, got {n_steps}")
        if low_discrepancy:
            u0 = torch.rand((), generator=generator, dtype=x.dtype, device=x.device)
            u = torch.remainder(u0 + torch.arange(b, dtype=x.dtype, device=x.device) / b, 1.0)
        else:
            u = torch.rand(b, generator=generator, dtype=x.dtype, device=x.device)
        i = torch.floor(u * n_steps) + 1  # i ∈ {1..T}
        t, s = i / n_steps, (i - 1) / n_steps
        # ½ T expm1(γ_t − γ_s)·‖ε − ε̂‖² is the per-t integrand times weight expm1(...)·T/(w/σ²)
        # with w = g²: reuse dsm_loss by giving it the matching weighting and time weights.
        factor = n_steps * torch.expm1(schedule.log_snr(s) - schedule.log_snr(t))
        diffusion = dsm_loss(
            eps_fn,
            schedule,
            x,
            parametrization="eps",
            weighting=lambda v: v.sigma**2,
            time=TimeSample(t, factor),
            generator=generator,
        ).loss
    return VLBResult(
        prior=_prior_kl(schedule, x),
        reconstruction=_reconstruction(schedule, x, k, levels, generator),
        diffusion=diffusion,
        dims=x[0].numel(),
    )


def variance_gradient_step(
    loss: Tensor,
    model_params: Iterable[nn.Parameter],
    schedule_params: Iterable[nn.Parameter],
) -> None:
    """VDM's variance-minimising gradients: ∇_θ E[L] for the model, ∇_η E[L²] for the schedule.

    In continuous time E[L] does not depend on the schedule between its end points, so the
    schedule is free to minimise the estimator's variance E[L²] − E[L]²; its gradient is that
    of the second moment. ``loss`` is the per-example diffusion loss ``(B,)`` (the end points, if
    learned, still need the full VLB's gradient: pass them with the model parameters). Fills
    ``.grad`` of both groups (accumulating, like ``backward``).
    """
    model_params = [p for p in model_params if p.requires_grad]
    schedule_params = [p for p in schedule_params if p.requires_grad]
    if schedule_params:
        grads = torch.autograd.grad(
            (loss**2).mean(), schedule_params, retain_graph=True, allow_unused=True
        )
        for p, g in zip(schedule_params, grads):
            if g is not None:
                p.grad = g if p.grad is None else p.grad + g
    if model_params:
        loss.mean().backward(inputs=model_params)
