r"""Variational bounds on −log p(x_0): sdeflow-light's ELBO and ScoreFlow's bound.

Both bounds are upper bounds on −log p(x_0) for the model "plug-in reverse SDE from
π at T down to t_min, then the Gaussian decoder q(x_0 | x_{t_min}) = N(x̂_0, σ²/α² I)" with x̂_0 the
Tweedie denoiser (ScoreFlow's form). Per example they are the sum of three terms:

    prior     E_{x_T ~ p_{0T}(·|x_0)}[−log π(x_T)]                       (closed form)
    diffusion ∫_{t_min}^{T} E_{x_t ~ p_{0t}(·|x_0)}[h(x_t, t)] dt          (Monte Carlo)
    boundary  E_{x_ε ~ p_{0 t_min}(·|x_0)}[−log q(x_0 | x_ε)] − H(p_{0 t_min}(·|x_0))
              = ½ E‖ε̂(x_ε, t_min) − ε‖² − D/2 − D log α_{t_min}          (Monte Carlo)

:func:`elbo` estimates the diffusion term as sdeflow-light's ``elbo_random_t_slice``:
h = ½ g²‖s‖² − ∇·μ with μ = f x − g² s the drift of the plug-in reverse SDE (λ = 0), at one random
time with a Hutchinson (or exact) divergence. :func:`scoreflow_bound` estimates it by the
likelihood-weighted denoising loss (:func:`~sdelab.losses.dsm_loss`), with h = ½ g²(‖s − ∇log
p_{0t}‖² − ‖∇log p_{0t}‖²) − ∇·(f x). By Stein's identity E[∇·s] = −E[s·∇log p_{0t}] the two
integrands have the same expectation at every t: the two functions estimate *the same* bound
with different estimators.

Why λ = 0 only: the λ-family of reverse processes dx = [f x − (1 − λ/2) g² s] dt + √(1−λ) g dw̄
shares its marginals, but a Girsanov ELBO needs the inference process to have the same
diffusion coefficient √(1−λ) g; the forward diffusion has g, so the tractable bound exists for
λ = 0 only. λ = 1 is the probability-flow ODE, whose likelihood is exact
(:func:`log_likelihood`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from sdelab.likelihood.divergence import _check_batch, _Divergence, _leaf, _tracks_grad
from sdelab.likelihood.options import Exact, Hutchinson
from sdelab.losses import TimeSample, dsm_loss, sample_time
from sdelab.sde import Schedule
from sdelab.utils import ScoreFn, append_dims, check_int, randn_like, sum_except_batch

__all__ = ["BoundResult", "elbo", "scoreflow_bound"]


def _decoder_gap(
    score_fn: ScoreFn, schedule: Schedule, x0: Tensor, x_eps: Tensor, noise: Tensor, t0: float
) -> Tensor:
    """−log q(x_0 | x_ε) + log N(x_ε; α x_0, σ² I) at the drawn ε, per example, for the Tweedie
    decoder q = N(x̂_0, σ²/α² I). Since α(x_0 − x̂_0) = σ(ε̂ − ε) the normalisers cancel up to
    α's Jacobian: ½‖ε̂ − ε‖² − ½‖ε‖² − D log α. The sampled ½‖ε‖² (not its mean D/2) is the
    low-variance choice for continuous data: at small σ the denoiser cannot see ε (ε̂ ≈ 0), so
    the two squares cancel draw by draw."""
    tb = torch.full((x0.shape[0],), t0, dtype=x0.dtype, device=x0.device)
    alpha, sigma = schedule.alpha_sigma(tb)
    eps_hat = -append_dims(sigma, x0.ndim) * score_fn(x_eps, tb)
    d = x0[0].numel()
    return (
        0.5 * sum_except_batch((eps_hat - noise) ** 2)
        - 0.5 * sum_except_batch(noise**2)
        - d * alpha.log()
    )


# ---- variational bounds ---------------------------------------------------------------------
@dataclass(frozen=True)
class BoundResult:
    """Per-example upper bound on −log p(x_0) (nats) and its Monte-Carlo standard error.

    Attributes:
        nll_bound: the bound, ``(B,)`` = ``prior + diffusion + boundary``.
        se: standard error of ``nll_bound`` over the ``n_samples`` draws, ``(B,)``.
        prior, diffusion, boundary: the three terms (module docstring), each ``(B,)``.
        n_samples: Monte-Carlo draws per example.
    """

    nll_bound: Tensor
    se: Tensor
    prior: Tensor
    diffusion: Tensor
    boundary: Tensor
    n_samples: int


def _end_times(schedule: Schedule, x: Tensor) -> tuple[Tensor, Tensor]:
    """(t_min, T) as ``(B,)`` tensors on ``x``'s device."""
    b = x.shape[0]
    t_min = torch.full((b,), schedule.t_min, dtype=x.dtype, device=x.device)
    return t_min, torch.full_like(t_min, schedule.T)


def _prior_term(schedule: Schedule, x: Tensor) -> Tensor:
    """E_{x_T ~ N(α_T x, σ_T² I)}[−log π(x_T)] = −log π(α_T x) + D σ_T² / (2 s²), π = N(0, s² I)."""
    mean, std = schedule.marginal(x, _end_times(schedule, x)[1])
    return -schedule.prior_logp(mean) + 0.5 * sum_except_batch(std**2) / schedule.prior_std**2


def _boundary_term(
    score_fn: ScoreFn, schedule: Schedule, x: Tensor, generator: torch.Generator | None
) -> Tensor:
    """One draw of −log q(x_0 | x_ε) − H(p_{0ε}(·|x_0)) at ε = t_min, with the Tweedie decoder
    q = N(x̂_0(x_ε), σ²/α² I) (ScoreFlow's ``likelihood_offset_fn``). Since α(x_0 − x̂_0) =
    σ(ε̂ − ε) and H = D/2 log(2πeσ²), this is ½‖ε̂ − ε‖² − D/2 − D log α_{t_min}; the first term
    is the unit-weight denoising loss at t_min."""
    t_min, _ = _end_times(schedule, x)
    out = dsm_loss(
        score_fn,
        schedule,
        x,
        parametrization="score",
        weighting="score-matching",  # w = σ²: ½‖ε̂ − ε‖² at unit time weight
        time=TimeSample(t_min, torch.ones_like(t_min)),
        generator=generator,
    )
    d = x[0].numel()
    return out.loss - 0.5 * d - d * schedule.alpha_sigma(t_min)[0].log()


def _dsm_offset(schedule: Schedule, x: Tensor) -> Tensor:
    """The parts of ScoreFlow's integrand that do not involve the model, in closed form:
    −½∫ g² E‖∇log p_{0t}‖² dt − ∫ ∇·(f x) dt = −½ D (λ(t_min) − λ(T)) − D log(α_T / α_{t_min}),
    since E‖∇log p_{0t}‖² = D/σ² and g²/σ² = −dλ/dt. (ScoreFlow estimates the first part with
    the loss's own noise; the closed form has no variance, and is the lower-variance choice
    whenever the denoiser is good, ε̂ ≈ ε.)"""
    ends = torch.tensor([schedule.t_min, schedule.T], dtype=x.dtype, device=x.device)
    log_snr = schedule.log_snr(ends)
    log_alpha = schedule.alpha_sigma(ends)[0].log()
    d = x[0].numel()
    return -0.5 * d * (log_snr[0] - log_snr[1]) - d * (log_alpha[1] - log_alpha[0])


def _check_bound_inputs(schedule: Schedule, x: Tensor, n_samples: int) -> None:
    _check_batch(x)
    check_int("n_samples", n_samples, 2, " (for a standard error)")
    if float(schedule.alpha_sigma(torch.tensor(schedule.t_min, dtype=torch.float64))[1]) <= 0:
        raise ValueError("the bounds need σ(t_min) > 0: build the schedule with t_min > 0")


def _collect(prior: Tensor, diffusion: list[Tensor], boundary: list[Tensor]) -> BoundResult:
    diff, bnd = torch.stack(diffusion), torch.stack(boundary)  # (n, B)
    total = prior + diff + bnd
    n = total.shape[0]
    return BoundResult(
        nll_bound=total.mean(0),
        se=total.std(0) / math.sqrt(n),
        prior=prior,
        diffusion=diff.mean(0),
        boundary=bnd.mean(0),
        n_samples=n,
    )


def elbo(
    score_fn: ScoreFn,
    schedule: Schedule,
    x: Tensor,
    *,
    n_samples: int = 16,
    divergence: Exact | Hutchinson | None = None,
    time_sampling: Literal["uniform", "importance"] = "uniform",
    generator: torch.Generator | None = None,
) -> BoundResult:
    r"""Per-example negative ELBO of the plug-in reverse SDE (sdeflow-light's ELBO).

    For each of ``n_samples`` draws: one time t per example (uniform on [t_min, T] as in
    sdeflow-light, or ``"importance"``: density ∝ g²/σ²), x_t ~ p_{0t}(·|x), and the integrand
    ½ g²‖s‖² − ∇·μ with μ = f x − g² s the reverse-SDE drift (:meth:`Schedule.reverse_sde`,
    λ = 0 — see the module docstring for why λ = 0 only), times the time weight 1/q(t). Prior
    and boundary terms as in the module docstring (prior in closed form).

    Args:
        score_fn: ``score_fn(x, t)``; a callable or ``ScoreModel``.
        schedule: the forward process on [t_min, T] (needs σ(t_min) > 0).
        x: data, shape ``(B, ...)``.
        n_samples: Monte-Carlo draws per example (>= 2, for the standard error).
        divergence: the estimator of ∇·μ, :class:`~sdelab.likelihood.options.Exact` or
            :class:`~sdelab.likelihood.options.Hutchinson` (``None``: one Rademacher probe).
        time_sampling: ``"uniform"`` (default, sdeflow-light's) or ``"importance"`` (λ
            uniform; measured 14% larger per-draw SD on a D = 16 Gaussian: the kinetic and
            divergence terms cancel better under uniform t).
        generator: the source of all randomness.

    All draws run as one batch of ``n_samples·B`` (one score call and one divergence pass;
    memory grows with ``n_samples``).

    Returns:
        :class:`BoundResult` with ``nll_bound`` = −ELBO ≥ −log p(x) (in expectation) and ``se``.
        Differentiable when grad mode is on and something requires grad.
    """
    _check_bound_inputs(schedule, x, n_samples)
    create_graph = _tracks_grad(score_fn, schedule, x)
    b = x.shape[0]
    with torch.set_grad_enabled(create_graph):
        # all n_samples draws in one batch of n·B: one score call, one divergence pass
        xr = x.repeat(n_samples, *([1] * (x.ndim - 1)))
        ts = sample_time(
            schedule,
            xr.shape[0],
            time_sampling=time_sampling,
            generator=generator,
            device=x.device,
            dtype=x.dtype,
        )
        x_t = schedule.perturb(xr, ts.t, randn_like(xr, generator))
        if isinstance(divergence, Exact):
            div_fn = _Divergence.make(xr, True)
        else:
            est = Hutchinson() if divergence is None else divergence
            if not isinstance(est, Hutchinson):
                raise ValueError(f"divergence must be Exact() or Hutchinson(), got {divergence!r}")
            div_fn = _Divergence.make(xr, False, est.n_probes, est.probe, generator)
        g2 = schedule(ts.t).g2
        with torch.enable_grad():
            x_t = _leaf(x_t, create_graph)
            score = score_fn(x_t, ts.t)
            # ∇·μ with μ = f x − g² s whole: its linear part D f nearly cancels g² ∇·s at
            # large t, so it is a control variate (measured: integrating D f in closed form
            # instead raises the per-draw SD from 33 to 55 nats on a D = 16 Gaussian)
            drift = schedule.reverse_sde(x_t, ts.t, score, lam=0.0)[0]
            div = div_fn(drift, x_t, create_graph)
        kinetic = 0.5 * g2 * sum_except_batch(score**2)
        diffusion = (ts.weight * (kinetic - div)).reshape(n_samples, b)
        boundary = _boundary_term(score_fn, schedule, xr, generator).reshape(n_samples, b)
        result = _collect(_prior_term(schedule, x), list(diffusion), list(boundary))
    return result


def scoreflow_bound(
    score_fn: ScoreFn,
    schedule: Schedule,
    x: Tensor,
    *,
    n_samples: int = 16,
    time_sampling: Literal["uniform", "importance"] = "importance",
    generator: torch.Generator | None = None,
) -> BoundResult:
    r"""ScoreFlow's bound on −log p(x_0) (Song, Durkan, Murray & Ermon 2021, Thm. 3), per example.

    The diffusion term is the likelihood-weighted DSM loss ½∫ g² E‖s − ∇log p_{0t}‖² dt
    (:func:`~sdelab.losses.dsm_loss`, ``weighting="likelihood"``, importance-sampled t by
    default), minus ½∫ g² E‖∇log p_{0t}‖² dt estimated with the *same* noise (ScoreFlow's
    control variate: ½ w/q · ‖ε‖²/σ²; without it the variance grows with λ(t_min) − λ(T)),
    minus ∫∇·(f x) dt = D log(α_T/α_{t_min}) in closed form. Prior and boundary terms as in the
    module docstring; the boundary uses the Tweedie decoder N(x̂_0, σ²/α² I) (ScoreFlow's
    ``likelihood_offset_fn``).

    With the exact score the expected bound is −log p_0(x) + E_{x_T|x}[log p_T/π] + a decoder
    gap that vanishes as t_min → 0; averaged over data it exceeds the entropy by
    KL(p_T ‖ π) + E KL(p(x_0|x_ε) ‖ q(x_0|x_ε)).

    Args:
        score_fn: ``score_fn(x, t)``; a callable or ``ScoreModel``.
        schedule: the forward process on [t_min, T] (needs σ(t_min) > 0).
        x: data, shape ``(B, ...)``.
        n_samples: Monte-Carlo draws per example (>= 2).
        time_sampling: ``"importance"`` (λ uniform) or ``"uniform"``.
        generator: the source of all randomness.

    Returns:
        :class:`BoundResult`; differentiable w.r.t. the score function's parameters when grad
        mode is on (this is the ScoreFlow training objective).
    """
    _check_bound_inputs(schedule, x, n_samples)
    offset = _dsm_offset(schedule, x)
    diffusion, boundary = [], []
    for _ in range(n_samples):
        out = dsm_loss(
            score_fn,
            schedule,
            x,
            parametrization="score",
            weighting="likelihood",
            time_sampling=time_sampling,
            generator=generator,
        )
        diffusion.append(out.loss + offset)
        boundary.append(_boundary_term(score_fn, schedule, x, generator))
    return _collect(_prior_term(schedule, x), diffusion, boundary)
