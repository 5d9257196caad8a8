r"""Out-of-distribution scores built on per-example likelihoods.

Raw likelihood is a poor out-of-distribution score: a model of clothing gives simple images
(dark backgrounds, few strokes) *higher* likelihood than its own test images, because
−log p(x) is dominated by how compressible x is, not by what it shows (Nalisnick et al. 2019;
Serrà et al. 2020). This module holds the pieces to measure that and to correct it:

- :func:`auroc`: the area under the ROC curve of a score that should be higher on outliers,
  P(s_out > s_in) + ½ P(s_out = s_in), with Hanley & McNeil's standard error;
- :func:`compression_bits_per_dim`: a lossless compressor's code length per dimension (PNG by
  default), the *input complexity* L(x) of Serrà et al.; the complexity-corrected score is
  ``bpd − compression_bits_per_dim`` (both in bits per dimension);
- :func:`noise_level_log_ratio`: the likelihood ratio across noise levels of a diffusion
  model, log p_{t_min}(x) − log p_t(x_t) = ∫_{t_min}^t ∇·v ds along the probability-flow path
  from x to its image x_t. It is the part of −log p(x) spent on detail finer than the noise at
  t; the rest, −log p_t(x_t), is the coarse part. Both are per-example numbers with the same
  error bars as :func:`~sdelab.likelihood.log_likelihood`.

``docs/tutorials/ood.md`` runs these on Fashion-MNIST; the numbers are in
``docs/benchmarks/ood.md``.
"""

from __future__ import annotations

import copy
import io
import lzma
import math
import zlib
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from sdelab.likelihood.dequantization import nats_to_bpd
from sdelab.likelihood.ode import LikelihoodResult, log_likelihood
from sdelab.likelihood.options import Augmented, Exact, Hutchinson, Quadrature, Randomized
from sdelab.sde import Schedule
from sdelab.utils import ScoreFn

__all__ = [
    "AUROC",
    "COMPRESSORS",
    "NoiseRatioResult",
    "auroc",
    "compression_bits_per_dim",
    "noise_level_log_ratio",
]

#: Lossless compressors of :func:`compression_bits_per_dim`.
COMPRESSORS = ("png", "zlib", "lzma")


@dataclass(frozen=True)
class AUROC:
    """Area under the ROC curve of a score (higher = more likely an outlier).

    Attributes:
        value: P(s_out > s_in) + ½ P(s_out = s_in): 1 separates perfectly, ½ is chance, below
            ½ the score ranks outliers as *more* typical than inliers.
        se: Hanley & McNeil's (1982) standard error of ``value``.
        n_in, n_out: the sample sizes.
    """

    value: float
    se: float
    n_in: int
    n_out: int

    def __str__(self) -> str:
        return f"{self.value:.3f} ± {self.se:.3f}"


def auroc(inliers: Tensor, outliers: Tensor) -> AUROC:
    """AUROC of a score that should be higher on ``outliers`` than on ``inliers``.

    Args:
        inliers, outliers: 1-D tensors of scores (finite).

    Returns:
        :class:`AUROC`: the Mann–Whitney statistic U / (n_in n_out) with ties counted ½, and its
        standard error.

    Raises:
        ValueError: an empty or non-1-D input, or a non-finite score.
    """
    a = _scores(inliers, "inliers")
    b = _scores(outliers, "outliers")
    n, m = a.numel(), b.numel()
    both = torch.cat([a, b])
    # mid-ranks (ties share the mean of their ranks), 1-based
    order = torch.argsort(both, stable=True)
    _, inverse, counts = torch.unique_consecutive(
        both[order], return_inverse=True, return_counts=True
    )
    ends = torch.cumsum(counts, 0).to(both.dtype)
    ranks = torch.empty_like(both)
    ranks[order] = (ends - (counts.to(both.dtype) - 1) / 2)[inverse]
    u = float(ranks[n:].sum()) - m * (m + 1) / 2  # pairs with the outlier ranked above
    value = u / (n * m)
    q1, q2 = value / (2 - value), 2 * value**2 / (1 + value)
    var = (value * (1 - value) + (m - 1) * (q1 - value**2) + (n - 1) * (q2 - value**2)) / (n * m)
    return AUROC(value, math.sqrt(max(var, 0.0)), n, m)


def _scores(x: Tensor, name: str) -> Tensor:
    x = torch.as_tensor(x).detach().to(torch.float64).cpu()
    if x.dim() != 1 or x.numel() == 0:
        raise ValueError(f"{name} must be a non-empty 1-D tensor of scores, got {tuple(x.shape)}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} hold NaN or inf scores: drop or fix those examples first")
    return x


def compression_bits_per_dim(
    k: Tensor, *, num_levels: int = 256, compressor: str = "png"
) -> Tensor:
    """Each image's lossless code length in bits per dimension (the input complexity L(x)).

    Args:
        k: integer levels ``(B, C, H, W)`` in ``0 … num_levels − 1`` (C = 1 or 3 for PNG).
        num_levels: L ≤ 256; the levels are stored as 8-bit values k·255/(L−1) (so the code
            length does not depend on how many levels the data has, only on its content).
        compressor: ``"png"`` (Pillow, maximum compression: what Serrà et al. found works
            well), ``"zlib"`` or ``"lzma"`` (on the raw bytes, row-major).

    Returns:
        ``(B,)`` float64: bits of the compressed file (headers included) / D.

    Raises:
        ValueError: an unknown compressor, a shape other than (B, C, H, W), levels outside
            the range, or more than 256 levels.
    """
    if compressor not in COMPRESSORS:
        raise ValueError(
            f"unknown compressor {compressor!r}: choose one of {', '.join(COMPRESSORS)}"
        )
    if not 2 <= num_levels <= 256:
        raise ValueError(f"num_levels must be in 2 … 256 for 8-bit compression, got {num_levels}")
    k = torch.as_tensor(k)
    if k.dim() != 4 or k.is_floating_point():
        raise ValueError(f"k must be integer levels (B, C, H, W), got {k.dtype} {tuple(k.shape)}")
    if bool((k < 0).any()) or bool((k >= num_levels).any()):
        raise ValueError(f"k holds values outside 0 … {num_levels - 1}")
    if compressor == "png" and k.shape[1] not in (1, 3):
        raise ValueError(f"PNG stores 1 or 3 channels, got {k.shape[1]}: use compressor='zlib'")
    x = (k.to(torch.int64) * 255 // (num_levels - 1)).to(torch.uint8).cpu().numpy()
    dim = x[0].size
    bits = np.empty(x.shape[0], dtype=np.float64)
    for i, img in enumerate(x):
        bits[i] = 8.0 * len(_compress(img, compressor)) / dim
    return torch.from_numpy(bits)


def _compress(img: np.ndarray, compressor: str) -> bytes:
    if compressor == "zlib":
        return zlib.compress(img.tobytes(), 9)
    if compressor == "lzma":
        return lzma.compress(img.tobytes(), preset=9)
    from PIL import Image

    pil = Image.fromarray(img[0] if img.shape[0] == 1 else np.transpose(img, (1, 2, 0)))
    buf = io.BytesIO()
    pil.save(buf, format="PNG", optimize=True, compress_level=9)
    return buf.getvalue()


@dataclass(frozen=True)
class NoiseRatioResult:
    """log p_{t_min}(x) − log p_t(x_t) per example (:func:`noise_level_log_ratio`).

    Attributes:
        log_ratio: ``(B,)`` nats: ∫_{t_min}^t ∇·v ds along the probability-flow path.
        bits_per_dim: ``(B,)``: −log_ratio / (D log 2), the bits per dimension spent on detail
            finer than the noise at ``t`` (add the data's dequantization terms and the coarse
            part −log p_t(x_t) to get bits/dim).
        error: ``(B,)`` nats, the integration error estimate (:class:`LikelihoodResult`).
        z: ``(B, ...)``, x_t, the path's image of x at ``t``.
        t: the noise level's time; sigma: σ(t).
        result: the :class:`LikelihoodResult` of the solve over [t_min, t] (its ``prior_logp``
            is not a density at t and plays no part).
    """

    log_ratio: Tensor
    bits_per_dim: Tensor
    error: Tensor
    z: Tensor
    t: float
    sigma: float
    result: LikelihoodResult


def noise_level_log_ratio(
    score_fn: ScoreFn,
    schedule: Schedule,
    x: Tensor,
    t: float,
    *,
    tol: float | None = None,
    divergence: Exact | Hutchinson | None = None,
    integrator: Augmented | Quadrature | Randomized | None = None,
    generator: torch.Generator | None = None,
) -> NoiseRatioResult:
    """The likelihood ratio of x across noise levels: log p_{t_min}(x) − log p_t(x_t).

    The probability-flow ODE carries x from ``schedule.t_min`` to ``t`` (x_t), and
    log p_{t_min}(x) = log p_t(x_t) + ∫_{t_min}^t ∇·v ds; this returns the integral, solved as
    :func:`~sdelab.likelihood.log_likelihood` solves the whole path (same options, same default
    policy, same error bars), on the schedule cut at ``t``.

    Args:
        score_fn, schedule, x, tol, divergence, integrator, generator: as
            :func:`~sdelab.likelihood.log_likelihood`.
        t: the noise level, ``t_min < t ≤ schedule.T``.

    Returns:
        :class:`NoiseRatioResult`.

    Raises:
        ValueError: ``t`` outside (t_min, T], or as :func:`~sdelab.likelihood.log_likelihood`.
    """
    t = float(t)
    if not schedule.t_min < t <= schedule.T:
        raise ValueError(
            f"t={t:g} must lie in (t_min, T] = ({schedule.t_min:g}, {schedule.T:g}]: it is the "
            "noise level the ratio runs to"
        )
    cut = copy.copy(schedule)  # shares the schedule's parameters; only its end moves
    cut.T = t
    res = log_likelihood(
        score_fn, cut, x, tol=tol, divergence=divergence, integrator=integrator, generator=generator
    )
    dim = x[0].numel()
    sigma = float(schedule.alpha_sigma(torch.tensor(t, dtype=torch.float64))[1])
    return NoiseRatioResult(
        log_ratio=res.delta_logp,
        bits_per_dim=nats_to_bpd(-res.delta_logp, dim),
        error=res.error,
        z=res.z,
        t=t,
        sigma=sigma,
        result=res,
    )
