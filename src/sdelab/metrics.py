r"""Sample-quality metrics with closed forms.

The 2-Wasserstein distance between Gaussians (Dowson & Landau 1982; Givens & Shortt 1984):

    W2²(N(m₁, C₁), N(m₂, C₂)) = ‖m₁ − m₂‖² + tr(C₁ + C₂ − 2 (C₂^{½} C₁ C₂^{½})^{½}).

Fitting a Gaussian to samples and comparing it with the Gaussian oracle's N(μ, Σ) is how the
sampler benchmark scores samplers without a trained network. The estimate from n samples is
biased upwards: for Σ = I even exact samples give W2² ≈ (D + D(D + 1)/4)/n (sample mean plus
sample covariance error), a Monte-Carlo floor to report beside every such number.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["gaussian_w2", "w2_between_gaussians"]


def _psd_sqrt(c: Tensor) -> Tensor:
    """Symmetric square root of a symmetric positive semi-definite matrix."""
    evals, evecs = torch.linalg.eigh(0.5 * (c + c.T))
    return (evecs * evals.clamp_min(0).sqrt()) @ evecs.T


def w2_between_gaussians(mean1: Tensor, cov1: Tensor, mean2: Tensor, cov2: Tensor) -> float:
    """W2 between N(mean1, cov1) and N(mean2, cov2) (means ``(D,)``, covariances ``(D, D)``),
    computed in float64."""
    m1, c1, m2, c2 = (v.detach().to(torch.float64).cpu() for v in (mean1, cov1, mean2, cov2))
    if m1.shape != m2.shape or c1.shape != c2.shape or c1.shape != (m1.numel(),) * 2:
        raise ValueError(
            f"shapes do not match: means {tuple(m1.shape)}, {tuple(m2.shape)}; "
            f"covariances {tuple(c1.shape)}, {tuple(c2.shape)}"
        )
    root2 = _psd_sqrt(c2)
    cross = _psd_sqrt(root2 @ c1 @ root2)
    w2_sq = (m1 - m2).pow(2).sum() + torch.trace(c1 + c2 - 2 * cross)
    return math.sqrt(max(float(w2_sq), 0.0))


def gaussian_w2(x: Tensor, mean: Tensor, cov: Tensor) -> float:
    """W2 between the Gaussian fitted to samples ``x`` ``(n, ...)`` (sample mean and unbiased
    sample covariance of the flattened samples) and N(``mean``, ``cov``)."""
    flat = x.detach().reshape(x.shape[0], -1).to(torch.float64)
    if flat.shape[0] < 2:
        raise ValueError("need at least 2 samples to fit a covariance")
    return w2_between_gaussians(flat.mean(0), torch.cov(flat.T), mean, cov)
