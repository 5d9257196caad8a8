"""The Gaussian oracle: exact marginal density and score under every schedule."""

from __future__ import annotations

import math

import pytest
import torch

from sdelab.oracle import GaussianData

D64 = torch.float64


def random_gaussian(d: int, seed: int = 0) -> GaussianData:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(d, d, generator=g, dtype=D64)
    cov = a @ a.T / d + 0.2 * torch.eye(d, dtype=D64)
    return GaussianData(torch.randn(d, generator=g, dtype=D64), cov)


@pytest.mark.parametrize("d", [2, 5])
def test_score_is_gradient_of_log_density(schedule, d):
    data = random_gaussian(d)
    g = torch.Generator().manual_seed(1)
    x = 3 * torch.randn(16, d, generator=g, dtype=D64)
    t = schedule.t_min + (schedule.T - schedule.t_min) * torch.rand(16, generator=g, dtype=D64)
    xr = x.clone().requires_grad_(True)
    grad = torch.autograd.grad(data.marginal_log_prob(xr, t, schedule).sum(), xr)[0]
    torch.testing.assert_close(data.score(x, t, schedule), grad, rtol=1e-9, atol=1e-9)


def test_marginal_matches_torch_distribution(schedule):
    data = random_gaussian(3)
    t = 0.5 * (schedule.t_min + schedule.T)
    mean, cov = data.marginal(schedule, t)
    x = torch.randn(10, 3, generator=torch.Generator().manual_seed(2), dtype=D64)
    ref = torch.distributions.MultivariateNormal(mean, cov).log_prob(x)
    torch.testing.assert_close(data.marginal_log_prob(x, t, schedule), ref)


def test_log_prob_sample_and_entropy():
    data = random_gaussian(4)
    ref = torch.distributions.MultivariateNormal(data.mean, data.cov)
    x = data.sample(100_000, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(data.log_prob(x[:50]), ref.log_prob(x[:50]))
    assert data.entropy() == pytest.approx(float(ref.entropy()), rel=1e-12)
    # Sample mean within 5 standard errors, covariance within 5 % (n = 1e5).
    se = (torch.diagonal(data.cov) / x.shape[0]).sqrt()
    assert bool(((x.mean(0) - data.mean).abs() < 5 * se).all())
    torch.testing.assert_close(torch.cov(x.T), data.cov, rtol=0.05, atol=0.05)


def test_bad_covariance_and_dimension():
    with pytest.raises(ValueError, match="positive definite"):
        GaussianData(torch.zeros(2), torch.tensor([[1.0, 2.0], [2.0, 1.0]]))
    with pytest.raises(ValueError, match=r"cov must have shape \(3, 3\)"):
        GaussianData(torch.zeros(3), torch.eye(2))
    with pytest.raises(ValueError, match="expected data with 3 dimensions"):
        GaussianData(torch.zeros(3), torch.ones(3)).log_prob(torch.zeros(4, 2))


def test_entropy_closed_form_isotropic():
    data = GaussianData(torch.zeros(2, dtype=D64), torch.full((2,), 4.0, dtype=D64))
    assert data.entropy() == pytest.approx(math.log(2 * math.pi * math.e * 4.0))
