"""High-order denoising score matching (Lu et al. 2022) and i-DODE's second-order flow
matching, checked against the Gaussian oracle: for data N(μ, Σ) the posterior of ε given x_t is
Gaussian with mean −σ s(x_t) and covariance C = I + σ² H, H = −(α² Σ + σ² I)⁻¹, so every
order's target is closed form."""

from __future__ import annotations

import math

import pytest
import torch

from sdelab.losses import (
    TimeSample,
    dsm_loss,
    high_order_dsm_loss,
    high_order_residuals,
    rademacher_like,
)
from sdelab.oracle import GaussianData
from sdelab.parametrization import KINDS, score_fn_to_kind
from sdelab.sde import VESchedule, VPSchedule

D64 = torch.float64
MEAN = torch.tensor([1.0, -0.5, 0.3], dtype=D64)
COV = torch.tensor([[1.0, 0.6, 0.1], [0.6, 0.8, -0.2], [0.1, -0.2, 0.5]], dtype=D64)


def _hessian(schedule, t: float) -> torch.Tensor:
    """∇² log p_t = −(α² Σ + σ² I)⁻¹ at a scalar time."""
    a, s = schedule.alpha_sigma(torch.tensor(t, dtype=D64))
    return -torch.linalg.inv(a**2 * COV + s**2 * torch.eye(3, dtype=D64))


def _z(mean: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """|mean − closed form| / SE of the Monte Carlo mean, per coordinate."""
    se = values.std(0) / math.sqrt(values.shape[0])
    return (values.mean(0) - mean).abs() / se.clamp_min(1e-300)


@pytest.mark.parametrize("schedule", [VPSchedule(), VESchedule()], ids=["vp", "ve"])
@pytest.mark.parametrize("t", [0.05, 0.5])
def test_targets_are_unbiased_and_error_bounded(schedule, t):
    """Given x_t, the residuals' means are exactly their closed forms: zero at the true score,
    and for a score off by a constant δ (d = σ δ) −(d·v) d (Frobenius), −(d·v)² (trace),
    −‖d‖² (trace form, over v too) and (d·v)² d (third order): second and third order in the
    first-order error, Lu et al.'s error bound."""
    data = GaussianData(MEAN, COV)
    g = torch.Generator().manual_seed(7)
    n = 200_000
    a, s = (float(v) for v in schedule.alpha_sigma(torch.tensor(t, dtype=D64)))
    x = (a * MEAN + torch.tensor([0.4, -0.3, 0.2], dtype=D64))[None]  # one point x_t
    score = data.score(x, t, schedule)  # (1, 3)
    hess = _hessian(schedule, t)
    cov_eps = torch.eye(3, dtype=D64) + s**2 * hess  # posterior covariance of ε
    chol = torch.linalg.cholesky(cov_eps)
    eps = -s * score + torch.randn(n, 3, generator=g, dtype=D64) @ chol.T  # ε | x_t
    v_fixed = torch.tensor([1.0, -1.0, 1.0], dtype=D64).expand(n, 3)
    v_random = rademacher_like(eps, g)
    sigma = torch.full((n,), s, dtype=D64)
    for delta in (torch.zeros(3, dtype=D64), torch.tensor([0.3, -0.2, 0.5], dtype=D64) / s):
        d = s * delta
        model_score = (score + delta).expand(n, 3)
        full = high_order_residuals(
            model_score,
            v_fixed @ hess,  # J v with J = H: a constant δ leaves the Jacobian exact
            eps,
            v_fixed,
            sigma,
            grad_vjv=torch.zeros(n, 3, dtype=D64),  # ∇ tr H = 0 for Gaussian data
        )
        dv = float(d @ v_fixed[0])
        assert bool((_z(-dv * d, full.frobenius) < 5).all())
        assert bool((_z(torch.tensor(-(dv**2), dtype=D64), full.trace[:, None]) < 5).all())
        assert bool((_z(dv**2 * d, full.third) < 5).all())
        trace = high_order_residuals(
            model_score, v_random @ hess, eps, v_random, sigma, second_order_form="trace"
        )
        assert trace.frobenius is None and trace.third is None
        assert bool((_z(-(d @ d)[None], trace.trace[:, None]) < 5).all())
        if delta.any():  # the biases are large enough to be seen: the test has power
            assert float(full.third.mean(0).norm()) > 0.5 * float((dv**2 * d).norm())


def _perturbed(score_fn, theta: torch.Tensor, center):
    """s + θ₀ (x − c) + θ₁ c₂ ⊙ (x − c)²: θ₀ moves the Jacobian, θ₁ also ∇ tr J."""
    c2 = torch.tensor([0.5, -1.0, 0.7], dtype=D64)

    def fn(x, t):
        r = x - center(t)
        return score_fn(x, t) + theta[0] * r + theta[1] * c2 * r**2

    return fn, c2


def _vp_center(schedule):
    def center(t):
        return schedule(t).alpha[:, None] * MEAN

    return center


@pytest.mark.parametrize("kind", KINDS)
def test_derivatives_through_any_parametrization(kind):
    """The loss differentiates the network it is given: for s + θ₁ c₂ ⊙ (x − αμ)² predicted as
    any kind, its second and third terms equal the residuals of the closed-form J v =
    H v + 2 θ₁ c₂ ⊙ (x − αμ) ⊙ v and ∇(v·J v) = 2 θ₁ c₂ (v² = 1)."""
    schedule = VPSchedule()
    data = GaussianData(MEAN, COV)
    g = torch.Generator().manual_seed(3)
    x0 = data.sample(64, generator=g)
    center = _vp_center(schedule)
    theta = torch.tensor([0.0, 0.4], dtype=D64)
    score_fn, c2 = _perturbed(data.score_fn(schedule), theta, center)
    net = score_fn_to_kind(score_fn, schedule, kind)
    for form in ("full", "trace"):
        out = high_order_dsm_loss(
            net,
            schedule,
            x0,
            order=3,
            parametrization=kind,
            second_order_form=form,
            time_sampling="importance",
            generator=torch.Generator().manual_seed(5),
        )
        vals = schedule(out.t)
        a, s = vals.alpha[:, None], vals.sigma[:, None]
        x_t = a * x0 + s * out.noise
        r = x_t - a * MEAN
        hess = torch.stack([_hessian(schedule, float(ti)) for ti in out.t])
        jv = torch.einsum("bij,bj->bi", hess, out.probe) + 2 * theta[1] * c2 * r * out.probe
        res = high_order_residuals(
            score_fn(x_t, out.t),
            jv,
            out.noise,
            out.probe,
            vals.sigma,
            grad_vjv=(2 * theta[1] * c2).expand_as(x_t),
            second_order_form=form,
        )
        second = res.trace**2 / 3
        if form == "full":
            second = second + (res.frobenius**2).sum(1) / 3
        torch.testing.assert_close(out.second, second, rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(out.third, (res.third**2).sum(1) / 9, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("form", ["full", "trace"])
def test_true_score_is_stationary_and_perturbations_are_pulled_back(form):
    """The gradient (stop-gradient targets, as trained) of the mean second- and third-order
    terms is zero at the true score within 4.5 SE over 40 batches, and at a perturbed score
    θ points uphill (θ · ∇ > 0 by more than 4.5 SE): gradient descent moves back to the truth."""
    schedule = VPSchedule()
    data = GaussianData(MEAN, COV)
    center = _vp_center(schedule)
    g = torch.Generator().manual_seed(11)
    for theta0, terms in (((0.0, 0.0), None), ((0.3, 0.0), "second"), ((0.0, 0.3), "third")):
        theta = torch.tensor(theta0, dtype=D64, requires_grad=True)
        score_fn, _ = _perturbed(data.score_fn(schedule), theta, center)
        grads = {"second": [], "third": []}
        for _ in range(40):
            out = high_order_dsm_loss(
                score_fn,
                schedule,
                data.sample(500, generator=g),
                order=3,
                parametrization="score",
                second_order_form=form,
                time_sampling="importance",
                generator=g,
            )
            for name in grads:
                term = getattr(out, name) * out.weight  # the importance-sampled time integral
                grads[name].append(torch.autograd.grad(term.mean(), theta, retain_graph=True)[0])
        for name, gs in grads.items():
            gs = torch.stack(gs)
            mean, se = gs.mean(0), gs.std(0) / math.sqrt(len(gs))
            if terms is None:
                assert bool((mean.abs() <= 4.5 * se).all()), (name, mean, se)
            elif name == terms:
                pull = gs @ theta.detach()
                assert float(pull.mean()) > 4.5 * float(pull.std() / math.sqrt(len(pull))), name


def test_order_one_is_dsm_and_orders_add_terms():
    schedule = VPSchedule()
    data = GaussianData(MEAN, COV)
    x0 = data.sample(32, generator=torch.Generator().manual_seed(0))
    ref = dsm_loss(
        data.score_fn(schedule),
        schedule,
        x0,
        parametrization="score",
        weighting="likelihood",
        time_sampling="importance",
        generator=torch.Generator().manual_seed(1),
    )
    draws = dict(time=TimeSample(ref.t, ref.weight), noise=ref.noise, parametrization="score")
    one = high_order_dsm_loss(data.score_fn(schedule), schedule, x0, order=1, **draws)
    torch.testing.assert_close(one.loss, ref.loss)
    assert bool((one.second == 0).all() and (one.third == 0).all())
    two = high_order_dsm_loss(data.score_fn(schedule), schedule, x0, order=2, **draws)
    assert bool((two.second > 0).any()) and bool((two.third == 0).all())
    w = ref.weight * schedule(ref.t).g2 / schedule(ref.t).sigma ** 2
    torch.testing.assert_close(two.loss, 0.5 * w * (two.first + two.second))


def test_bad_arguments():
    schedule = VPSchedule()
    x0 = torch.zeros(4, 3, dtype=D64)
    fn = GaussianData(MEAN, COV).score_fn(schedule)
    with pytest.raises(ValueError, match="order 4: choose one of 1, 2, 3"):
        high_order_dsm_loss(fn, schedule, x0, order=4)
    with pytest.raises(ValueError, match="second_order_form 'diag'"):
        high_order_dsm_loss(fn, schedule, x0, second_order_form="diag")
    with pytest.raises(ValueError, match="high_order_weight must be >= 0"):
        high_order_dsm_loss(fn, schedule, x0, high_order_weight=-1.0)
