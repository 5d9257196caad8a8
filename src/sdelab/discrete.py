r"""Discrete-time diffusion: DDPM (Ho et al. 2020) and SMLD/NCSN (Song & Ermon 2019).

A discrete chain has N integer steps i ∈ {0, …, N−1} with x_i = α_i x_0 + σ_i ε:

- DDPM: β_i from :meth:`sdelab.sde.VPSchedule.discrete_betas` (β_i = β(t)/N on a linspace, as
  Score-SDE), ᾱ_i = ∏_{j≤i} (1 − β_j), α_i = √ᾱ_i, σ_i = √(1 − ᾱ_i);
- SMLD: α_i = 1 and NCSN's geometric σ_i from :meth:`sdelab.sde.VESchedule.discrete_sigmas`.

The network sees the step as τ_i = i/(N−1) ∈ [0, 1] (with the default sinusoidal embedding,
scale 1000, that is DDPM's embedding of the integer step for N = 1000).

Losses, both ½‖ε̂ − ε‖² at a uniform step (``chain_loss``): DDPM's L_simple; and NCSN's
½ σ_i² ‖s_θ(x̃, σ_i) + (x̃ − x)/σ_i²‖² = ½‖σ_i s_θ + ε‖², i.e. the same with ε̂ = −σ_i s_θ.
For any linear Gaussian chain the KL term of the variational bound between q(x_{i−1}|x_i, x_0)
and the model's reverse kernel with the posterior variance is (VDM, eq. 13)

    L_{i} = ½ (SNR_{i−1} − SNR_i) ‖x_0 − x̂_0‖² = ½ expm1(λ_{i−1} − λ_i) ‖ε − ε̂(x_i, i)‖²,

which for DDPM is Ho et al.'s β_i²/(2 β̃_i α_i (1 − ᾱ_i)) ‖ε − ε̂‖² (``ddpm_vlb``).

The continuous view (:class:`DiscreteScoreModel`) maps a time t ∈ [t_min, T] of the SDE the
chain discretises (VP for DDPM, VE for SMLD) to the fractional step u = t (N−1)/T, as Score-SDE
does for its discrete models (t·(N−1) for VP, the σ index for VE), feeds the network τ = u/(N−1)
and converts its output with α, σ interpolated log-linearly between steps (exact at the steps,
and exact everywhere for VE, whose σ_t is geometric). Score-SDE takes σ at ⌊u⌋ instead; the
interpolation keeps the score continuous in t, which adaptive ODE solvers prefer. So every
sampler and the ODE likelihood run on a discrete-trained model.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

from sdelab.likelihood.dequantization import to_model_space
from sdelab.likelihood.terms import VLBResult
from sdelab.parametrization import ScoreModel, from_eps, to_eps
from sdelab.sde import Schedule, ScheduleOutput, VESchedule, VPSchedule
from sdelab.utils import append_dims, batch_time, check_int, randn_like, sum_except_batch

__all__ = [
    "CHAINS",
    "DiscreteChain",
    "DiscreteLoss",
    "DiscreteScoreModel",
    "chain_loss",
    "ddpm_chain",
    "ddpm_vlb",
    "sample_ddpm",
    "sample_ncsn",
    "smld_chain",
]

#: ``step_fn(x, i) -> ε̂``: a model's ε prediction at integer steps ``i`` ``(B,)`` (long).
StepFn = Callable[[Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class DiscreteChain:
    """A discrete forward chain x_i = α_i x_0 + σ_i ε, i ∈ {0..N−1}, and the SDE it
    discretises (``schedule``, the continuous view).

    Attributes:
        alpha, sigma: ``(N,)`` float64, σ increasing (λ_i = log α_i²/σ_i² decreasing).
        schedule: the continuous schedule (VP for DDPM, VE for SMLD).
        name: ``"ddpm"`` or ``"smld"``.
    """

    alpha: Tensor
    sigma: Tensor
    schedule: Schedule
    name: str

    @property
    def n(self) -> int:
        return int(self.alpha.shape[0])

    @property
    def log_snr(self) -> Tensor:
        """λ_i = 2 (log α_i − log σ_i), ``(N,)`` float64."""
        return 2 * (self.alpha.log() - self.sigma.log())

    def at_step(self, i: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
        """(α_i, σ_i) at integer steps ``i`` ``(B,)`` in ``like``'s dtype and device."""
        i = i.long().to(self.alpha.device)
        cast = dict(dtype=like.dtype, device=like.device)
        return self.alpha[i].to(**cast), self.sigma[i].to(**cast)

    def net_input(self, u: Tensor) -> Tensor:
        """The network's step input τ = u/(N−1) ∈ [0, 1] for (fractional) steps ``u``."""
        return u / max(self.n - 1, 1)

    def step_of_time(self, t: Tensor) -> Tensor:
        """Score-SDE's map from time to (fractional) step, u = t (N−1)/T, within [0, N−1]."""
        return (t * ((self.n - 1) / self.schedule.T)).clamp(0, self.n - 1)

    def alpha_sigma_at(self, u: Tensor) -> tuple[Tensor, Tensor]:
        """(α, σ) at fractional steps ``u``: log α and log σ interpolated linearly between the
        neighbouring integer steps (the chain's own values at integer u)."""
        lo = u.detach().floor().clamp(0, max(self.n - 2, 0)).long()
        hi = (lo + 1).clamp(max=self.n - 1)
        w = (u - lo.to(u.dtype)).clamp(0, 1)
        log_a, log_s = self.alpha.log(), self.sigma.log()
        cast = dict(dtype=u.dtype, device=u.device)
        la = torch.lerp(log_a[lo.cpu()].to(**cast), log_a[hi.cpu()].to(**cast), w)
        ls = torch.lerp(log_s[lo.cpu()].to(**cast), log_s[hi.cpu()].to(**cast), w)
        return la.exp(), ls.exp()

    def values(self, u: Tensor) -> ScheduleOutput:
        """Schedule values at fractional steps ``u`` for :mod:`sdelab.parametrization`: α, σ
        of the chain; g (for the drift kind) from the continuous schedule at t = u T/(N−1)."""
        t = (u * (self.schedule.T / max(self.n - 1, 1))).clamp(self.schedule.t_min, self.schedule.T)
        alpha, sigma = self.alpha_sigma_at(u)
        return replace(self.schedule(t), alpha=alpha, sigma=sigma)


def ddpm_chain(schedule: VPSchedule, n: int = 1000) -> DiscreteChain:
    """DDPM's chain of ``n`` steps: β from ``schedule.discrete_betas(n)``, ᾱ_i = ∏(1 − β_j)."""
    if not isinstance(schedule, VPSchedule):
        raise ValueError(f"DDPM discretises the VP SDE: pass a VPSchedule, got {schedule!r}")
    n = check_int("number of discrete steps", n, 2)
    betas = schedule.discrete_betas(n, torch.float64)
    if float(betas.max()) >= 1:
        raise ValueError(
            f"{n} DDPM steps give beta_max/N = {float(betas.max()):.3g} >= 1: use more steps "
            f"(N > {schedule.beta_max:g})"
        )
    log_abar = torch.cumsum(torch.log1p(-betas), 0)
    return DiscreteChain(
        alpha=(0.5 * log_abar).exp(),
        sigma=(-torch.expm1(log_abar)).sqrt(),
        schedule=schedule,
        name="ddpm",
    )


def smld_chain(schedule: VESchedule, n: int = 1000) -> DiscreteChain:
    """SMLD/NCSN's chain of ``n`` geometric noise levels σ_min … σ_max (α = 1)."""
    if not isinstance(schedule, VESchedule):
        raise ValueError(f"SMLD discretises the VE SDE: pass a VESchedule, got {schedule!r}")
    n = check_int("number of discrete steps", n, 2)
    sigma = schedule.discrete_sigmas(n, torch.float64)
    return DiscreteChain(alpha=torch.ones_like(sigma), sigma=sigma, schedule=schedule, name="smld")


#: Chain builders by objective name.
CHAINS: dict[str, Callable[..., DiscreteChain]] = {"ddpm": ddpm_chain, "smld": smld_chain}


class DiscreteScoreModel(ScoreModel):
    """A network trained on a discrete chain, seen as a continuous-time score model.

    ``net(x, τ)`` predicts ``parametrization`` (eps, score, x0, v; drift needs g and is converted
    with the continuous schedule's g) at the step input τ (:meth:`DiscreteChain.net_input`).
    Calling the model at (x, t) returns the score of the continuous view (see the module
    docstring), so it works with every sampler and the ODE likelihood; :meth:`at_step` predicts
    at integer steps for the exact chains (:func:`sample_ddpm`, :func:`sample_ncsn`,
    :func:`ddpm_vlb`).
    """

    def __init__(
        self, net: nn.Module | Callable, chain: DiscreteChain, parametrization: str = "eps"
    ):
        super().__init__(net, chain.schedule, parametrization=parametrization)
        self.chain = chain

    def _predict_at(self, x: Tensor, u: Tensor, kind: str, y: Tensor | None) -> Tensor:
        tau = self.chain.net_input(u)
        out = self.net(x, tau) if y is None else self.net(x, tau, y)
        if kind == self.parametrization:
            return out
        vals = self.chain.values(u)
        return from_eps(to_eps(out, self.parametrization, x, vals), kind, x, vals)

    def predict(
        self, x: Tensor, t: Tensor | float, kind: str = "score", y: Tensor | None = None
    ) -> Tensor:
        """The prediction of ``kind`` at continuous times ``t`` (scalar or ``(B,)``)."""
        t = batch_time(t, x)
        return self._predict_at(x, self.chain.step_of_time(t), kind, y)

    def at_step(self, x: Tensor, i: Tensor, kind: str = "eps", y: Tensor | None = None) -> Tensor:
        """The prediction of ``kind`` at integer steps ``i`` (``(B,)`` or a scalar)."""
        u = batch_time(torch.as_tensor(i).to(x.dtype), x)
        return self._predict_at(x, u, kind, y)

    def eps_at_step(self, x: Tensor, i: Tensor) -> Tensor:
        """ε̂ at integer steps (a :data:`StepFn`)."""
        return self.at_step(x, i, "eps")


# ---- losses ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class DiscreteLoss:
    """Per-example loss ``(B,)`` and what produced it: ``steps`` ``(B,)`` long, ``x_t`` the
    noised input, ``noise`` ε and ``eps_hat`` ε̂."""

    loss: Tensor
    steps: Tensor
    x_t: Tensor
    noise: Tensor
    eps_hat: Tensor


def chain_loss(
    net: Callable[[Tensor, Tensor], Tensor],
    chain: DiscreteChain,
    x0: Tensor,
    *,
    parametrization: str = "eps",
    steps: Tensor | None = None,
    noise: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> DiscreteLoss:
    """DDPM's L_simple / NCSN's σ²-weighted loss on a discrete chain: ½‖ε̂(x_i, i) − ε‖² with
    i uniform on {0..N−1} and x_i = α_i x_0 + σ_i ε (see the module docstring).

    Args:
        net: ``net(x_i, τ_i)`` predicting ``parametrization`` at the step input τ_i = i/(N−1).
        chain: :func:`ddpm_chain` or :func:`smld_chain`.
        x0: data ``(B, ...)``.
        steps, noise: fixed draws (``(B,)`` integers, and ε shaped like ``x0``); otherwise
            drawn from ``generator`` in that order.

    Returns:
        :class:`DiscreteLoss`; its minimiser over all functions is ε̂ = E[ε | x_i] =
        −σ_i ∇ log p_i(x_i), the exact ε (score) at each step.
    """
    b = x0.shape[0]
    if steps is None:
        steps = torch.randint(0, chain.n, (b,), generator=generator, device=x0.device)
    if steps.shape != (b,):
        raise ValueError(f"need one step per example: steps has shape {tuple(steps.shape)}, B={b}")
    if noise is None:
        noise = randn_like(x0, generator)
    elif noise.shape != x0.shape:
        raise ValueError(f"noise shape {tuple(noise.shape)} differs from data {tuple(x0.shape)}")
    u = steps.to(x0.dtype)
    vals = chain.values(u)
    alpha, sigma = append_dims(vals.alpha, x0.ndim), append_dims(vals.sigma, x0.ndim)
    x_t = alpha * x0 + sigma * noise
    eps_hat = to_eps(net(x_t, chain.net_input(u)), parametrization, x_t, vals)
    loss = 0.5 * sum_except_batch((eps_hat - noise) ** 2)
    return DiscreteLoss(loss=loss, steps=steps, x_t=x_t, noise=noise, eps_hat=eps_hat)


# ---- the variational bound -------------------------------------------------------------------
def _log_normal_bin(lo: Tensor, hi: Tensor) -> Tensor:
    """log(Φ(hi) − Φ(lo)) for lo < hi (±inf allowed), computed in the lower tail: where the
    bin lies right of 0, use Φ(−lo) − Φ(−hi) instead."""
    flip = (lo + hi) > 0
    a = torch.where(flip, -hi, lo)
    b = torch.where(flip, -lo, hi)
    log_b, log_a = torch.special.log_ndtr(b), torch.special.log_ndtr(a)
    return log_b + torch.log1p(-torch.exp((log_a - log_b).clamp(max=0)).clamp(max=1 - 1e-12))


def discretized_gaussian_nll(
    k: Tensor, mean: Tensor, std: Tensor, num_levels: int, scale: float = 2.0, shift: float = -1.0
) -> Tensor:
    """DDPM's discretised decoder: −log ∫_{bin k} N(y; mean, std²) dy per example ``(B,)``,
    with bins of width scale/L around the level centres scale(k + ½)/L + shift and the outer
    bins extended to ±∞ (so the L probabilities sum to 1)."""
    kf = k.to(mean.dtype)
    lo = torch.where(kf <= 0, -math.inf, to_model_space(kf, num_levels, scale, shift, u=0.0))
    hi = torch.where(
        kf >= num_levels - 1, math.inf, to_model_space(kf, num_levels, scale, shift, u=1.0)
    )
    return -sum_except_batch(_log_normal_bin((lo - mean) / std, (hi - mean) / std))


def ddpm_vlb(
    step_fn: StepFn,
    chain: DiscreteChain,
    x: Tensor,
    *,
    num_levels: int | None = None,
    scale: float = 2.0,
    shift: float = -1.0,
    n_terms: int | None = None,
    generator: torch.Generator | None = None,
) -> VLBResult:
    """Per-example discrete variational bound L_vlb of the chain (Ho et al. 2020, Eq. 5):

        KL(q(x_{N−1}|x_0) ‖ prior) + Σ_{i=1}^{N−1} ½ expm1(λ_{i−1} − λ_i) E‖ε − ε̂(x_i, i)‖²
        + E[−log p(x_0 | x_{step 0})],

    the reverse kernels having the posterior variance and the decoder N(x̂_0, σ_0²) — for DDPM
    σ_0² = β_1 — discretised over the data levels (DDPM's decoder) or, for continuous data, its
    density.

    Args:
        step_fn: ``step_fn(x_i, i) -> ε̂`` (e.g. :meth:`DiscreteScoreModel.eps_at_step`).
        chain: the chain the model was trained on.
        x: integer levels ``(B, ...)`` when ``num_levels`` is given (the bound is on −log P(k)),
            else continuous data in model space.
        num_levels, scale, shift: L levels mapped to scale·(k + ½)/L + shift (default [−1, 1]).
        n_terms: ``None`` sums every step (N − 1 network calls); an integer m draws m steps
            uniformly per example and rescales, an unbiased estimate at m calls.
        generator: source of all randomness (steps, then the noises).

    Returns:
        :class:`VLBResult`; ``bpd`` is the bound in bits/dim.
    """
    if num_levels is not None:
        k = x
        if not bool((k == k.round()).all()) or int(k.min()) < 0 or int(k.max()) >= num_levels:
            raise ValueError(f"num_levels=L needs integer data in [0, {num_levels - 1}]")
        x = to_model_space(k.to(torch.get_default_dtype()), num_levels, scale, shift).to(x.device)
    elif not x.is_floating_point():
        raise ValueError("integer data needs num_levels=L (the number of pixel levels)")
    b, n, dims = x.shape[0], chain.n, x[0].numel()
    lam = chain.log_snr
    weight = 0.5 * torch.expm1(lam[:-1] - lam[1:])  # (N−1,) the weight of step i = 1..N−1

    # prior: KL(N(α x, σ²) ‖ N(0, s²)) at the last step
    last = torch.full((b,), n - 1, device=x.device)
    a_n, s_n = (append_dims(v, x.ndim) for v in chain.at_step(last, x))
    s2 = chain.schedule.prior_std**2
    kl = 0.5 * ((s_n**2 + (a_n * x) ** 2) / s2 - 1 - torch.log(s_n**2 / s2))
    prior = sum_except_batch(kl.expand_as(x))

    def term(i: Tensor) -> Tensor:
        a, s = (append_dims(v, x.ndim) for v in chain.at_step(i, x))
        eps = randn_like(x, generator)
        return sum_except_batch((eps - step_fn(a * x + s * eps, i)) ** 2)

    if n_terms is None:
        diffusion = torch.zeros(b, dtype=x.dtype, device=x.device)
        for j in range(1, n):
            i = torch.full((b,), j, device=x.device)
            diffusion = diffusion + weight[j - 1].to(x.dtype) * term(i)
    else:
        m = check_int("n_terms", n_terms, 1)
        diffusion = torch.zeros(b, dtype=x.dtype, device=x.device)
        draws = torch.randint(1, n, (m, b), generator=generator, device=x.device)
        for i in draws:
            w = weight.to(x.device, x.dtype)[i - 1]
            diffusion = diffusion + (n - 1) / m * w * term(i)

    zero = torch.zeros(b, dtype=torch.long, device=x.device)
    a0, s0 = (append_dims(v, x.ndim) for v in chain.at_step(zero, x))
    eps = randn_like(x, generator)
    z = a0 * x + s0 * eps
    mean = (z - s0 * step_fn(z, zero)) / a0  # x̂_0 = DDPM's μ_θ(x_1, 1)
    std = s0.expand_as(x)
    if num_levels is None:
        nll = 0.5 * ((x - mean) / std) ** 2 + torch.log(std) + 0.5 * math.log(2 * math.pi)
        reconstruction = sum_except_batch(nll)
    else:
        reconstruction = discretized_gaussian_nll(
            k.to(x.device), mean, std, num_levels, scale, shift
        )
    return VLBResult(prior=prior, diffusion=diffusion, reconstruction=reconstruction, dims=dims)


# ---- the exact chains ------------------------------------------------------------------------
def sample_ddpm(
    step_fn: StepFn,
    chain: DiscreteChain,
    shape: tuple[int, ...],
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    x_init: Tensor | None = None,
) -> Tensor:
    """DDPM's ancestral sampler (Ho et al. 2020, Alg. 2) on the chain's steps: x_{N−1} from the
    prior, then x_{i−1} ~ q(x_{i−1} | x_i, x̂_0) with the posterior mean and variance β̃, and
    finally the decoder's mean x̂_0 at step 0 (no noise). For an SMLD chain the same step is
    SMLD's ancestral sampler. ``step_fn(x, i) -> ε̂``; N network calls. Returns ``(B, ...)``."""
    dtype = dtype or torch.get_default_dtype()
    if x_init is None:
        x = chain.schedule.prior_sample(shape, generator=generator, device=device, dtype=dtype)
    else:
        x = x_init.to(device=device, dtype=dtype).clone()
    b = x.shape[0]
    with torch.no_grad():
        for j in range(chain.n - 1, 0, -1):
            i = torch.full((b,), j, device=x.device)
            a_t, s_t = (append_dims(v, x.ndim) for v in chain.at_step(i, x))
            a_s, s_s = (append_dims(v, x.ndim) for v in chain.at_step(i - 1, x))
            a = a_t / a_s  # x_i = a x_{i−1} + G ε
            g2 = s_t**2 - a**2 * s_s**2
            x0 = (x - s_t * step_fn(x, i)) / a_t
            mean = (a * s_s**2 * x + a_s * g2 * x0) / s_t**2
            x = mean + (s_s * g2.clamp_min(0).sqrt() / s_t) * randn_like(x, generator)
        zero = torch.zeros(b, dtype=torch.long, device=x.device)
        a0, s0 = (append_dims(v, x.ndim) for v in chain.at_step(zero, x))
        return (x - s0 * step_fn(x, zero)) / a0


def sample_ncsn(
    step_fn: StepFn,
    chain: DiscreteChain,
    shape: tuple[int, ...],
    *,
    n_steps_each: int = 5,
    step_lr: float = 2e-5,
    denoise: bool = True,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    x_init: Tensor | None = None,
) -> Tensor:
    """NCSN's annealed Langevin dynamics (Song & Ermon 2019, Alg. 1) on the chain's noise levels,
    from σ_{N−1} down to σ_0: at level i, ``n_steps_each`` steps x ← x + η s + √(2η) z with
    η = ``step_lr``·(σ_i/σ_0)² and s = −ε̂/σ_i; then (``denoise``) Tweedie's x + σ_0² s
    (NCSNv2's final step). ``step_fn(x, i) -> ε̂``; N·n_steps_each (+1) calls."""
    n_steps_each = check_int("n_steps_each", n_steps_each, 1)
    if not (math.isfinite(step_lr) and step_lr > 0):
        raise ValueError(f"step_lr must be a finite number > 0, got {step_lr}")
    dtype = dtype or torch.get_default_dtype()
    if x_init is None:
        x = chain.schedule.prior_sample(shape, generator=generator, device=device, dtype=dtype)
    else:
        x = x_init.to(device=device, dtype=dtype).clone()
    b = x.shape[0]
    sigma_0 = float(chain.sigma[0])
    with torch.no_grad():
        for j in range(chain.n - 1, -1, -1):
            i = torch.full((b,), j, device=x.device)
            _, s_i = (append_dims(v, x.ndim) for v in chain.at_step(i, x))
            eta = step_lr * (s_i / sigma_0) ** 2
            for _ in range(n_steps_each):
                score = -step_fn(x, i) / s_i
                x = x + eta * score + (2 * eta).sqrt() * randn_like(x, generator)
        if denoise:
            zero = torch.zeros(b, dtype=torch.long, device=x.device)
            a0, s0 = (append_dims(v, x.ndim) for v in chain.at_step(zero, x))
            x = (x - s0 * step_fn(x, zero)) / a0
    return x
