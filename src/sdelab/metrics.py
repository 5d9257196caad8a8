r"""Sample-quality metrics with closed forms.

The 2-Wasserstein distance between Gaussians (Dowson & Landau 1982; Givens & Shortt 1984):

    W2²(N(m₁, C₁), N(m₂, C₂)) = ‖m₁ − m₂‖² + tr(C₁ + C₂ − 2 (C₂^{½} C₁ C₂^{½})^{½}).

Fitting a Gaussian to samples and comparing it with the Gaussian oracle's N(μ, Σ) is how the
sampler benchmark scores samplers without a trained network. The estimate from n samples is
biased upwards: for Σ = I even exact samples give W2² ≈ (D + D(D + 1)/4)/n (sample mean plus
sample covariance error), a Monte-Carlo floor to report beside every such number.

The Fréchet distance (FD; FID with Inception features, Heusel et al. 2017) is that same W2²
between Gaussians fitted to two feature sets. The matrix square root is taken through two
symmetric eigendecompositions (of C₂, then of the symmetric C₂^{½} C₁ C₂^{½}) with negative
round-off eigenvalues clamped to 0, so rank-deficient covariances (fewer samples than
features) are fine, where a general ``sqrtm`` of C₁C₂ can return complex garbage.

Feature-set metrics on rows of ``(n, F)`` features:

- KID (Bińkowski et al. 2018): the unbiased MMD² with the cubic polynomial kernel
  k(x, y) = (x·y/F + 1)³, averaged over random subsets (mean ± sd over subsets).
- Inception score (Salimans et al. 2016): exp E_x KL(p(y|x) ‖ p(y)) from class probabilities,
  per split (mean ± sd over splits); 1 for uniform predictions, C for confident balanced ones.
- Precision / recall of k-NN manifolds (Kynkäänniemi et al. 2019): a sample is inside the
  other set's manifold when it lies in some ball centred on a point of that set with radius its
  k-th nearest-neighbour distance within the set.
- For vector data: the energy distance (Székely & Rizzo), the unbiased MMD² with a Gaussian
  kernel, and the sliced 2-Wasserstein distance over random directions.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

__all__ = [
    "energy_distance",
    "feature_moments",
    "frechet_distance",
    "frechet_distance_features",
    "gaussian_w2",
    "inception_score",
    "kid",
    "mmd2_gaussian",
    "mmd2_unbiased",
    "precision_recall",
    "sliced_w2",
    "w2_between_gaussians",
]

D64 = torch.float64


def _psd_sqrt(c: Tensor) -> Tensor:
    """Symmetric square root of a symmetric positive semi-definite matrix."""
    evals, evecs = torch.linalg.eigh(0.5 * (c + c.T))
    return (evecs * evals.clamp_min(0).sqrt()) @ evecs.T


def _check_gaussians(m1: Tensor, c1: Tensor, m2: Tensor, c2: Tensor) -> None:
    if (
        m1.ndim != 1
        or m1.shape != m2.shape
        or c1.shape != c2.shape
        or c1.shape != (m1.numel(),) * 2
    ):
        raise ValueError(
            f"shapes do not match: means {tuple(m1.shape)}, {tuple(m2.shape)}; "
            f"covariances {tuple(c1.shape)}, {tuple(c2.shape)} (need (D,) and (D, D))"
        )


def _as64(v: Tensor | object) -> Tensor:
    return torch.as_tensor(v).detach().to(D64).cpu()


def frechet_distance(mu1: Tensor, sigma1: Tensor, mu2: Tensor, sigma2: Tensor) -> float:
    """Fréchet distance ‖μ₁ − μ₂‖² + tr(Σ₁ + Σ₂ − 2 (Σ₂^{½} Σ₁ Σ₂^{½})^{½}) in float64.

    The squared W2 between N(μ₁, Σ₁) and N(μ₂, Σ₂) — FID when the moments are those of
    Inception pool features. Stable for rank-deficient (PSD) covariances.

    Args:
        mu1, mu2: means ``(F,)`` (tensors or numpy arrays).
        sigma1, sigma2: covariances ``(F, F)``.

    Returns:
        The distance (≥ 0; tiny negative round-off is clamped to 0).

    Raises:
        ValueError: shapes that do not match.
    """
    m1, c1, m2, c2 = (_as64(v) for v in (mu1, sigma1, mu2, sigma2))
    _check_gaussians(m1, c1, m2, c2)
    root2 = _psd_sqrt(c2)
    cross = root2 @ (0.5 * (c1 + c1.T)) @ root2
    tr_cross_sqrt = torch.linalg.eigvalsh(0.5 * (cross + cross.T)).clamp_min(0).sqrt().sum()
    fd = (m1 - m2).pow(2).sum() + torch.trace(c1) + torch.trace(c2) - 2 * tr_cross_sqrt
    return max(float(fd), 0.0)


def w2_between_gaussians(mean1: Tensor, cov1: Tensor, mean2: Tensor, cov2: Tensor) -> float:
    """W2 between N(mean1, cov1) and N(mean2, cov2) (means ``(D,)``, covariances ``(D, D)``),
    computed in float64: the square root of :func:`frechet_distance`."""
    return math.sqrt(frechet_distance(mean1, cov1, mean2, cov2))


def _flat64(x: Tensor, name: str = "x") -> Tensor:
    x = torch.as_tensor(x)
    if x.ndim < 1 or x.shape[0] < 1:
        raise ValueError(f"{name} must have shape (n, ...) with n >= 1, got {tuple(x.shape)}")
    return x.detach().reshape(x.shape[0], -1).to(D64)


def feature_moments(x: Tensor) -> tuple[Tensor, Tensor]:
    """Mean ``(F,)`` and unbiased covariance ``(F, F)`` (float64) of features ``(n, F)``
    (any ``(n, ...)``, flattened); ``ValueError`` for fewer than 2 rows."""
    flat = _flat64(x)
    if flat.shape[0] < 2:
        raise ValueError("need at least 2 samples to fit a covariance")
    return flat.mean(0), torch.cov(flat.T).reshape(flat.shape[1], flat.shape[1])


def frechet_distance_features(x: Tensor, y: Tensor) -> float:
    """:func:`frechet_distance` between the Gaussians fitted to features ``x`` ``(n, F)`` and
    ``y`` ``(m, F)`` (sample mean, unbiased sample covariance)."""
    return frechet_distance(*feature_moments(x), *feature_moments(y))


def gaussian_w2(x: Tensor, mean: Tensor, cov: Tensor) -> float:
    """W2 between the Gaussian fitted to samples ``x`` ``(n, ...)`` (sample mean and unbiased
    sample covariance of the flattened samples) and N(``mean``, ``cov``)."""
    return w2_between_gaussians(*feature_moments(x), mean, cov)


# ---- kernels and MMD -----------------------------------------------------------------------
Kernel = Callable[[Tensor, Tensor], Tensor]


def polynomial_kernel(x: Tensor, y: Tensor, degree: int = 3, coef0: float = 1.0) -> Tensor:
    """k(x, y) = (x·y/F + coef0)^degree for rows ``x`` ``(n, F)``, ``y`` ``(m, F)``: ``(n, m)``.
    KID's kernel with the defaults."""
    return (x @ y.T / x.shape[1] + coef0) ** degree


def gaussian_kernel(bandwidth: float) -> Kernel:
    """k(x, y) = exp(−‖x − y‖² / (2 h²)) with bandwidth h > 0, as a kernel function."""
    if not bandwidth > 0:
        raise ValueError(f"bandwidth must be > 0, got {bandwidth}")

    def kernel(x: Tensor, y: Tensor) -> Tensor:
        return torch.exp(-torch.cdist(x, y).pow(2) / (2 * bandwidth**2))

    return kernel


def mmd2_unbiased(x: Tensor, y: Tensor, kernel: Kernel = polynomial_kernel) -> float:
    """Unbiased MMD² estimate between samples ``x`` ``(n, F)`` and ``y`` ``(m, F)`` (n, m ≥ 2):
    the mean of k over distinct pairs within each set minus twice the cross mean. Its
    expectation is exactly 0 for equal distributions, so single values can be negative."""
    x, y = _flat64(x, "x"), _flat64(y, "y")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"feature sizes differ: {x.shape[1]} and {y.shape[1]}")
    n, m = x.shape[0], y.shape[0]
    if n < 2 or m < 2:
        raise ValueError(f"need at least 2 rows in each set, got {n} and {m}")
    kxx, kyy, kxy = kernel(x, x), kernel(y, y), kernel(x, y)
    within_x = (kxx.sum() - kxx.diagonal().sum()) / (n * (n - 1))
    within_y = (kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
    return float(within_x + within_y - 2 * kxy.mean())


def kid(
    x: Tensor,
    y: Tensor,
    *,
    num_subsets: int = 100,
    subset_size: int = 1000,
    generator: torch.Generator | None = None,
) -> tuple[float, float]:
    """Kernel Inception distance: unbiased MMD² with the cubic polynomial kernel
    k(x, y) = (x·y/F + 1)³, on ``num_subsets`` random subsets (drawn without replacement within
    a subset) of ``min(subset_size, n, m)`` rows of ``x`` ``(n, F)`` and ``y`` ``(m, F)``.

    Returns:
        ``(mean, sd)`` over subsets; the sd divides by the number of subsets (numpy's
        ``std``, as in the reference implementations). Conventionally reported ×10³ for
        Inception features.
    """
    x, y = _flat64(x, "x"), _flat64(y, "y")
    if num_subsets < 1 or subset_size < 2:
        raise ValueError(
            f"need num_subsets >= 1 and subset_size >= 2, got {num_subsets}, {subset_size}"
        )
    size = min(subset_size, x.shape[0], y.shape[0])
    values = []
    for _ in range(num_subsets):
        ix = torch.randperm(x.shape[0], generator=generator)[:size]
        iy = torch.randperm(y.shape[0], generator=generator)[:size]
        values.append(mmd2_unbiased(x[ix], y[iy], polynomial_kernel))
    v = torch.tensor(values, dtype=D64)
    return float(v.mean()), float(v.std(correction=0))


def mmd2_gaussian(x: Tensor, y: Tensor, bandwidth: float | None = None) -> float:
    """Unbiased MMD² with the Gaussian kernel exp(−‖x − y‖²/(2h²)) between ``x`` ``(n, ...)``
    and ``y`` ``(m, ...)`` (flattened). ``bandwidth=None`` takes h = the median distance
    between the pooled points (the median heuristic)."""
    x, y = _flat64(x, "x"), _flat64(y, "y")
    if bandwidth is None:
        z = torch.cat([x, y])
        d = torch.pdist(z) if z.shape[0] > 1 else z.new_ones(1)
        bandwidth = float(d.median()) or 1.0
    return mmd2_unbiased(x, y, gaussian_kernel(bandwidth))


def energy_distance(x: Tensor, y: Tensor) -> float:
    """Energy distance 2 E‖X − Y‖ − E‖X − X'‖ − E‖Y − Y'‖ between ``x`` ``(n, ...)`` and ``y``
    ``(m, ...)`` (flattened), with the within-set terms over distinct pairs (unbiased). In
    expectation ≥ 0, and 0 exactly when the two distributions are equal."""
    x, y = _flat64(x, "x"), _flat64(y, "y")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"feature sizes differ: {x.shape[1]} and {y.shape[1]}")
    n, m = x.shape[0], y.shape[0]
    if n < 2 or m < 2:
        raise ValueError(f"need at least 2 rows in each set, got {n} and {m}")
    cross = torch.cdist(x, y).mean()
    within_x = torch.pdist(x).mean()  # distinct pairs: the mean over i < j
    within_y = torch.pdist(y).mean()
    return float(2 * cross - within_x - within_y)


def _w2_sq_1d(a: Tensor, b: Tensor) -> Tensor:
    """Exact W2² between the empirical distributions of the columns of ``a`` ``(n, L)`` and
    ``b`` ``(m, L)``: ∫₀¹ (F⁻¹(u) − G⁻¹(u))² du over the merged quantile breakpoints. ``(L,)``"""
    a, b = a.sort(dim=0).values, b.sort(dim=0).values
    n, m = a.shape[0], b.shape[0]
    if n == m:
        return (a - b).pow(2).mean(0)
    u = torch.cat([torch.arange(1, n + 1, dtype=D64) / n, torch.arange(1, m + 1, dtype=D64) / m])
    u = torch.unique(u)  # sorted breakpoints, ending at 1
    w = torch.diff(u, prepend=u.new_zeros(1))
    mid = u - w / 2
    ia = (mid * n).floor().long().clamp_max(n - 1)
    ib = (mid * m).floor().long().clamp_max(m - 1)
    return ((a[ia] - b[ib]).pow(2) * w[:, None]).sum(0)


def sliced_w2(
    x: Tensor,
    y: Tensor,
    *,
    num_projections: int = 256,
    generator: torch.Generator | None = None,
) -> float:
    """Sliced 2-Wasserstein distance between ``x`` ``(n, ...)`` and ``y`` ``(m, ...)``
    (flattened): √(E_θ W2²(θ·X, θ·Y)) over ``num_projections`` directions θ uniform on the
    sphere, each 1-D W2² exact between the projected empirical distributions. For isotropic
    Gaussians N(μ₁, s₁² I), N(μ₂, s₂² I) in D dims the population value is
    √(‖μ₁ − μ₂‖²/D + (s₁ − s₂)²)."""
    x, y = _flat64(x, "x"), _flat64(y, "y")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"feature sizes differ: {x.shape[1]} and {y.shape[1]}")
    if num_projections < 1:
        raise ValueError(f"num_projections must be >= 1, got {num_projections}")
    theta = torch.randn(x.shape[1], num_projections, generator=generator, dtype=D64)
    theta = theta / theta.norm(dim=0, keepdim=True)
    return math.sqrt(float(_w2_sq_1d(x @ theta, y @ theta).mean()))


# ---- Inception score and precision / recall ------------------------------------------------
def inception_score(probs: Tensor, splits: int = 10) -> tuple[float, float]:
    """Inception score exp(E_x KL(p(y|x) ‖ p(y))) of class probabilities ``probs`` ``(n, C)``
    (rows summing to 1), computed on ``splits`` consecutive equal chunks with p(y) the chunk's
    mean prediction.

    Returns:
        ``(mean, sd)`` over splits, the sd dividing by the number of splits (numpy's ``std``,
        as in the original code). 1 for uniform predictions, C for confident predictions
        spread evenly over C classes within each split. Splits are consecutive chunks: shuffle
        beforehand if the rows are ordered (by class, say).
    """
    p = _flat64(probs, "probs")
    if splits < 1 or p.shape[0] < splits:
        raise ValueError(f"need 1 <= splits <= n, got splits={splits} with n={p.shape[0]}")
    if (p < 0).any() or not torch.allclose(p.sum(1), torch.ones_like(p[:, 0]), atol=1e-4):
        raise ValueError("probs must be class probabilities (non-negative rows summing to 1)")
    scores = []
    for chunk in p.tensor_split(splits):
        marginal = chunk.mean(0, keepdim=True)
        kl = torch.where(chunk > 0, chunk * (chunk.log() - marginal.log()), 0).sum(1)
        scores.append(math.exp(float(kl.mean())))
    s = torch.tensor(scores, dtype=D64)
    return float(s.mean()), float(s.std(correction=0))


def _knn_radii(x: Tensor, k: int, batch: int) -> Tensor:
    """Distance from each row of ``x`` to its k-th nearest other row. ``(n,)``"""
    radii = []
    for chunk in x.split(batch):
        d = torch.cdist(chunk, x)
        radii.append(d.kthvalue(k + 1, dim=1).values)  # the 1st is the point itself (0)
    return torch.cat(radii)


def _inside(points: Tensor, centres: Tensor, radii: Tensor, batch: int) -> Tensor:
    """Whether each point lies in some ball (centres, radii). ``(n,)`` bool"""
    out = []
    for chunk in points.split(batch):
        out.append((torch.cdist(chunk, centres) <= radii[None, :]).any(dim=1))
    return torch.cat(out)


def precision_recall(
    real: Tensor, fake: Tensor, *, k: int = 3, batch: int = 1024
) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) of samples ``fake`` ``(m, F)``
    against ``real`` ``(n, F)``: precision is the fraction of fake rows inside the real k-NN
    manifold (the union of balls around each real row with radius its distance to its k-th
    nearest real neighbour), recall the fraction of real rows inside the fake manifold.

    Returns ``(precision, recall)``, each in [0, 1]. ``batch`` bounds the distance blocks.
    """
    real, fake = _flat64(real, "real"), _flat64(fake, "fake")
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"feature sizes differ: {real.shape[1]} and {fake.shape[1]}")
    if k < 1 or min(real.shape[0], fake.shape[0]) <= k:
        raise ValueError(
            f"need 1 <= k < rows of each set, got k={k} with {real.shape[0]} and {fake.shape[0]}"
        )
    precision = _inside(fake, real, _knn_radii(real, k, batch), batch).double().mean()
    recall = _inside(real, fake, _knn_radii(fake, k, batch), batch).double().mean()
    return float(precision), float(recall)
