r"""The Gaussian oracle: data N(μ, Σ) whose every diffused marginal is closed-form.

For x_0 ~ N(μ, Σ) and x_t = α_t x_0 + σ_t ε,

    p_t = N(α_t μ, α_t² Σ + σ_t² I).

With Σ = U diag(d) Uᵀ the marginal covariance is U diag(α_t² d + σ_t²) Uᵀ, so the score and
the log-density at per-example times cost one rotation each. This is the reference against
which sdelab tests losses, samplers, the ODE likelihood and the bounds — no network needed.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from sdelab.sde import Schedule
from sdelab.utils import ScoreFn, append_dims, batch_time

__all__ = ["GaussianData", "LogProbFn", "mixture_classifier", "mixture_score_fn"]

#: ``(x, t) -> (B, K)`` log p_t(class | x) of a time-dependent classifier.
LogProbFn = Callable[[Tensor, Tensor], Tensor]


class GaussianData:
    """Gaussian data N(mean, cov) with exact marginals under any schedule.

    Args:
        mean: shape ``(D,)``.
        cov: shape ``(D, D)``, symmetric positive definite (or ``(D,)`` for a diagonal).

    Example::

        data = GaussianData(torch.tensor([1.0, -2.0]), torch.tensor([[1.0, 0.8], [0.8, 1.0]]))
        score_fn = data.score_fn(VPSchedule())          # exact ∇ log p_t
        x0 = data.sample(512, generator=torch.Generator().manual_seed(0))
    """

    def __init__(self, mean: Tensor, cov: Tensor) -> None:
        mean = torch.as_tensor(mean)
        if not mean.is_floating_point():
            mean = mean.to(torch.get_default_dtype())
        cov = torch.as_tensor(cov, dtype=mean.dtype)
        if mean.ndim != 1:
            raise ValueError(f"mean must have shape (D,), got {tuple(mean.shape)}")
        d = mean.shape[0]
        if cov.ndim == 1:
            cov = torch.diag(cov)
        if cov.shape != (d, d):
            raise ValueError(
                f"cov must have shape ({d}, {d}) to match mean (D={d}), got {tuple(cov.shape)}"
            )
        if not torch.allclose(cov, cov.T, atol=1e-6 * float(cov.abs().max())):
            raise ValueError("cov must be symmetric")
        evals, evecs = torch.linalg.eigh(cov.to(torch.float64))
        if float(evals.min()) <= 0:
            raise ValueError("cov must be positive definite (smallest eigenvalue <= 0)")
        self.mean = mean
        self.cov = cov
        self.evals = evals.to(mean.dtype)  # (D,)
        self.evecs = evecs.to(mean.dtype)  # (D, D), columns are eigenvectors
        self.dim = d

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        """A copy on another device / dtype."""
        return GaussianData(self.mean.to(device, dtype), self.cov.to(device, dtype))

    # ---- data ----------------------------------------------------------------------------
    def sample(self, n: int, *, generator: torch.Generator | None = None) -> Tensor:
        """``n`` draws from N(μ, Σ), shape ``(n, D)``."""
        z = torch.randn(n, self.dim, generator=generator, dtype=self.mean.dtype)
        z = z.to(self.mean.device)
        return self.mean + (z * self.evals.sqrt()) @ self.evecs.T

    def log_prob(self, x: Tensor) -> Tensor:
        """Per-example log N(x; μ, Σ), shape ``(B,)``."""
        return self._log_normal(x, self.mean, self.evals)

    def entropy(self) -> float:
        """Differential entropy of N(μ, Σ) in nats: ½ log det(2πe Σ)."""
        return 0.5 * float(torch.log(2 * math.pi * math.e * self.evals.double()).sum())

    # ---- marginals -----------------------------------------------------------------------
    def _marginal_params(self, schedule: Schedule, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        alpha, sigma = schedule.alpha_sigma(t)
        alpha = append_dims(alpha, 2)
        var = alpha**2 * self.evals + append_dims(sigma, 2) ** 2  # (B, D) or (D,)
        return alpha * self.mean, var, alpha

    def marginal(self, schedule: Schedule, t: Tensor | float) -> tuple[Tensor, Tensor]:
        """Mean ``(D,)`` and covariance ``(D, D)`` of p_t at a scalar time ``t``."""
        t = torch.as_tensor(t, dtype=self.mean.dtype)
        alpha, sigma = schedule.alpha_sigma(t)
        cov = alpha**2 * self.cov + sigma**2 * torch.eye(self.dim, dtype=self.mean.dtype)
        return alpha * self.mean, cov

    def marginal_log_prob(self, x: Tensor, t: Tensor | float, schedule: Schedule) -> Tensor:
        """Per-example log p_t(x), shape ``(B,)``; ``t`` scalar or ``(B,)``."""
        t = batch_time(t, x)
        mean, var, _ = self._marginal_params(schedule, t)
        return self._log_normal(x, mean, var)

    def score(self, x: Tensor, t: Tensor | float, schedule: Schedule) -> Tensor:
        """∇_x log p_t(x) = −(α² Σ + σ² I)⁻¹ (x − α μ)."""
        flat = x.reshape(x.shape[0], -1)
        t = batch_time(t, x)
        mean, var, _ = self._marginal_params(schedule, t)
        rot = (flat - mean) @ self.evecs  # coordinates in the eigenbasis, (B, D)
        return (-(rot / var) @ self.evecs.T).reshape(x.shape)

    def score_fn(self, schedule: Schedule) -> Callable[[Tensor, Tensor], Tensor]:
        """The exact score as a plain ``score_fn(x, t)`` for samplers, likelihood and losses."""

        def score_fn(x: Tensor, t: Tensor) -> Tensor:
            return self.score(x, t, schedule)

        return score_fn

    def flow(self, x: Tensor, t0: float, t1: float, schedule: Schedule) -> Tensor:
        """The exact probability-flow map from time ``t0`` to ``t1``: x ↦ m₁ + Σ₁^½ Σ₀^−½ (x − m₀),
        ``(B, D)``. The marginal covariances α²Σ + σ²I share Σ's eigenvectors, so the linear
        flow dM/dt = (f − ½ g² Σ_t⁻¹) M is solved by the ratio of their square roots."""
        ends = torch.tensor([t0, t1], dtype=self.mean.dtype, device=self.mean.device)
        means, var, _ = self._marginal_params(schedule, ends)  # (2, D) each
        rot = (x.reshape(x.shape[0], -1) - means[0]) @ self.evecs
        return means[1] + (rot * (var[1] / var[0]).sqrt()) @ self.evecs.T

    def ode_log_prob(self, x: Tensor, schedule: Schedule, t_min: float | None = None) -> Tensor:
        """The exact log-density at ``t_min`` of the probability-flow model with this data's
        score: the prior π pushed back through the exact flow, log π(Φ(x)) + log |det ∂Φ/∂x|,
        ``(B,)`` — the truth a numerical ODE likelihood must reproduce (it differs from
        log p_{t_min}(x) by log π − log p_T at the latent)."""
        t0 = schedule.t_min if t_min is None else float(t_min)
        ends = torch.tensor([t0, schedule.T], dtype=self.mean.dtype, device=self.mean.device)
        _, var, _ = self._marginal_params(schedule, ends)
        logdet = 0.5 * (var[1].log() - var[0].log()).sum()
        return schedule.prior_logp(self.flow(x, t0, schedule.T, schedule)) + logdet

    def _log_normal(self, x: Tensor, mean: Tensor, var: Tensor) -> Tensor:
        flat = x.reshape(x.shape[0], -1)
        if flat.shape[1] != self.dim:
            raise ValueError(f"expected data with {self.dim} dimensions, got {flat.shape[1]}")
        rot = (flat - mean) @ self.evecs
        var = var.expand_as(rot)
        return -0.5 * (torch.log(2 * math.pi * var) + rot**2 / var).sum(dim=1)


# ---- Gaussian mixtures: exact classifier and score -------------------------------------------
def _component_log_probs(
    x: Tensor, t: Tensor, means: Tensor, std: float, schedule: Schedule, log_w: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """log w_k + log N(x; α μ_k, (α² s² + σ²) I) as ``(B, K)``, plus the diffused means and var."""
    alpha, sigma = schedule.alpha_sigma(batch_time(t, x))
    alpha, sigma = append_dims(alpha, 2), append_dims(sigma, 2)  # (B, 1)
    var = alpha**2 * std**2 + sigma**2  # (B, 1)
    mu = alpha[:, :, None] * means.to(x)  # (B, K, D)
    d = x.shape[1]
    sq = ((x[:, None, :] - mu) ** 2).sum(-1)  # (B, K)
    logn = -0.5 * (sq / var + d * torch.log(2 * math.pi * var))
    return log_w.to(x) + logn, mu, var


def mixture_classifier(
    means: Tensor, std: float, schedule: Schedule, weights: Tensor | None = None
) -> LogProbFn:
    """The exact time-dependent classifier of an isotropic Gaussian mixture.

    Component k of data N(μ_k, s² I) diffuses to N(α_t μ_k, (α_t² s² + σ_t²) I), so
    p_t(k | x) = w_k N_k(x) / Σ_j w_j N_j(x). Returns ``log_prob_fn(x, t) -> (B, K)``.

    Args:
        means: ``(K, D)`` component means.
        std: the components' common standard deviation s.
        schedule: the forward process.
        weights: ``(K,)`` mixture weights (default equal).
    """
    k = means.shape[0]
    log_w = torch.log(torch.full((k,), 1.0 / k) if weights is None else weights / weights.sum())

    def log_prob_fn(x: Tensor, t: Tensor) -> Tensor:
        terms, _, _ = _component_log_probs(x, t, means, std, schedule, log_w)
        return torch.log_softmax(terms, dim=1)

    return log_prob_fn


def mixture_score_fn(
    means: Tensor, std: float, schedule: Schedule, weights: Tensor | None = None
) -> ScoreFn:
    """The exact score of the diffused mixture: Σ_k p_t(k | x) (α μ_k − x)/(α² s² + σ²)."""
    k = means.shape[0]
    log_w = torch.log(torch.full((k,), 1.0 / k) if weights is None else weights / weights.sum())

    def score_fn(x: Tensor, t: Tensor) -> Tensor:
        terms, mu, var = _component_log_probs(x, t, means, std, schedule, log_w)
        r = torch.softmax(terms, dim=1)  # (B, K)
        return ((r[:, :, None] * (mu - x[:, None, :])).sum(1)) / var

    return score_fn
