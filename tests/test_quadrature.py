"""The quadrature integrator of the ODE likelihood (sdelab.likelihood.quadrature), against exact
answers: polynomial exactness of the rule, the Gaussian oracle's closed-form density, the
variance law of Hutchinson at the nodes, a tail point in a batch, and the decoder bound on
log p_0."""

from __future__ import annotations

import math

import pytest
import torch

from sdelab.likelihood import log_likelihood as _log_likelihood
from sdelab.likelihood.divergence import exact_trace
from sdelab.likelihood.ode import decoder_bound
from sdelab.likelihood.options import Augmented, Exact, Hutchinson, Quadrature, Randomized
from sdelab.likelihood.quadrature import clenshaw_curtis, quadrature_grid
from sdelab.oracle import GaussianData
from sdelab.sde import SubVPSchedule, VESchedule, VPSchedule

D64 = torch.float64


def log_likelihood(score_fn, schedule, x, *, tol=None, divergence=None, generator=None, **knobs):
    """The quadrature integrator under test (opt-in: the library default is augmented), with
    ``knobs`` its settings (:class:`Quadrature`)."""
    return _log_likelihood(
        score_fn,
        schedule,
        x,
        tol=tol,
        divergence=divergence,
        integrator=Quadrature(**knobs),
        generator=generator,
    )


def gaussian(dim: int, seed: int, lo: float = 0.2, hi: float = 1.5) -> GaussianData:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(dim, dim, dtype=D64, generator=g))
    evals = torch.linspace(lo, hi, dim, dtype=D64)
    mean = 0.3 * torch.randn(dim, dtype=D64, generator=g)
    return GaussianData(mean, q @ torch.diag(evals) @ q.T)


def closed_form(data: GaussianData, schedule, x, z):
    """log p_ODE(x) for the oracle's flow: log p_{t_min}(x) + log π(z) − log p_T(z)."""
    return (
        data.marginal_log_prob(x, schedule.t_min, schedule)
        + schedule.prior_logp(z)
        - data.marginal_log_prob(z, schedule.T, schedule)
    )


# ---- the rule -----------------------------------------------------------------------------
@pytest.mark.parametrize("n", [2, 4, 8, 16])
def test_clenshaw_curtis_is_exact_to_degree_n_and_nested(n):
    nodes, w = clenshaw_curtis(n)
    for k in range(n + 1):
        exact = (1 - (-1) ** (k + 1)) / (k + 1)  # ∫_{-1}^{1} u^k du
        assert abs(float((w * nodes**k).sum()) - exact) < 1e-12
    fine, _ = clenshaw_curtis(2 * n)
    torch.testing.assert_close(fine[::2], nodes)


@pytest.mark.parametrize("variable", ["t", "log_snr"])
def test_grid_weights_integrate_in_time(variable):
    """Σ w_k h(t_k) → ∫ h dt for a smooth h (the change of variable's Jacobian is in w)."""
    sde = VPSchedule()
    grid = quadrature_grid(sde, sde.t_min, [32, 64], variable)
    h = torch.cos(3 * grid.times)
    exact = (math.sin(3 * sde.T) - math.sin(3 * sde.t_min)) / 3
    assert abs(float((grid.weights[64] * h).sum()) - exact) < 1e-6
    assert float(grid.times[0]) == sde.t_min and float(grid.times[-1]) == sde.T


def test_forward_and_reverse_exact_trace_agree():
    data = gaussian(6, seed=1)
    sde = VPSchedule()
    x = data.sample(5, generator=torch.Generator().manual_seed(0))
    t = torch.full((5,), 0.3, dtype=D64)

    def flow(xx):
        return sde.probability_flow(xx, t, torch.tanh(data.score_fn(sde)(xx, t)))

    torch.testing.assert_close(
        exact_trace(flow, x, "forward"), exact_trace(flow, x, "reverse"), rtol=1e-10, atol=1e-10
    )


# ---- the likelihood ---------------------------------------------------------------------------
@pytest.mark.parametrize("variable", ["t", "log_snr"])
@pytest.mark.parametrize("schedule", [VPSchedule(), VESchedule(), SubVPSchedule()], ids=str)
def test_quadrature_matches_closed_form_per_example(schedule, variable):
    """tol = 1e-3 nats: every example within 3·tol of the closed form (D = 16), the reported
    error estimate at most 3·tol and above the true error."""
    data = gaussian(16, seed=3)
    x = data.sample(32, generator=torch.Generator().manual_seed(2))
    tol = 1e-3
    with torch.no_grad():
        res = log_likelihood(data.score_fn(schedule), schedule, x, tol=tol, time_variable=variable)
    assert res.policy.integrator == Quadrature(time_variable=variable)
    assert res.policy.divergence == Exact() and res.density == "log p_t_min"
    err = (res.logp - closed_form(data, schedule, x, res.z)).abs()
    assert float(err.max()) < 3 * tol, float(err.max())
    assert float(res.error.max()) <= 3 * tol + 1e-12
    assert float((res.error >= err).double().mean()) >= 0.9
    torch.testing.assert_close(res.logp, res.prior_logp + res.delta_logp)


def test_quadrature_needs_no_grad_and_the_default_is_augmented():
    data = gaussian(2, seed=0)
    sde = VPSchedule()
    x = data.sample(4, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    with pytest.raises(ValueError, match=r"Quadrature computes no gradients: use Augmented\(\)"):
        log_likelihood(data.score_fn(sde), sde, x)
    res = _log_likelihood(data.score_fn(sde), sde, x)
    assert res.policy.integrator == Augmented() and res.logp.requires_grad
    with pytest.raises(ValueError, match="integrator must be"):
        _log_likelihood(data.score_fn(sde), sde, x.detach(), integrator="simpson")


@pytest.mark.parametrize("probe", ["rademacher", "gaussian"])
def test_hutchinson_at_nodes_unbiased_with_the_node_variance_law(probe):
    """Fresh probes at each of the fixed rule's nodes: the estimate is unbiased for the exact
    trace's quadrature on the same nodes, with variance Σ_k w_k² Var_k / K, where for the
    oracle's symmetric Jacobian J_k (independent of x) Var_k = 2‖J_k‖_F² (Gaussian probes)
    or 2 Σ_{i≠j} (J_k)_ij² (Rademacher)."""
    data = gaussian(4, seed=5, lo=0.3, hi=1.0)
    sde = VPSchedule()
    sf = data.score_fn(sde)
    x = data.sample(2000, generator=torch.Generator().manual_seed(4))
    rule = dict(min_nodes=8, max_nodes=8, tol=1e-7)
    fresh = dict(refresh_probes=True)
    with torch.no_grad():
        exact = log_likelihood(sf, sde, x, **rule).logp
    grid = quadrature_grid(sde, sde.t_min, [8], "t")
    var = 0.0
    for tk, wk in zip(grid.times, grid.weights[8], strict=True):
        tb = tk.reshape(1)
        alpha, sigma = sde.alpha_sigma(tb)
        cov_t = alpha**2 * data.cov + sigma**2 * torch.eye(4, dtype=D64)
        jac = sde.f(tb) * torch.eye(4, dtype=D64) + 0.5 * sde.g2(tb) * torch.linalg.inv(cov_t)
        off = jac - torch.diag(torch.diagonal(jac))
        var += float(wk) ** 2 * 2 * float((jac**2).sum() if probe == "gaussian" else (off**2).sum())
    for k in (1, 4):
        with torch.no_grad():
            res = log_likelihood(
                sf, sde, x, divergence=Hutchinson(n_probes=k, probe=probe),
                generator=torch.Generator().manual_seed(10 + k), **rule, **fresh,
            )  # fmt: skip
        err = res.logp - exact
        se = float(err.std()) / math.sqrt(err.numel())
        assert abs(float(err.mean())) < 4 * se
        sq = (err - err.mean()) ** 2
        assert abs(float(sq.mean()) - var / k) < 4 * float(sq.std()) / math.sqrt(err.numel())


def test_hutchinson_at_nodes_beats_probes_fixed_along_the_path():
    """Independent probes per node average out along the path; fixed ones do not."""
    data = gaussian(8, seed=6)
    sde = VPSchedule()
    sf = data.score_fn(sde)
    x = data.sample(400, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        exact = log_likelihood(sf, sde, x).logp
        kw = dict(divergence=Hutchinson(), generator=torch.Generator().manual_seed(3))
        nodes = log_likelihood(
            sf, sde, x, refresh_probes=True, min_nodes=16, max_nodes=16, **kw
        ).logp
        fixed = _log_likelihood(sf, sde, x, integrator=Augmented(), **kw).logp
    assert float((nodes - exact).pow(2).mean()) < 0.5 * float((fixed - exact).pow(2).mean())


def test_fixed_probes_refine_like_the_exact_trace():
    """Default Hutchinson with the quadrature: probes fixed per example, so the nested rule
    converges for each example's εᵀJε (its error estimate stays within 3·tol); on the oracle
    the estimate is unbiased for the exact log-likelihood, and refresh_probes without a fixed
    rule is refused."""
    data = gaussian(4, seed=8)
    sde = VESchedule()
    sf = data.score_fn(sde)
    x = data.sample(1000, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        exact = log_likelihood(sf, sde, x, tol=1e-3).logp
        res = log_likelihood(
            sf,
            sde,
            x,
            tol=1e-3,
            divergence=Hutchinson(),
            generator=torch.Generator().manual_seed(2),
        )
    assert res.probe_se is None  # one probe: no spread to report
    err = res.logp - exact
    assert abs(float(err.mean())) < 4 * float(err.std()) / math.sqrt(err.numel())
    assert float(res.error.max()) <= 3e-3 + 1e-12
    with pytest.raises(ValueError, match="fixed rule"):
        log_likelihood(sf, sde, x[:2], divergence=Hutchinson(), refresh_probes=True)


def tail_batch():
    """VE, D = 2: 255 draws and a point at Mahalanobis radius 11 last (issue 17, item 3)."""
    cov = torch.tensor([[1.0, 0.6], [0.6, 0.8]], dtype=D64)
    data = GaussianData(torch.tensor([0.3, -0.2], dtype=D64), cov)
    x = data.sample(255, generator=torch.Generator().manual_seed(0))
    tail = data.mean + 11 * (torch.linalg.cholesky(cov) @ torch.tensor([0.6, 0.8], dtype=D64))
    return data, torch.cat([x, tail[None]]), tail, VESchedule()


def test_tail_point_is_not_worse_off_in_its_batch():
    """VE, D = 2: a point at Mahalanobis radius 11 among 255 draws, tol = 1e-3 nats. The
    step controller also watches log π(x_t) in absolute nats, so the tail point's error stays
    within 3·tol in the batch and alone, and its error estimate covers it."""
    data, xb, tail, sde = tail_batch()
    sf = data.score_fn(sde)
    tol = 1e-3
    with torch.no_grad():
        batch = log_likelihood(sf, sde, xb, tol=tol)
        alone = log_likelihood(sf, sde, tail[None], tol=tol)
    err_batch = float((batch.logp - closed_form(data, sde, xb, batch.z)).abs()[-1])
    err_alone = float((alone.logp - closed_form(data, sde, tail[None], alone.z)).abs()[0])
    assert err_batch < 3 * tol and err_alone < 3 * tol, (err_batch, err_alone)
    assert float(batch.error[-1]) >= err_batch and float(alone.error[0]) >= err_alone


@pytest.mark.parametrize("integrator", [Quadrature(), Augmented()], ids=["quadrature", "augmented"])
def test_decoder_bound_bounds_log_p0(integrator):
    """decoder_bound estimates a lower bound on log p_0(x): on Gaussian data (exact log p_0)
    its mean gap is ≤ 0 up to noise and small at t_min = 1e-3, and its label says so; it needs
    σ(t_min) > 0."""
    data = gaussian(2, seed=2, lo=0.3, hi=1.0)
    sde = VPSchedule(t_min=1e-3)
    x = data.sample(1000, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        res = decoder_bound(
            data.score_fn(sde),
            sde,
            x,
            integrator=integrator,
            generator=torch.Generator().manual_seed(8),
        )
    assert res.density == "log p_0 (decoder bound)" and res.policy.integrator == integrator
    gap = res.logp - data.log_prob(x)
    se = float(gap.std()) / math.sqrt(gap.numel())
    assert float(gap.mean()) < 4 * se
    assert float(gap.mean()) > -0.05
    with pytest.raises(ValueError, match="σ\\(t_min\\) > 0"):
        decoder_bound(data.score_fn(sde), VPSchedule(t_min=0.0), x[:2], integrator=integrator)


def test_unmet_quadrature_tolerance_warns():
    """An example whose error stays above tol (a rule capped at 4 intervals) is flagged, and its
    error estimate says so."""
    data = gaussian(4, seed=0)
    sde = VESchedule()
    x = data.sample(3, generator=torch.Generator().manual_seed(0))
    with pytest.warns(RuntimeWarning, match="did not meet tol=1e-06"), torch.no_grad():
        res = log_likelihood(data.score_fn(sde), sde, x, min_nodes=2, max_nodes=4, tol=1e-6)
    assert bool((res.error > 1e-6).any())


# ---- the randomly shifted rule (integrator="randomized") ----------------------------------
def test_randomized_rule_matches_the_oracle_density():
    """On the Gaussian oracle (a smooth divergence) 16 shifted nodes with the exact trace give
    every example's closed-form log-density to 1e-3 nats, whatever the shift."""
    data, sde = gaussian(6, 0), VPSchedule()
    x = data.sample(32, generator=torch.Generator().manual_seed(1)).to(D64)
    for seed in range(3):
        res = _log_likelihood(
            data.score_fn(sde),
            sde,
            x,
            tol=1e-7,
            divergence=Exact(),
            integrator=Randomized(nodes=16, method="dopri5"),
            generator=torch.Generator().manual_seed(seed),
        )
        err = (res.logp - closed_form(data, sde, x, res.z)).abs().max()
        assert float(err) < 1e-3, (seed, float(err))
        assert res.policy.integrator == Randomized(nodes=16, method="dopri5")
        assert bool((res.divergence_evals == 16).all())


class _Wobbly(torch.nn.Module):
    """The oracle's score times (1 + 0.3 sin(300 t)): a divergence that oscillates in t, like a
    network with the DDPM time embedding (whose fastest feature is sin(1000 t))."""

    def __init__(self, data: GaussianData, sde) -> None:
        super().__init__()
        self.score, self.sde = data.score_fn(sde), sde

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.score(x, t) * (1 + 0.3 * torch.sin(300 * t)).reshape(-1, 1)


@pytest.mark.slow  # ~20 s: the oscillation needs thousands of steps
def test_randomized_rule_is_unbiased_where_a_fixed_rule_is_not():
    """With an oscillating divergence a fixed 8-interval Clenshaw–Curtis rule is off by its
    aliasing error (≈ 1.8 nats here), while the mean of the shifted 8-node rule over 64 shifts
    sits within 4 standard errors of the augmented reference (tol 1e-4 nats, far below that
    standard error) — and the fixed rule's error exceeds three of those standard errors."""
    data, sde = gaussian(2, 3), VPSchedule()
    score = _Wobbly(data, sde)
    x = data.sample(1, generator=torch.Generator().manual_seed(0)).to(D64)
    rule = Randomized(nodes=8, method="dopri5", solve_in="t")
    with torch.no_grad():
        ref = _log_likelihood(score, sde, x, tol=1e-4, integrator=Augmented())
        xs = x.expand(8, -1).contiguous()  # one example 8 times: 8 groups, 8 independent shifts
        est = torch.cat(
            [
                _log_likelihood(
                    score,
                    sde,
                    xs,
                    tol=1e-3,
                    divergence=Exact(),
                    integrator=rule,
                    generator=torch.Generator().manual_seed(seed),
                ).logp
                for seed in range(8)
            ]
        )
        fixed = log_likelihood(score, sde, x, min_nodes=8, max_nodes=8, tol=1e-4)
    mean, se, ref = float(est.mean()), float(est.std() / math.sqrt(est.numel())), float(ref.logp[0])
    assert abs(mean - ref) < 4 * se, (mean, ref, se)
    assert abs(float(fixed.logp[0]) - ref) > 3 * se, (float(fixed.logp[0]), ref, se)


# ---- the forward-only solve in log-SNR (solve_in="log_snr", the randomized rule's default) --
@pytest.mark.parametrize("schedule", [VPSchedule(), VESchedule(), SubVPSchedule()])
def test_forward_path_in_log_snr_is_the_flow_of_the_oracle(schedule):
    """Solved in λ instead of t, the forward-only path is the same probability-flow map: on
    the Gaussian oracle, x_T from both variables agrees to the tolerance's order and (VP) the
    randomized rule's density (exact trace) matches the closed form to 1e-3 nats."""
    from sdelab.likelihood.forward import forward_path

    data = gaussian(5, 2)
    x = data.sample(16, generator=torch.Generator().manual_seed(4)).to(D64)
    score = data.score_fn(schedule)
    times = torch.tensor([schedule.t_min, 0.3, schedule.T], dtype=D64)
    paths = {
        var: forward_path(
            score, schedule, x, schedule.t_min, times, method="dopri5", rtol=1e-8, atol=1e-8,
            options={}, wide=D64, prior_control=False, solve_in=var,
        )[0]
        for var in ("t", "log_snr")
    }  # fmt: skip
    assert float((paths["t"] - paths["log_snr"]).abs().max()) < 1e-5
    assert torch.equal(paths["log_snr"][0], x.reshape(16, -1))  # starts at the data
    if not isinstance(schedule, VPSchedule):  # 16 nodes in t resolve VP's divergence only
        return
    res = _log_likelihood(
        score, schedule, x, tol=1e-7, divergence=Exact(),
        integrator=Randomized(nodes=16, method="dopri5"),
        generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    err = (res.logp - closed_form(data, schedule, x, res.z)).abs().max()
    assert float(err) < 1e-3, float(err)


def test_forward_path_refuses_an_unknown_variable():
    from sdelab.likelihood.forward import forward_path

    sde = VPSchedule()
    x = torch.zeros(2, 3, dtype=D64)
    with pytest.raises(ValueError, match="unknown solve_in 'sigma'"):
        forward_path(
            lambda xx, tt: -xx, sde, x, sde.t_min, torch.tensor([sde.t_min, 1.0], dtype=D64),
            method="dopri5", rtol=1e-5, atol=1e-5, options={}, wide=D64, solve_in="sigma",
        )  # fmt: skip


def test_steps_per_example_give_the_tail_point_its_value_alone():
    """Issue 17, item 3, at every tolerance: with step_control="example" the tail point's
    log-likelihood in the batch equals its value alone (1e-2 and 1e-3), and at tol = 1e-3 it is
    within 3·tol of the closed form."""
    data, xb, tail, sde = tail_batch()
    score = data.score_fn(sde)
    kw = dict(method="dopri5", step_control="example")
    with torch.no_grad():
        for tol in (1e-2, 1e-3):
            batch = log_likelihood(score, sde, xb, tol=tol, **kw)
            alone = log_likelihood(score, sde, tail[None], tol=tol, **kw)
            assert math.isclose(float(batch.logp[-1]), float(alone.logp[0]), abs_tol=1e-9)
            assert math.isclose(float(batch.error[-1]), float(alone.error[0]), abs_tol=1e-9)
    err = float((alone.logp - closed_form(data, sde, tail[None], alone.z)).abs()[0])
    assert err < 3e-3, err


# ---- the fixed-grid exponential integrator of the forward solve (method="dpm2m"/"dpm3m") ---
@pytest.mark.parametrize("schedule", [VPSchedule(), VESchedule()])
def test_exponential_path_converges_at_its_order(schedule):
    """DPM-Solver++ run forward (data → prior) has global order 2 (2M) and 3 (3M) in the
    step of λ: doubling the steps divides the error of x(t) — at an inner time (dense output)
    and at T — by ≈ 4 and ≈ 8, against a dopri8 solve at 1e-11 on the oracle."""
    from sdelab.likelihood.forward import exponential_path, forward_path

    data = gaussian(5, 2)
    x = data.sample(16, generator=torch.Generator().manual_seed(4)).to(D64)
    score = data.score_fn(schedule)
    times = torch.tensor([schedule.t_min, 0.3, schedule.T], dtype=D64)
    ref = forward_path(
        score, schedule, x, schedule.t_min, times, method="dopri8", rtol=1e-11, atol=1e-11,
        options={}, wide=D64, prior_control=False, solve_in="log_snr",
    )[0]  # fmt: skip
    for order, (lo, hi) in {2: (3.3, 4.8), 3: (6.5, 24.0)}.items():
        errs = []
        for n in (32, 64, 128):
            path = exponential_path(score, schedule, x, schedule.t_min, times, steps=n, order=order)
            errs.append(float((path[0] - ref).abs().max()))
        ratios = [errs[0] / errs[1], errs[1] / errs[2]]
        assert all(lo < r < hi for r in ratios), (order, errs, ratios)
    path, nfe = exponential_path(score, schedule, x, schedule.t_min, times, steps=8, order=3)
    assert torch.equal(path[0], x.reshape(16, -1)) and nfe == 9  # starts at the data


def test_randomized_rule_with_the_exponential_solve_matches_the_oracle():
    """The randomized rule on a 48-step 3M path: the mean log-density of 256 oracle draws
    (exact trace) within 0.01 nats of the closed form; the NFE is steps + 1 (the start)."""
    data, sde = gaussian(5, 2), VPSchedule()
    x = data.sample(256, generator=torch.Generator().manual_seed(4)).to(D64)
    res = _log_likelihood(
        data.score_fn(sde), sde, x, divergence=Exact(),
        integrator=Randomized(nodes=32, method="dpm3m", steps=48),
        generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    exact = data.marginal_log_prob(x, sde.t_min, sde)
    assert res.nfe == 49 and res.policy.tol is None  # a fixed grid takes no tolerance
    assert abs(float((res.logp - exact).mean())) < 0.01


def test_exponential_solve_refuses_what_it_cannot_do():
    from sdelab.likelihood.forward import forward_path

    sde = VPSchedule()
    x = torch.zeros(2, 3, dtype=D64)
    times = torch.tensor([sde.t_min, 1.0], dtype=D64)
    common = dict(rtol=1e-5, atol=1e-5, wide=D64)
    with pytest.raises(ValueError, match="needs options=\\{'steps': N\\}"):
        forward_path(lambda xx, tt: -xx, sde, x, sde.t_min, times, method="dpm2m",
                     options={}, solve_in="log_snr", **common)  # fmt: skip
    with pytest.raises(ValueError, match="pass solve_in='log_snr'"):
        forward_path(lambda xx, tt: -xx, sde, x, sde.t_min, times, method="dpm3m",
                     options={"steps": 8}, solve_in="t", **common)  # fmt: skip
