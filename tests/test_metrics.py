"""Closed-form 2-Wasserstein distance between Gaussians."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from sdelab.metrics import (
    energy_distance,
    frechet_distance,
    frechet_distance_features,
    gaussian_w2,
    inception_score,
    kid,
    mmd2_gaussian,
    mmd2_unbiased,
    precision_recall,
    sliced_w2,
    w2_between_gaussians,
)

D64 = torch.float64


def test_w2_of_diagonal_gaussians():
    """Commuting covariances: W2² = ‖Δm‖² + Σ (√a_i − √b_i)²."""
    m1, m2 = torch.tensor([0.0, 1.0, -2.0]), torch.tensor([0.5, 1.0, 0.0])
    a, b = torch.tensor([1.0, 4.0, 0.25]), torch.tensor([2.0, 1.0, 0.25])
    expected = math.sqrt(float((m1 - m2).pow(2).sum() + (a.sqrt() - b.sqrt()).pow(2).sum()))
    assert w2_between_gaussians(m1, torch.diag(a), m2, torch.diag(b)) == pytest.approx(expected)
    # A common rotation changes nothing.
    u, _ = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(0)))
    rot = w2_between_gaussians(u @ m1, u @ torch.diag(a) @ u.T, u @ m2, u @ torch.diag(b) @ u.T)
    assert rot == pytest.approx(expected, rel=1e-6)
    assert w2_between_gaussians(m1, torch.diag(a), m1, torch.diag(a)) == pytest.approx(0, abs=1e-6)


def test_w2_of_non_commuting_2x2():
    """For 2×2 PSD M, tr √M = √(tr M + 2√det M); with M = C₂^½ C₁ C₂^½ that gives
    W2² = tr C₁ + tr C₂ − 2 √(tr C₁C₂ + 2 √(det C₁ det C₂)) for equal means."""
    c1 = torch.tensor([[2.0, 0.9], [0.9, 1.0]], dtype=D64)
    c2 = torch.tensor([[0.5, -0.2], [-0.2, 3.0]], dtype=D64)
    cross = math.sqrt(float(torch.trace(c1 @ c2) + 2 * (c1.det() * c2.det()).sqrt()))
    expected = math.sqrt(float(torch.trace(c1) + torch.trace(c2)) - 2 * cross)
    zero = torch.zeros(2, dtype=D64)
    assert w2_between_gaussians(zero, c1, zero, c2) == pytest.approx(expected, rel=1e-10)
    assert w2_between_gaussians(zero, c2, zero, c1) == pytest.approx(expected, rel=1e-10)


def test_gaussian_w2_of_exact_samples_is_the_monte_carlo_floor():
    """For Σ = I, exact samples give W2² ≈ (D + D(D + 1)/4)/n (see sdelab.metrics)."""
    d, n = 4, 20_000
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(1), dtype=D64)
    floor = math.sqrt((d + d * (d + 1) / 4) / n)
    assert 0.5 * floor < gaussian_w2(x, torch.zeros(d), torch.eye(d)) < 2 * floor
    # A shifted, scaled sample is far away, by about its shift and scale.
    w = gaussian_w2(2 * x + 1, torch.zeros(d), torch.eye(d))
    assert w == pytest.approx(math.sqrt(d * 1 + d * 1), rel=0.02)


def test_w2_shape_errors():
    with pytest.raises(ValueError, match="shapes do not match"):
        w2_between_gaussians(torch.zeros(2), torch.eye(2), torch.zeros(3), torch.eye(3))
    with pytest.raises(ValueError, match="at least 2 samples"):
        gaussian_w2(torch.zeros(1, 2), torch.zeros(2), torch.eye(2))


# ---- Fréchet distance ----------------------------------------------------------------------
def test_frechet_distance_of_exact_moments():
    """FD = W2² between Gaussians: diagonal case ‖Δm‖² + Σ (√a − √b)², and the 2×2 closed form
    tr C₁ + tr C₂ − 2 √(tr C₁C₂ + 2 √(det C₁ det C₂)) for non-commuting covariances."""
    m1, m2 = torch.tensor([0.0, 1.0, -2.0]), torch.tensor([0.5, 1.0, 0.0])
    a, b = torch.tensor([1.0, 4.0, 0.25]), torch.tensor([2.0, 1.0, 0.25])
    expected = float((m1 - m2).pow(2).sum() + (a.sqrt() - b.sqrt()).pow(2).sum())
    assert frechet_distance(m1, torch.diag(a), m2, torch.diag(b)) == pytest.approx(expected)
    c1 = torch.tensor([[2.0, 0.9], [0.9, 1.0]], dtype=D64)
    c2 = torch.tensor([[0.5, -0.2], [-0.2, 3.0]], dtype=D64)
    cross = math.sqrt(float(torch.trace(c1 @ c2) + 2 * (c1.det() * c2.det()).sqrt()))
    exact = float(torch.trace(c1) + torch.trace(c2)) - 2 * cross
    z = torch.zeros(2, dtype=D64)
    assert frechet_distance(z, c1, z, c2) == pytest.approx(exact, rel=1e-10)
    # numpy arrays, as loaded from a stats .npz, work too
    assert frechet_distance(z.numpy(), c1.numpy(), z.numpy(), c2.numpy()) == pytest.approx(exact)


def test_frechet_distance_of_rank_deficient_covariances():
    """Rank-1 covariances uuᵀ, vvᵀ: (vvᵀ)^½ uuᵀ (vvᵀ)^½ = (u·v)² vvᵀ/|v|², whose root has
    trace |u·v|, so FD = |u|² + |v|² − 2|u·v| (means equal)."""
    u = torch.tensor([1.0, 2.0, 0.0, -1.0], dtype=D64)
    v = torch.tensor([0.5, -1.0, 3.0, 0.0], dtype=D64)
    z = torch.zeros(4, dtype=D64)
    exact = float(u @ u + v @ v - 2 * (u @ v).abs())
    assert frechet_distance(z, torch.outer(u, u), z, torch.outer(v, v)) == pytest.approx(exact)
    assert frechet_distance(z, torch.outer(u, u), z, torch.outer(u, u)) == pytest.approx(
        0, abs=1e-7
    )
    # Fewer samples than features: the sample covariance has rank n − 1 < F, and the
    # distance of a set to itself is still 0 (a general sqrtm of C₁C₂ loses this).
    x = torch.randn(20, 64, generator=torch.Generator().manual_seed(0), dtype=D64)
    assert frechet_distance_features(x, x) == pytest.approx(0, abs=1e-6)
    assert frechet_distance_features(x, x + 1) == pytest.approx(64, rel=1e-6)  # ‖Δμ‖² only


def test_frechet_distance_of_gaussian_samples():
    """Samples of N(0, I) and N(m, diag(s²)) in 3-D: FD → ‖m‖² + Σ (1 − s)². The delta method
    puts the estimate's sd near 0.02 here (2 m·Δm̂ and 2 (s − 1) Δŝ terms, n = 40 000); the
    tolerance is 4 sd."""
    n, d = 40_000, 3
    g = torch.Generator().manual_seed(3)
    m, s = torch.tensor([1.0, 0.0, -0.5], dtype=D64), torch.tensor([1.0, 2.0, 0.5], dtype=D64)
    x = torch.randn(n, d, generator=g, dtype=D64)
    y = m + s * torch.randn(n, d, generator=g, dtype=D64)
    exact = float(m @ m + (1 - s).pow(2).sum())
    assert frechet_distance_features(x, y) == pytest.approx(exact, abs=0.08)
    assert frechet_distance_features(x, y) == pytest.approx(frechet_distance_features(y, x))


# ---- KID and MMD ---------------------------------------------------------------------------
def test_kid_is_unbiased_zero_for_equal_distributions():
    """The unbiased MMD² has expectation 0 for equal distributions: the mean of 200
    independent estimates (sets of 50 rows from N(0, I₈)) lies within 4 standard errors of 0."""
    g = torch.Generator().manual_seed(4)
    vals = torch.tensor(
        [
            mmd2_unbiased(torch.randn(50, 8, generator=g), torch.randn(50, 8, generator=g))
            for _ in range(200)
        ],
        dtype=D64,
    )
    assert abs(float(vals.mean())) < 4 * float(vals.std()) / math.sqrt(len(vals))
    assert (vals < 0).any()  # unbiased, so single estimates go negative
    mean, sd = kid(
        torch.randn(400, 8, generator=g),
        torch.randn(400, 8, generator=g),
        num_subsets=20,
        subset_size=100,
        generator=g,
    )
    assert abs(mean) < 4 * sd and sd > 0


def test_kid_matches_the_cubic_kernel_closed_form():
    """In 1-D, (xy + 1)³ = x³y³ + 3x²y² + 3xy + 1, so MMD² = (Δm₃)² + 3(Δm₂)² + 3(Δm₁)² in the
    raw moments; for U[−1, 1] + μ against U[−1, 1]: m₁ = μ, m₂ = μ² + 1/3, m₃ = μ³ + μ. Over 20
    subsets of 1000 the relative sd is about 0.036 (measured over 30 seeds); tolerance 0.15."""
    mu, n = 0.5, 20_000
    g = torch.Generator().manual_seed(5)
    x = 2 * torch.rand(n, 1, generator=g, dtype=D64) - 1 + mu
    y = 2 * torch.rand(n, 1, generator=g, dtype=D64) - 1
    exact = (mu**3 + mu) ** 2 + 3 * (mu**2) ** 2 + 3 * mu**2
    mean, sd = kid(x, y, num_subsets=20, subset_size=1000, generator=g)
    assert mean == pytest.approx(exact, rel=0.15)
    assert sd > 0


def test_mmd2_gaussian_closed_form():
    """Gaussian kernel of bandwidth h on N(0, s² I) vs N(δ, s² I) in D dims: for Z ~ N(m, v),
    E exp(−Z²/(2h²)) = √(h²/(h² + v)) exp(−m²/(2(h² + v))), per coordinate, so
    MMD² = 2 r^D (1 − exp(−‖δ‖²/(2(h² + 2s²)))) with r = √(h²/(h² + 2s²)). The mean of 10
    estimates on 1000 rows has a relative sd near 0.02 (measured); tolerance 0.1."""
    d, s, h, n = 2, 1.0, 1.5, 1000
    delta = torch.tensor([1.0, -0.5], dtype=D64)
    g = torch.Generator().manual_seed(6)

    def draw(shift: Tensor) -> Tensor:
        return shift + s * torch.randn(n, d, generator=g, dtype=D64)

    zero = torch.zeros(d, dtype=D64)
    r = math.sqrt(h**2 / (h**2 + 2 * s**2))
    exact = 2 * r**d * (1 - math.exp(-float(delta @ delta) / (2 * (h**2 + 2 * s**2))))
    est = sum(mmd2_gaussian(draw(zero), draw(delta), bandwidth=h) for _ in range(10)) / 10
    assert est == pytest.approx(exact, rel=0.1)
    same = sum(mmd2_gaussian(draw(zero), draw(zero), bandwidth=h) for _ in range(10)) / 10
    assert abs(same) < 0.1 * exact
    assert mmd2_gaussian(draw(zero)[:300], draw(delta)[:300]) > 0  # median-heuristic bandwidth


# ---- energy distance and sliced W2 ---------------------------------------------------------
def _mean_abs_normal(m: float, v: float) -> float:
    """E|Z| for Z ~ N(m, v) (the folded normal's mean)."""
    sd = math.sqrt(v)
    return sd * math.sqrt(2 / math.pi) * math.exp(-(m**2) / (2 * v)) + m * math.erf(
        m / (sd * 2**0.5)
    )


def test_energy_distance_closed_form_and_zero_for_equal():
    """1-D N(0, 1) vs N(δ, 1): X − Y ~ N(−δ, 2), X − X' ~ N(0, 2), so the energy distance is
    2 E|N(δ, 2)| − 2 E|N(0, 2)|; for equal distributions the unbiased estimate averages 0.
    The mean of 10 estimates on 1000 rows has a relative sd near 0.035 (measured); tolerance
    0.15."""
    delta, n = 1.0, 1000
    g = torch.Generator().manual_seed(7)
    exact = 2 * _mean_abs_normal(delta, 2) - 2 * _mean_abs_normal(0, 2)
    est = sum(
        energy_distance(
            torch.randn(n, 1, generator=g, dtype=D64),
            torch.randn(n, 1, generator=g, dtype=D64) + delta,
        )
        for _ in range(10)
    )
    assert est / 10 == pytest.approx(exact, rel=0.15)
    vals = torch.tensor(
        [
            energy_distance(torch.randn(40, 2, generator=g), torch.randn(40, 2, generator=g))
            for _ in range(200)
        ],
        dtype=D64,
    )
    assert abs(float(vals.mean())) < 4 * float(vals.std()) / math.sqrt(len(vals))


def test_sliced_w2_closed_forms():
    """1-D Gaussians: W2² = Δμ² + Δσ². Isotropic Gaussians in D dims: every direction θ gives
    (θ·Δμ)² + (s₁ − s₂)², and E(θ·Δμ)² = ‖Δμ‖²/D over the sphere."""
    n = 20_000
    g = torch.Generator().manual_seed(8)
    z = torch.randn(n, 1, generator=g, dtype=D64)
    w = torch.randn(n, 1, generator=g, dtype=D64)
    assert sliced_w2(z, 2 * w + 1, num_projections=1, generator=g) == pytest.approx(
        math.sqrt(1 + 1), rel=0.02
    )
    # unequal sizes use the exact merged-quantile formula: a shift moves W2 by the shift
    assert sliced_w2(z, z[:7000] + 3, num_projections=1, generator=g) == pytest.approx(3, rel=0.02)
    d, mu = 4, torch.tensor([2.0, 0.0, 0.0, 2.0], dtype=D64)
    x = torch.randn(4000, d, generator=g, dtype=D64)
    y = mu + 0.5 * torch.randn(4000, d, generator=g, dtype=D64)
    exact = math.sqrt(float(mu @ mu) / d + 0.5**2)
    assert sliced_w2(x, y, num_projections=1000, generator=g) == pytest.approx(exact, rel=0.05)
    assert sliced_w2(x, x, generator=g) == pytest.approx(0, abs=1e-12)


# ---- Inception score and precision / recall ------------------------------------------------
def test_inception_score_uniform_and_one_hot():
    """Uniform predictions: every KL is 0, IS = 1. One-hot predictions balanced over C classes
    in each split: p(y) is uniform and every KL is log C, IS = C (sd 0 across splits)."""
    c, per = 7, 30
    uniform = torch.full((c * per, c), 1.0 / c)
    assert inception_score(uniform, splits=3) == pytest.approx((1.0, 0.0), abs=1e-9)
    one_hot = torch.eye(c).repeat(per, 1)  # rows cycle through the classes
    mean, sd = inception_score(one_hot, splits=per // 3)
    assert mean == pytest.approx(c) and sd == pytest.approx(0, abs=1e-9)
    # confident but always the same class: p(y) = p(y|x), IS = 1
    assert inception_score(torch.eye(c)[[0] * 50], splits=5)[0] == pytest.approx(1.0)


def test_precision_recall_of_identical_and_far_sets():
    g = torch.Generator().manual_seed(9)
    x = torch.randn(300, 5, generator=g, dtype=D64)
    assert precision_recall(x, x.clone(), k=3) == (1.0, 1.0)
    assert precision_recall(x, x + 100, k=3) == (0.0, 0.0)
    # samples covering half the modes: full precision, recall about a half
    modes = torch.tensor([[0.0, 0.0], [20.0, 0.0]], dtype=D64)
    real = torch.cat([m + torch.randn(400, 2, generator=g, dtype=D64) for m in modes])
    fake = modes[0] + torch.randn(400, 2, generator=g, dtype=D64)
    p, r = precision_recall(real, fake, k=5)
    assert p > 0.95 and 0.4 < r < 0.55


def test_metric_input_errors():
    with pytest.raises(ValueError, match="probabilities"):
        inception_score(torch.ones(10, 3), splits=2)
    with pytest.raises(ValueError, match="splits"):
        inception_score(torch.full((3, 3), 1 / 3), splits=5)
    with pytest.raises(ValueError, match="feature sizes differ"):
        energy_distance(torch.zeros(3, 2), torch.zeros(3, 4))
    with pytest.raises(ValueError, match="k < rows"):
        precision_recall(torch.zeros(3, 2), torch.zeros(3, 2), k=3)
    with pytest.raises(ValueError, match="bandwidth"):
        mmd2_gaussian(torch.zeros(3, 2), torch.zeros(3, 2), bandwidth=0.0)
