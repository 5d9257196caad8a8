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


# ---- the exact probability flow ---------------------------------------------------------------
def _times(schedule) -> tuple[float, float, float]:
    t0, t2 = float(schedule.t_min), float(schedule.T)
    return t0, t0 + 0.3 * (t2 - t0), t2


def test_flow_is_a_flow_and_pushes_each_marginal_to_the_next(schedule):
    """Φ_{t,t} = id, Φ_{t1,t2} ∘ Φ_{t0,t1} = Φ_{t0,t2}, and the change of variables holds with
    the Jacobian of the map (autograd): log p_{t0}(x) = log p_{t1}(Φ(x)) + log |det ∂Φ/∂x|."""
    data = random_gaussian(3, seed=4)
    x = 2 * torch.randn(5, 3, generator=torch.Generator().manual_seed(0), dtype=D64)
    t0, t1, t2 = _times(schedule)
    torch.testing.assert_close(data.flow(x, t1, t1, schedule), x)
    two_steps = data.flow(data.flow(x, t0, t1, schedule), t1, t2, schedule)
    torch.testing.assert_close(two_steps, data.flow(x, t0, t2, schedule), rtol=1e-9, atol=1e-9)
    y = data.flow(x, t0, t1, schedule)
    for b in range(2):
        jac = torch.autograd.functional.jacobian(
            lambda row: data.flow(row[None], t0, t1, schedule)[0], x[b]
        )
        logdet = torch.linalg.slogdet(jac)[1]
        change = data.marginal_log_prob(y[b : b + 1], t1, schedule) + logdet
        torch.testing.assert_close(
            change, data.marginal_log_prob(x[b : b + 1], t0, schedule), rtol=1e-9, atol=1e-9
        )


def test_flow_moves_with_the_probability_flow_velocity(schedule):
    """d/dt Φ_{t0,t}(x) = v(Φ_{t0,t}(x), t) = f x − ½ g² ∇log p_t, by central differences in t."""
    data = random_gaussian(3, seed=5)
    x = torch.randn(6, 3, generator=torch.Generator().manual_seed(1), dtype=D64)
    t0, t1, _ = _times(schedule)
    h = 1e-5 * (float(schedule.T) - t0)
    fd = (data.flow(x, t0, t1 + h, schedule) - data.flow(x, t0, t1 - h, schedule)) / (2 * h)
    y = data.flow(x, t0, t1, schedule)
    tb = torch.full((6,), t1, dtype=D64)
    v = schedule.probability_flow(y, tb, data.score(y, tb, schedule)).detach().to(D64)
    torch.testing.assert_close(fd, v, rtol=1e-5, atol=1e-6 * float(v.abs().max()))


def test_ode_log_prob_is_the_flow_density():
    """ode_log_prob = log π(Φ(x)) + log |det ∂Φ/∂x| = log p_{t_min}(x) + log π(z) − log p_T(z):
    the model density, which differs from log p_{t_min} only by the prior's mismatch at z."""
    from sdelab.sde import VESchedule, VPSchedule

    data = random_gaussian(4, seed=6)
    x = data.sample(8, generator=torch.Generator().manual_seed(2))
    for sde in (VPSchedule(), VESchedule()):
        for t_min in (None, 0.1):
            t0 = sde.t_min if t_min is None else t_min
            z = data.flow(x, t0, sde.T, sde)
            want = (
                data.marginal_log_prob(x, t0, sde)
                + sde.prior_logp(z)
                - data.marginal_log_prob(z, sde.T, sde)
            )
            torch.testing.assert_close(data.ode_log_prob(x, sde, t_min), want)
