"""ODE log-likelihood and bounds, checked against the Gaussian oracle (no training)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from sdelab.likelihood import elbo, log_likelihood, scoreflow_bound
from sdelab.likelihood import ode as ode_module
from sdelab.likelihood.divergence import sample_probes
from sdelab.likelihood.ode import per_example_rms_norm
from sdelab.likelihood.options import Augmented, Exact, Hutchinson
from sdelab.oracle import GaussianData
from sdelab.sde import SubVPSchedule, VESchedule, VPSchedule

D64 = torch.float64


def rotation(d: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(
        torch.randn(d, d, dtype=D64, generator=torch.Generator().manual_seed(seed))
    )
    return q


def gaussian(evals: list[float], mean: list[float] | None = None, seed: int = 0) -> GaussianData:
    """Gaussian data with a rotated (non-diagonal) covariance of the given eigenvalues."""
    u = rotation(len(evals), seed)
    mean_t = torch.zeros(len(evals), dtype=D64) if mean is None else torch.tensor(mean, dtype=D64)
    return GaussianData(mean_t, u @ torch.diag(torch.tensor(evals, dtype=D64)) @ u.T)


def z_score(v: torch.Tensor, target: float) -> float:
    return abs(float(v.mean()) - target) / (float(v.std()) / math.sqrt(v.numel()))


# ---- exactness ------------------------------------------------------------------------------
@pytest.mark.parametrize("dim", [2, 8])
@pytest.mark.parametrize("schedule", [VESchedule(), VPSchedule(), SubVPSchedule()], ids=str)
def test_exact_trace_matches_closed_form(schedule, dim):
    """The flow maps p_{t_min} to p_T exactly, so log p_ODE(x) = log p_{t_min}(x) + log π(z) −
    log p_T(z); with centred data the prior mismatch log π − log p_T is below 1e-3 nats/dim
    too, so the ODE NLL matches the closed-form −log p_{t_min}(x) directly."""
    data = gaussian(torch.linspace(0.3, 1.0, dim).tolist(), seed=dim)
    x = data.sample(8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        res = log_likelihood(data.score_fn(schedule), schedule, x, tol=1e-5)
    exact = data.marginal_log_prob(x, schedule.t_min, schedule)
    mismatch = schedule.prior_logp(res.z) - data.marginal_log_prob(res.z, schedule.T, schedule)
    assert (res.logp - (exact + mismatch)).abs().max() < 1e-4 * dim
    assert (res.nll - (-exact)).abs().max() < 1e-3 * dim
    torch.testing.assert_close(res.logp, res.prior_logp + res.delta_logp)
    assert res.logp.shape == (8,) and res.z.shape == x.shape and res.nfe > 0


def test_any_rank_and_t_min():
    """Image-shaped data and a later start time t_min: still log p_{t_min}(x)."""
    data = gaussian([0.4, 0.6, 0.8, 1.0], seed=3)
    sde = VPSchedule()
    x = data.sample(4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        flat = log_likelihood(data.score_fn(sde), sde, x, t_min=0.1, tol=1e-5)
        img = log_likelihood(
            lambda y, t: data.score(y, t, sde),
            sde,
            x.reshape(4, 1, 2, 2),
            t_min=0.1,
            tol=1e-5,
            divergence=Exact(),  # an image's default is the randomized rule (data-set means)
            integrator=Augmented(),
        )
    torch.testing.assert_close(img.logp, flat.logp)
    assert img.z.shape == (4, 1, 2, 2) and flat.t_min == 0.1
    assert (flat.logp - data.marginal_log_prob(x, 0.1, sde)).abs().max() < 4e-3


# ---- Hutchinson -----------------------------------------------------------------------------
@pytest.mark.parametrize("probe", ["gaussian", "rademacher"])
def test_hutchinson_unbiased_with_variance_2_norm_over_k(probe):
    """For the oracle the Jacobian of v is the same at every x, so the Hutchinson error is
    (1/K) Σ_k ε_kᵀ M ε_k − tr M with M = ∫ ∂v/∂x dt = U diag(m) Uᵀ,
    m_i = ½ log((α_T² d_i + σ_T²)/(α_min² d_i + σ_min²)). Its mean is 0 and its variance
    2‖M‖_F²/K (Gaussian) or 2 Σ_{i≠j} M_ij²/K (Rademacher): checked within 4 standard errors."""
    evals = [0.1, 0.3, 1.0, 2.0]
    data = gaussian(evals, seed=7)
    sde = VPSchedule()
    x = data.sample(1000, generator=torch.Generator().manual_seed(2))
    sf = data.score_fn(sde)
    with torch.no_grad():
        exact = log_likelihood(sf, sde, x, tol=1e-6).logp
    ends = torch.tensor([sde.t_min, sde.T], dtype=D64)
    alpha, sigma = sde.alpha_sigma(ends)
    var = alpha[:, None] ** 2 * data.evals + sigma[:, None] ** 2  # (2, D)
    m = 0.5 * torch.log(var[1] / var[0])
    big_m = data.evecs @ torch.diag(m) @ data.evecs.T
    off = big_m - torch.diag(torch.diagonal(big_m))
    var_1 = 2 * float((big_m**2).sum() if probe == "gaussian" else (off**2).sum())
    for k in (1, 4):
        gen = torch.Generator().manual_seed(10 + k)
        with torch.no_grad():
            res = log_likelihood(
                sf,
                sde,
                x,
                divergence=Hutchinson(n_probes=k, probe=probe),
                integrator=Augmented(),  # probes fixed along the trajectory
                generator=gen,
                tol=1e-6,
            )
        err = res.logp - exact
        assert z_score(err, 0.0) < 4
        sq = (err - err.mean()) ** 2
        se_var = float(sq.std()) / math.sqrt(err.numel())
        assert abs(float(sq.mean()) - var_1 / k) < 4 * se_var, (k, float(sq.mean()), var_1 / k)


def test_probes_have_identity_second_moment():
    x = torch.zeros(4000, 3, dtype=D64)
    for probe in ("gaussian", "rademacher"):
        eps = sample_probes(x, 2, probe, torch.Generator().manual_seed(0))
        assert eps.shape == (2, 4000, 3)
        second = torch.einsum("kbi,kbj->ij", eps, eps) / 8000
        torch.testing.assert_close(second, torch.eye(3, dtype=D64), atol=0.08, rtol=0)
    assert set(sample_probes(x, 1, "rademacher").unique().tolist()) == {-1.0, 1.0}


# ---- per-example error control ----------------------------------------------------------------
def spinning_oracle(data: GaussianData, sde, rate: float):
    """Oracle score plus a divergence-free swirl: v gains rate·|x|² J x. The data are isotropic,
    so the swirl changes neither |x_t| nor the divergence and the exact log p is the oracle's,
    but an example at large |x| spins fast and needs small steps."""
    turn = torch.tensor([[0.0, -1.0], [1.0, 0.0]], dtype=D64)

    def score_fn(x, t):
        spin = rate * (x**2).sum(1, keepdim=True) * (x @ turn.T)
        return data.score(x, t, sde) - 2 * spin / sde(t).g2[:, None]

    return score_fn


def test_hard_example_does_not_change_the_others(monkeypatch):
    """With the per-example norm, adding one hard example changes the others by less than the
    tolerance and the hard one is exactly as accurate as when solved alone. torchdiffeq's default
    RMS over the whole batch lets the hard example's error grow several-fold instead."""
    data = GaussianData(torch.zeros(2, dtype=D64), torch.full((2,), 0.5, dtype=D64))
    sde = VPSchedule()
    score_fn = spinning_oracle(data, sde, rate=1.0)
    easy = 0.5 * data.sample(48, generator=torch.Generator().manual_seed(3))
    hard = torch.tensor([[2.0, 0.0]], dtype=D64)
    x = torch.cat([easy, hard])
    tol = 1e-4

    def solve(xx, integrator=None):
        with torch.no_grad():
            # the augmented design's error norm (the quadrature's: tests/test_quadrature.py)
            res = log_likelihood(score_fn, sde, xx, tol=tol, integrator=integrator or Augmented())
        exact = (
            data.marginal_log_prob(xx, sde.t_min, sde)
            + sde.prior_logp(res.z)
            - data.marginal_log_prob(res.z, sde.T, sde)
        )
        return res, (res.logp - exact).abs()

    alone, err_alone = solve(easy)
    hard_alone, _ = solve(hard)
    mixed, err_mixed = solve(x)
    assert hard_alone.nfe > 3 * alone.nfe  # the hard example really is hard
    assert (mixed.logp[:-1] - alone.logp).abs().max() < 3 * tol
    assert err_mixed.max() < 3 * tol and err_alone.max() < 3 * tol
    assert abs(float(mixed.logp[-1] - hard_alone.logp[0])) < 1e-6

    # one solve at tol with torchdiffeq's RMS over the whole batch instead of the per-example
    # norm: the hard example's error is several times its error alone
    once = Augmented(check=False)
    _, err_hard_once = solve(hard, once)
    monkeypatch.setattr(ode_module, "_state_norm", lambda b, d: lambda e: e.pow(2).mean().sqrt())
    _, err_global = solve(x, once)
    assert err_global[-1] > 3 * err_hard_once[0], (float(err_global[-1]), float(err_hard_once[0]))


def test_per_example_norm_is_max_of_rms():
    norm = per_example_rms_norm(3)
    err = torch.tensor([[0.0, 0.0], [3.0, 4.0], [1.0, 1.0]]).reshape(-1)
    assert float(norm(err)) == pytest.approx(math.sqrt(12.5))


# ---- gradients ------------------------------------------------------------------------------
class ScaledOracle(nn.Module):
    """The oracle score times (1 + θ): a score model with one scalar parameter."""

    def __init__(self, data: GaussianData, sde) -> None:
        super().__init__()
        self.data, self.sde = data, sde
        self.theta = nn.Parameter(torch.tensor(0.1, dtype=D64))

    def forward(self, x, t):
        return (1 + self.theta) * self.data.score(x, t, self.sde)


GRAD_TOL = dict(tol=1e-8)


@pytest.fixture(scope="module")
def gradient_problem():
    """NLL summed over 3 examples, and its central finite differences in θ and in x[1, 0]."""
    data = gaussian([0.3, 0.9], mean=[0.4, -0.2], seed=4)
    sde = VPSchedule()
    model = ScaledOracle(data, sde)
    x = data.sample(3, generator=torch.Generator().manual_seed(5))
    h = 1e-3

    def total(theta=0.1, dx=0.0):
        shift = torch.zeros_like(x)
        shift[1, 0] = dx
        with torch.no_grad():
            model.theta.fill_(theta)
            out = float(log_likelihood(model, sde, x + shift, **GRAD_TOL).nll.sum())
            model.theta.fill_(0.1)
        return out

    fd_theta = (total(theta=0.1 + h) - total(theta=0.1 - h)) / (2 * h)
    fd_x = (total(dx=h) - total(dx=-h)) / (2 * h)
    return model, sde, x, fd_theta, fd_x


@pytest.mark.parametrize("adjoint", [False, True], ids=["backprop", "adjoint"])
def test_gradient_matches_finite_difference(gradient_problem, adjoint):
    model, sde, x, fd_theta, fd_x = gradient_problem
    x = x.clone().requires_grad_(True)
    res = log_likelihood(model, sde, x, integrator=Augmented(adjoint=adjoint), **GRAD_TOL)
    assert res.policy.integrator == Augmented(adjoint=adjoint)
    nll = res.nll.sum()
    g_theta, g_x = torch.autograd.grad(nll, (model.theta, x))
    assert float(g_theta) == pytest.approx(fd_theta, rel=1e-4)
    assert float(g_x[1, 0]) == pytest.approx(fd_x, rel=1e-4)


def test_gradient_reaches_closure_tensors_and_adjoint_refuses_them():
    data = gaussian([0.5, 1.0], seed=5)
    sde = VPSchedule()
    theta = torch.tensor(0.2, dtype=D64, requires_grad=True)

    def score_fn(x, t):
        return (1 + theta) * data.score(x, t, sde)

    x = data.sample(2, generator=torch.Generator().manual_seed(0))
    (g,) = torch.autograd.grad(log_likelihood(score_fn, sde, x).logp.sum(), theta)
    assert torch.isfinite(g) and g != 0
    with pytest.raises(ValueError, match="nn.Module"):
        log_likelihood(score_fn, sde, x, integrator=Augmented(adjoint=True))
    # evaluation under no_grad keeps no graph
    with torch.no_grad():
        assert not log_likelihood(score_fn, sde, x).logp.requires_grad


# ---- bounds ---------------------------------------------------------------------------------
def predicted_gap(data: GaussianData, sde) -> float:
    """E_data[bound] − H(data) for the exact score: KL(p_T ‖ π) plus the decoder's
    E KL(p(x_0|x_ε) ‖ N(x̂_0, r² I)) = ½ Σ_i (c_i − 1 − log c_i), c_i = d_i / (d_i + r²),
    r² = σ²/α² at t_min (the Tweedie mean is the exact posterior mean)."""
    ends = torch.tensor([sde.t_min, sde.T], dtype=D64)
    alpha, sigma = sde.alpha_sigma(ends)
    c = data.evals / (data.evals + (sigma[0] / alpha[0]) ** 2)
    decoder = 0.5 * (c - 1 - c.log()).sum()
    var_t = (alpha[1] ** 2 * data.evals + sigma[1] ** 2) / sde.prior_std**2
    mean_t = alpha[1] ** 2 * (data.mean**2).sum() / sde.prior_std**2
    prior = 0.5 * (var_t.sum() + mean_t - data.dim - var_t.log().sum())
    return float(decoder + prior)


@pytest.mark.parametrize("bound", [elbo, scoreflow_bound])
def test_bounds_exceed_nll_by_the_predicted_gap(bound):
    """Averaged over data, each bound exceeds the exact NLL by exactly the predicted gap
    (within 4 standard errors): large at t_min = 0.1 for a thin direction (d = 0.02), and
    vanishing as t_min → 0 — so the bound is valid and tight where theory says."""
    data = gaussian([0.02, 0.5], mean=[0.5, -0.3], seed=6)
    x = data.sample(4000, generator=torch.Generator().manual_seed(0))
    nll = -data.log_prob(x)
    gen = torch.Generator().manual_seed(1)
    gaps = {}
    for t_min in (0.1, 1e-3):
        sde = VPSchedule(t_min=t_min)
        with torch.no_grad():
            res = bound(data.score_fn(sde), sde, x, n_samples=24, generator=gen)
        gap = res.nll_bound - nll
        gaps[t_min] = predicted_gap(data, sde)
        assert z_score(gap, gaps[t_min]) < 4, (t_min, float(gap.mean()), gaps[t_min])
        se = float(gap.std()) / math.sqrt(gap.numel())
        assert float(gap.mean()) > -3 * se  # a bound on average
        torch.testing.assert_close(res.nll_bound, res.prior + res.diffusion + res.boundary)
        assert res.se.shape == (4000,) and bool((res.se > 0).all())
    assert gaps[0.1] > 0.4 and gaps[1e-3] < 1e-4


def test_elbo_and_scoreflow_estimate_the_same_bound():
    """By Stein's identity the sdeflow and ScoreFlow integrands agree in expectation at every t,
    also for a wrong score: the two bounds agree within their standard errors."""
    data = gaussian([0.2, 0.8], seed=8)
    sde = VESchedule(t_min=0.05)

    def wrong(x, t):
        return 0.8 * data.score(x, t, sde) + 0.1

    x = data.sample(1000, generator=torch.Generator().manual_seed(2))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        a = elbo(wrong, sde, x, n_samples=16, generator=gen, time_sampling="importance")
        b = scoreflow_bound(wrong, sde, x, n_samples=16, generator=gen)
    diff = a.nll_bound - b.nll_bound
    assert z_score(diff, 0.0) < 4
    assert float(b.nll_bound.mean()) > float(-data.log_prob(x).mean()) + 0.05  # wrong ⇒ looser


def test_bounds_are_differentiable():
    data = gaussian([0.5, 1.0], seed=9)
    sde = VPSchedule()
    model = ScaledOracle(data, sde)
    x = data.sample(8, generator=torch.Generator().manual_seed(0))
    for bound in (elbo, scoreflow_bound):
        out = bound(model, sde, x, n_samples=2, generator=torch.Generator().manual_seed(1))
        (g,) = torch.autograd.grad(out.nll_bound.mean(), model.theta)
        assert torch.isfinite(g)


# ---- data-set evaluation --------------------------------------------------------------------
def test_bad_input_raises_clear_errors():
    data = gaussian([0.5, 1.0], seed=11)
    sde = VPSchedule()
    sf = data.score_fn(sde)
    x = data.sample(2)
    cases = [
        (dict(x=torch.ones(2, 2, dtype=torch.long)), "bits_per_dim"),
        (dict(x=torch.tensor([[float("nan"), 0.0]], dtype=D64)), "NaN"),
        (dict(x=torch.zeros(3, dtype=D64)), "batch"),
        (dict(divergence="exact"), r"Exact\(\) or Hutchinson\(\)"),
        (dict(integrator="augmented"), r"Augmented\(\), Quadrature\(\) or Randomized\(\)"),
        (dict(tol=0.0), "tol must be a positive number of nats"),
        (dict(tol=float("nan")), "tol must be a positive number of nats"),
        (dict(t_min=0.0), "t_min"),
        (dict(t_min=1.0), "t_min"),
    ]
    for kwargs, match in cases:
        args = {"x": x, **kwargs}
        with pytest.raises(ValueError, match=match):
            log_likelihood(sf, sde, args.pop("x"), **args)
    with pytest.raises(ValueError, match="n_samples"):
        scoreflow_bound(sf, sde, x, n_samples=1)
    with pytest.raises(ValueError, match="t_min > 0"):
        elbo(sf, VPSchedule(t_min=0.0), x, n_samples=2)
