"""Closed-form 2-Wasserstein distance between Gaussians."""

from __future__ import annotations

import math

import pytest
import torch

from sdelab.metrics import gaussian_w2, w2_between_gaussians

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
