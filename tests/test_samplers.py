"""Samplers against the Gaussian oracle: marginal statistics, convergence order, the exact
discrete chains of DDPM / SMLD / Score-SDE, reproducibility and option checking."""

from __future__ import annotations

import inspect
import math

import pytest
import torch

from sdelab.oracle import GaussianData
from sdelab.parametrization import ScoreModel, score_fn_to_kind
from sdelab.samplers import (
    PREDICTORS,
    SAMPLERS,
    TABLEAUX,
    SampleResult,
    sample,
    sampler_options,
    time_grid,
)
from sdelab.samplers.stochastic import (
    ancestral_predictor,
    langevin_corrector,
    reverse_diffusion_predictor,
)
from sdelab.sde import SubVPSchedule, VESchedule, VPSchedule

D64 = torch.float64
N_SAMPLES = 4000


Z = 4.5  # standard errors allowed for each statistic (fixed seeds: no flakiness)


def anisotropic_gaussian(d: int, seed: int = 0, dtype=torch.float32) -> GaussianData:
    """N(μ, Σ) with μ ~ N(0, I) and Σ = U diag(0.25 … 4) Uᵀ for a random rotation U."""
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=D64))
    evals = torch.logspace(math.log10(0.25), math.log10(4.0), d, dtype=D64)
    mean = torch.randn(d, generator=g, dtype=D64)
    return GaussianData(mean.to(dtype), (u @ torch.diag(evals) @ u.T).to(dtype))


def assert_matches_data(x: torch.Tensor, data: GaussianData, budget_mean: float, budget_cov: float):
    """Whitened samples w = Σ^{-1/2}(x − μ) must have mean 0 and covariance I.

    Tolerance = sampling error + discretisation budget. With n samples each component of the
    sample mean of w has std 1/√n, and each entry of its sample covariance std √((1 + δ_ij)/n)
    ≤ √(2/n); we allow Z = 4.5 of those (n = 4000: 0.071 on the mean, 0.10 on the covariance).
    """
    n = x.shape[0]
    ev, u = data.evals.to(D64), data.evecs.to(D64)
    w = (x.to(D64) - data.mean.to(D64)) @ (u * ev.rsqrt()) @ u.T
    mean_err = float(w.mean(0).abs().max())
    cov_err = float((torch.cov(w.T) - torch.eye(data.dim, dtype=D64)).abs().max())
    tol_mean = Z / math.sqrt(n) + budget_mean
    tol_cov = Z * math.sqrt(2 / n) + budget_cov
    assert mean_err < tol_mean, f"whitened mean off by {mean_err:.3f} > {tol_mean:.3f}"
    assert cov_err < tol_cov, f"whitened covariance off by {cov_err:.3f} > {tol_cov:.3f}"


def prior_mismatch(schedule, data: GaussianData, deterministic: bool) -> float:
    """Whitened mean error a sampler inherits from the prior N(0, s² I) ≠ p_T = N(α_T μ, …).

    In each eigendirection of Σ (variance λ_i, v_t = α_t² λ_i + σ_t²) a start-up mean error e_T
    reaches t ≈ 0 as e_T √(v_0/v_T) along the probability-flow ODE and as e_T v_0/v_T along the
    reverse SDE (the mean obeys de = (f + (1 − λ/2) g²/v) e dt and dv = (2 f v + g²) dt). With
    e_T = α_T μ_i, v_0 ≈ λ_i and v_T ≥ σ_T², the whitened errors are at most α_T ‖μ‖/σ_T
    (VE: ‖μ‖/50) and α_T ‖μ‖ √λ_max/σ_T² (small but for VDM's α_T ≈ 0.08).
    """
    alpha_T, sigma_T = schedule.alpha_sigma(torch.tensor(schedule.T, dtype=D64))
    mu = float(alpha_T * data.mean.to(D64).norm())
    if deterministic:
        return mu / float(sigma_T)
    return mu * float(data.evals.max().sqrt()) / float(sigma_T) ** 2


SCHEDULES = {"ve": VESchedule, "vp": VPSchedule, "subvp": SubVPSchedule}

# (sampler, options, discretisation budget on the whitened mean and covariance, deterministic).
# Budgets are the exact-law errors of these step counts on this oracle (Gaussian moment
# recursions / affine probes, see benchmarks/bench_samplers.py), rounded up: first-order SDE
# steps at N = 100 miss the covariance by ≲ 2 %; Langevin with snr = 0.16 inflates it by
# ≈ ε/2v ≲ 4 %; NCSN's ALD steps ∝ σ² freeze out at small σ (≈ 4.5 % at 50 × 10, snr 0.5);
# the VE probability-flow ODE is stiff at its high-noise end, so Euler at 500 steps is 8 % and
# Heun at 40 steps 6.5 % off there (1e-3 on VP), RK4 at 12 steps 2.4 %, DPM-Solver++ 2.6 %.
CASES = {
    "euler_maruyama": ("euler_maruyama", dict(steps=100), 0.03, False),
    "reverse_diffusion": ("reverse_diffusion", dict(steps=200), 0.05, False),
    "ancestral": ("ancestral", dict(steps=200), 0.075, False),
    "pc_langevin": (
        "pc",
        dict(steps=50, predictor="reverse_diffusion", corrector="langevin", denoise=True),
        0.05,
        False,
    ),
    "pc_ald": ("pc", dict(steps=50, predictor="euler_maruyama", corrector="ald"), 0.04, False),
    "lambda_0.5": ("lambda", dict(steps=100, lam=0.5), 0.03, False),
    "ode_euler": ("ode", dict(steps=500, method="euler"), 0.1, True),
    "ode_heun": ("ode", dict(steps=40, method="heun"), 0.08, True),
    "ode_rk4": ("ode", dict(steps=12, method="rk4"), 0.03, True),
    "ode_dopri5": ("ode", dict(steps=4, method="dopri5"), 0.01, True),
    "dpm_solver": ("dpm_solver", dict(steps=40, grid="logsnr"), 0.03, True),
}


@pytest.mark.parametrize("dim", [2, 16])
@pytest.mark.parametrize("sched", list(SCHEDULES))
@pytest.mark.parametrize("case", list(CASES))
def test_samples_match_gaussian_data(case, sched, dim):
    sampler, options, budget, deterministic = CASES[case]
    schedule, data = SCHEDULES[sched](), anisotropic_gaussian(dim)
    res = sample(
        data.score_fn(schedule), schedule, (N_SAMPLES, dim), sampler=sampler, generator=7, **options
    )
    budget_mean = budget + prior_mismatch(schedule, data, deterministic)
    assert_matches_data(res.samples, data, budget_mean, budget)


def test_annealed_langevin_matches_data_on_ve():
    """NCSN's sampler (Song & Ermon 2019) is an SMLD/VE method: with step ∝ σ² it freezes
    once σ² ≪ the data variance, which on VE at 50 levels × 10 steps, snr 0.5, leaves ≈ 4.5 %
    variance inflation (its exact 1-D moment recursion); on VP the mean cannot follow α_t μ."""
    schedule, data = VESchedule(), anisotropic_gaussian(2)
    res = sample(
        data.score_fn(schedule),
        schedule,
        (N_SAMPLES, 2),
        sampler="annealed_langevin",
        steps=50,
        n_corrector_steps=10,
        snr=0.5,
        generator=3,
    )
    assert res.nfe == 500
    assert_matches_data(res.samples, data, 0.02, 0.06)


@pytest.mark.parametrize("sched", ["vp", "ve"])
def test_lambda_family_shares_marginals(sched):
    """λ = 0 (reverse SDE), 0.5 and 1 (probability-flow ODE) all sample p_0 (Huang et al. 2021)."""
    schedule, data = SCHEDULES[sched](), anisotropic_gaussian(2)
    stats = []
    for lam in (0.0, 0.5, 1.0):
        res = sample(
            data.score_fn(schedule),
            schedule,
            (N_SAMPLES, 2),
            sampler="lambda",
            lam=lam,
            steps=200,
            generator=11,
        )
        # 200 Euler steps: ≤ 1 % SDE bias; λ = 1 is the Euler ODE (VE: ≈ 15 % at 200 steps).
        budget = 0.16 if (lam == 1.0 and sched == "ve") else 0.02
        extra = prior_mismatch(schedule, data, deterministic=lam == 1.0)
        assert_matches_data(res.samples, data, budget + extra, budget)
        stats.append((res.samples.mean(0), torch.cov(res.samples.T)))
    # λ = 0 and 0.5 against each other: two independent sample means differ by √2 σ/√n.
    (m0, c0), (m5, c5) = stats[0], stats[1]
    scale = data.evals.max().sqrt()
    assert float((m0 - m5).abs().max()) < Z * math.sqrt(2 / N_SAMPLES) * scale + 0.02
    assert float((c0 - c5).abs().max()) < Z * math.sqrt(4 / N_SAMPLES) * scale**2 + 0.1


# ---- convergence order of the fixed-step probability-flow solvers --------------------------
@pytest.fixture(scope="module")
def order_problem():
    """A smooth region of the VP probability-flow ODE in float64, t ∈ [0.1, 1], with a
    dopri5 reference solution at rtol = atol = 1e-12."""
    schedule = VPSchedule(t_min=0.1)
    data = anisotropic_gaussian(2, dtype=D64)
    x_T = schedule.prior_sample((32, 2), generator=torch.Generator().manual_seed(0), dtype=D64)
    ref = sample(
        data.score_fn(schedule),
        schedule,
        None,
        sampler="ode",
        method="dopri5",
        rtol=1e-12,
        atol=1e-12,
        steps=1,
        x_init=x_T,
    ).samples
    return schedule, data, x_T, ref


def _slope(steps, errors) -> float:
    """Least-squares slope of log(error) against −log(steps)."""
    x = -torch.log(torch.tensor(steps, dtype=D64))
    y = torch.log(torch.tensor(errors, dtype=D64))
    x = x - x.mean()
    return float((x * (y - y.mean())).sum() / (x * x).sum())


@pytest.mark.parametrize(
    ("sampler", "options", "steps", "order"),
    [
        ("ode", {"method": "euler", "grid": "uniform"}, [40, 80, 160, 320], 1),
        ("ode", {"method": "heun", "grid": "uniform"}, [10, 20, 40, 80], 2),
        ("ode", {"method": "midpoint", "grid": "uniform"}, [10, 20, 40, 80], 2),
        ("ode", {"method": "rk4", "grid": "uniform"}, [5, 10, 20, 40], 4),
        ("dpm_solver", {"grid": "logsnr", "order": 1}, [40, 80, 160, 320], 1),
        ("dpm_solver", {"grid": "logsnr", "order": 2}, [20, 40, 80, 160], 2),
        ("dpm_solver", {"grid": "logsnr", "order": 3}, [40, 80, 160, 320], 3),
    ],
)
def test_fixed_step_solvers_show_their_order(order_problem, sampler, options, steps, order):
    schedule, data, x_T, ref = order_problem
    errors = []
    for n in steps:
        x = sample(
            data.score_fn(schedule), schedule, None, sampler=sampler, steps=n, x_init=x_T, **options
        ).samples
        errors.append(float((x - ref).abs().max()))
    assert errors[-1] > 1e-11, "reached round-off: the slope would be meaningless"
    assert abs(_slope(steps, errors) - order) < 0.2, (errors, _slope(steps, errors))


# ---- one step of the discrete chains ---------------------------------------------------------
def _step_inputs(d: int = 3, b: int = 5):
    g = torch.Generator().manual_seed(5)
    return torch.randn(b, d, generator=g, dtype=D64), anisotropic_gaussian(d, dtype=D64)


def _noise(x, seed):
    return torch.randn(x.shape, generator=torch.Generator().manual_seed(seed), dtype=x.dtype)


def _ddpm_grid(schedule: VPSchedule, n: int):
    """Times t_i at which the continuous VP schedule has DDPM's ᾱ_i = Π_{j≤i}(1 − β_j) for
    Score-SDE's discrete β_j = linspace(β_min/n, β_max/n) (the schedule needs T slightly > 1:
    −log ᾱ_n = Σ β_j + O(β²) exceeds ∫_0^1 β)."""
    betas = schedule.discrete_betas(n).to(D64)
    alpha_bar = torch.cumprod(1 - betas, 0)
    return schedule.t_of_log_snr(torch.log(alpha_bar / (1 - alpha_bar))), betas, alpha_bar


def test_ancestral_step_is_ddpm_on_vp():
    """Ho et al. (2020), Eq. 7 and Alg. 2 with σ_i² = β̃_i: on times where the continuous VP
    chain has DDPM's β_i, the general posterior step is
    x_{i−1} = (x_i − β_i/√(1−ᾱ_i) ε̂)/√(1−β_i) + √β̃_i z."""
    schedule = VPSchedule(T=1.05)
    ts, betas, alpha_bar = _ddpm_grid(schedule, 1000)
    x, data = _step_inputs()
    score_fn = data.score_fn(schedule)
    eps_fn = score_fn_to_kind(score_fn, schedule, "eps")
    for i in (1, 10, 500, 998):
        t, s = ts[i].expand(5), ts[i - 1].expand(5)
        torch.testing.assert_close(1 - schedule.transition(s, t)[0] ** 2, betas[i].expand(5))
        out = ancestral_predictor(
            score_fn, schedule, x, t, s, generator=torch.Generator().manual_seed(i)
        )
        beta, ab, ab_prev = betas[i], alpha_bar[i], alpha_bar[i - 1]
        mean = (x - beta / (1 - ab).sqrt() * eps_fn(x, t)) / (1 - beta).sqrt()
        beta_tilde = (1 - ab_prev) / (1 - ab) * beta
        # Score-SDE's AncestralSamplingPredictor has the same mean (x + β s)/√(1 − β).
        torch.testing.assert_close(mean, (x + beta * score_fn(x, t)) / (1 - beta).sqrt())
        torch.testing.assert_close(out, mean + beta_tilde.sqrt() * _noise(x, i))


def _smld_grid(schedule: VESchedule, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Times where the VE schedule's σ(t) equals SMLD's geometric levels σ_1 < … < σ_n."""
    sigmas = schedule.discrete_sigmas(n).to(D64)
    return torch.log(sigmas / schedule.sigma_min) / math.log(
        schedule.sigma_max / schedule.sigma_min
    ), sigmas


def test_ancestral_step_is_smld_on_ve():
    """Song et al. (2021), Eq. 47 (SMLD's ancestral step):
    x_{i−1} = x_i + (σ_i² − σ_{i−1}²) s + √(σ_{i−1}² (σ_i² − σ_{i−1}²)/σ_i²) z."""
    schedule = VESchedule(t_min=0.0)
    ts, sigmas = _smld_grid(schedule, 100)
    x, data = _step_inputs()
    score_fn = data.score_fn(schedule)
    for i in (1, 50, 99):
        t, s = ts[i].expand(5), ts[i - 1].expand(5)
        out = ancestral_predictor(
            score_fn, schedule, x, t, s, generator=torch.Generator().manual_seed(i)
        )
        dvar = sigmas[i] ** 2 - sigmas[i - 1] ** 2
        std = (sigmas[i - 1] ** 2 * dvar / sigmas[i] ** 2).sqrt()
        torch.testing.assert_close(out, x + dvar * score_fn(x, t) + std * _noise(x, i))


def test_reverse_diffusion_step_is_score_sde_on_vp_and_ve():
    """Score-SDE's ReverseDiffusionPredictor with its `discretize`: VP f = (√(1−β) − 1)x,
    G = √β; VE f = 0, G = √(σ_i² − σ_{i−1}²); then x_mean = x − f + G² s, x = x_mean + G z."""
    x, data = _step_inputs()
    vp = VPSchedule(T=1.05)
    ts, betas, _ = _ddpm_grid(vp, 1000)
    i = 400
    t, s = ts[i].expand(5), ts[i - 1].expand(5)
    out = reverse_diffusion_predictor(
        data.score_fn(vp), vp, x, t, s, generator=torch.Generator().manual_seed(0)
    )
    beta = betas[i]
    f = ((1 - beta).sqrt() - 1) * x
    expected = x - f + beta * data.score_fn(vp)(x, t) + beta.sqrt() * _noise(x, 0)
    torch.testing.assert_close(out, expected)

    ve = VESchedule(t_min=0.0)
    ts, sigmas = _smld_grid(ve, 100)
    j = 40
    t, s = ts[j].expand(5), ts[j - 1].expand(5)
    out = reverse_diffusion_predictor(
        data.score_fn(ve), ve, x, t, s, generator=torch.Generator().manual_seed(0)
    )
    dvar = sigmas[j] ** 2 - sigmas[j - 1] ** 2
    torch.testing.assert_close(out, x + dvar * data.score_fn(ve)(x, t) + dvar.sqrt() * _noise(x, 0))


@pytest.mark.parametrize("sched", ["vp", "ve"])
def test_langevin_step_size_rule(sched):
    """ε = 2 α_i (snr ‖z‖/‖s‖)² with batch-mean norms; α_i = 1 − β_i on VP and 1 on VE."""
    schedule = SCHEDULES[sched]()
    x, data = _step_inputs(d=4, b=6)
    score_fn = data.score_fn(schedule)
    s, t = torch.full((6,), 0.3, dtype=D64), torch.full((6,), 0.31, dtype=D64)
    out = langevin_corrector(
        score_fn, schedule, x, s, t, snr=0.16, generator=torch.Generator().manual_seed(1)
    )
    z, grad = _noise(x, 1), score_fn(x, s)
    if sched == "vp":  # 1 − β_i = exp(−∫_s^t β) for the linear β(u) = β_min + (β_max − β_min) u
        alpha_i = math.exp(-(0.1 * 0.01 + 0.5 * 19.9 * (0.31**2 - 0.3**2)))
    else:
        alpha_i = 1.0
    step = 2 * alpha_i * (0.16 * z.norm(dim=1).mean() / grad.norm(dim=1).mean()) ** 2
    torch.testing.assert_close(out, x + step * grad + (2 * step).sqrt() * z)


# ---- the API: NFE, trajectory, grids, reproducibility, errors --------------------------------
@pytest.mark.parametrize(
    ("sampler", "options", "nfe"),
    [
        ("euler_maruyama", {}, 10),
        ("reverse_diffusion", {}, 10),
        ("ancestral", {}, 10),
        ("pc", {"n_corrector_steps": 2}, 30),
        ("pc", {"corrector": "none", "denoise": True}, 11),
        ("pc", {"predictor": "none", "corrector": "ald"}, 10),
        ("annealed_langevin", {"n_corrector_steps": 3}, 30),
        ("lambda", {"lam": 0.3}, 10),
        ("ode", {"method": "euler"}, 10),
        ("ode", {"method": "heun"}, 20),
        ("ode", {"method": "midpoint"}, 20),
        ("ode", {"method": "rk4"}, 40),
        ("dpm_solver", {}, 10),
    ],
)
def test_nfe_and_trajectory(sampler, options, nfe):
    schedule, data = VPSchedule(), anisotropic_gaussian(2)
    res = sample(
        data.score_fn(schedule),
        schedule,
        (8, 2),
        sampler=sampler,
        steps=10,
        generator=0,
        return_trajectory=True,
        **options,
    )
    assert isinstance(res, SampleResult)
    assert res.nfe == nfe
    assert res.trajectory.shape == (11, 8, 2) and res.times.shape == (11,)
    torch.testing.assert_close(res.times, time_grid(schedule, 10, res.grid))
    assert torch.equal(res.times, res.grid_times)
    if not options.get("denoise"):
        torch.testing.assert_close(res.trajectory[-1], res.samples)
    assert bool(torch.isfinite(res.samples).all())


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_any_rank(sampler):
    """Image-shaped samples (B, C, H, W): time broadcasts through one helper, norms are per
    example over all dims. The oracle flattens internally, so D = 1·2·3 here."""
    schedule, data = VPSchedule(), anisotropic_gaussian(6)
    res = sample(
        data.score_fn(schedule),
        schedule,
        (5, 1, 2, 3),
        sampler=sampler,
        steps=4,
        generator=0,
        denoise=True,
        return_trajectory=True,
    )
    assert res.samples.shape == (5, 1, 2, 3) and res.trajectory.shape == (5, 5, 1, 2, 3)
    assert bool(torch.isfinite(res.samples).all())


def test_adaptive_ode_counts_and_saves_at_grid_times():
    schedule, data = VESchedule(), anisotropic_gaussian(2)
    res = sample(
        data.score_fn(schedule),
        schedule,
        (8, 2),
        sampler="ode",
        method="dopri5",
        steps=5,
        generator=0,
        return_trajectory=True,
    )
    assert res.trajectory.shape == (6, 8, 2) and res.nfe > 6 * 5
    torch.testing.assert_close(res.trajectory[-1], res.samples)


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_same_seed_same_samples_other_seed_other_samples(sampler):
    schedule, data = VESchedule(), anisotropic_gaussian(2)

    def run(seed):
        return sample(
            data.score_fn(schedule), schedule, (16, 2), sampler=sampler, steps=5, generator=seed
        ).samples

    a, b, c = run(1), run(torch.Generator().manual_seed(1)), run(2)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


@pytest.mark.parametrize("grid", ["uniform", "logsnr", "edm"])
def test_time_grids(schedule, grid):
    ts = time_grid(schedule, 12, grid, dtype=D64)
    assert ts.shape == (13,)
    assert float(ts[0]) == schedule.T and float(ts[-1]) == schedule.t_min
    assert bool((ts[1:] < ts[:-1]).all())
    lam = schedule.log_snr(ts)
    if grid == "uniform":
        torch.testing.assert_close(ts.diff(), ts.diff()[:1].expand(12))
    elif grid == "logsnr":
        torch.testing.assert_close(lam.diff(), lam.diff()[:1].expand(12), rtol=1e-6, atol=1e-6)
    else:  # (σ/α)^{1/ρ} = e^{−λ/(2ρ)} is uniform for ρ = 7
        r = torch.exp(-lam / 14)
        torch.testing.assert_close(r.diff(), r.diff()[:1].expand(12), rtol=1e-6, atol=1e-9)


def test_custom_grid_and_rho():
    schedule, data = VPSchedule(), anisotropic_gaussian(2)
    ts = torch.tensor([1.0, 0.5, 0.1, 1e-3])
    res = sample(
        data.score_fn(schedule),
        schedule,
        (4, 2),
        sampler="ode",
        method="euler",
        grid=ts,
        generator=0,
        return_trajectory=True,
    )
    assert res.nfe == 3
    torch.testing.assert_close(res.times, ts)
    a = time_grid(schedule, 8, "edm", rho=3.0)
    b = time_grid(schedule, 8, "edm")
    assert not torch.allclose(a, b)


@pytest.mark.parametrize(
    ("sampler", "options"),
    [("euler_maruyama", {}), ("ode", {"method": "rk4"}), ("dpm_solver", {})],
)
def test_user_defined_schedules(schedule, sampler, options):
    """Every schedule of the conftest fixture — including a Schedule subclass and a
    FunctionSchedule given only α(t), σ(t) — samples the data with EM and the ODE solvers.
    The log-SNR grid suits all of them (the EDM-like σ = t ∈ [0.002, 80] needs it)."""
    data = anisotropic_gaussian(2)
    steps = {"euler_maruyama": 100, "ode": 20, "dpm_solver": 40}[sampler]
    res = sample(
        data.score_fn(schedule),
        schedule,
        (2000, 2),
        sampler=sampler,
        steps=steps,
        grid="logsnr",
        generator=5,
        **options,
    )
    budget = 0.05 + prior_mismatch(schedule, data, deterministic=sampler != "euler_maruyama")
    assert_matches_data(res.samples, data, budget, 0.05)


def test_x_init_score_model_and_constraint():
    schedule, data = VPSchedule(), anisotropic_gaussian(2)
    x_T = schedule.prior_sample((6, 2), generator=torch.Generator().manual_seed(0))
    plain = sample(
        data.score_fn(schedule), schedule, None, sampler="ode", method="heun", steps=8, x_init=x_T
    )
    # A ScoreModel around an ε-predicting "network" is a score function too.
    model = ScoreModel(score_fn_to_kind(data.score_fn(schedule), schedule, "eps"), schedule, "eps")
    wrapped = sample(model, schedule, (6, 2), sampler="ode", method="heun", steps=8, x_init=x_T)
    torch.testing.assert_close(wrapped.samples, plain.samples)
    assert plain.trajectory is None and plain.times is None

    calls = []

    def pin_first_coordinate(x, t):
        calls.append(float(t[0]))
        return torch.cat([torch.full_like(x[:, :1], 3.0), x[:, 1:]], dim=1)

    for sampler, options, n_calls in [
        ("pc", {"n_corrector_steps": 2}, 30),
        ("lambda", {"lam": 0.5}, 10),
        ("ode", {"method": "rk4"}, 10),
        ("dpm_solver", {}, 10),
    ]:
        calls.clear()
        res = sample(
            data.score_fn(schedule),
            schedule,
            (6, 2),
            sampler=sampler,
            steps=10,
            generator=0,
            constraint=pin_first_coordinate,
            **options,
        )
        assert len(calls) == n_calls and calls[-1] == pytest.approx(schedule.t_min)
        assert bool((res.samples[:, 0] == 3.0).all())


def test_every_sampler_has_one_signature():
    for name, fn in SAMPLERS.items():
        params = inspect.signature(fn).parameters
        assert list(params)[:4] == ["score_fn", "schedule", "x", "ts"], name
        for p in ("generator", "constraint", "callback"):
            assert params[p].kind is inspect.Parameter.KEYWORD_ONLY, (name, p)
    assert sampler_options("pc")["snr"] == 0.16
    assert sampler_options("ode")["method"] in TABLEAUX


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"sampler": "heunn"}, "unknown sampler 'heunn': choose one of euler_maruyama"),
        ({"sampler": "pc", "snrr": 0.1}, "unknown option.*snrr.*valid are predictor, corrector"),
        ({"sampler": "ode", "lam": 0.5}, "valid are method, rtol, atol, denoise, rho"),
        ({"sampler": "pc", "predictor": "leapfrog"}, "unknown predictor 'leapfrog'.*ancestral"),
        ({"sampler": "pc", "corrector": "hmc"}, "unknown corrector 'hmc'.*langevin, ald, none"),
        ({"sampler": "pc", "snr": -1.0}, "snr must be"),
        ({"sampler": "pc", "n_corrector_steps": 1.5}, "n_corrector_steps must be an integer"),
        ({"sampler": "lambda", "lam": 1.5}, r"lam must lie in \[0, 1\]"),
        ({"sampler": "ode", "method": "rk45"}, "unknown ODE method 'rk45'.*dopri5"),
        ({"sampler": "ode", "rtol": 0.0}, "rtol and atol must be > 0"),
        ({"sampler": "dpm_solver", "order": 4}, r"order must be 1, 2 or 3 \(or None.*got 4"),
        ({"grid": "cosine"}, "unknown grid 'cosine': choose one of uniform, logsnr, edm"),
        ({"grid": "uniform", "rho": 7.0}, "rho is an option of grid='edm' only"),
        ({"steps": 0}, "steps must be an integer >= 1"),
        ({"grid": torch.tensor([0.5, 0.9])}, "strictly decreasing"),
        ({"x_init": torch.zeros(3, 2)}, r"x_init has shape \(3, 2\), expected \(4, 2\)"),
        ({"sampler": "ode", "method": "dopri5", "constraint": lambda x, t: x}, "constraint"),
    ],
)
def test_bad_names_and_options_raise(kwargs, match):
    schedule, data = VPSchedule(), anisotropic_gaussian(2)
    kwargs = {"steps": 3, **kwargs}
    with pytest.raises(ValueError, match=match):
        sample(data.score_fn(schedule), schedule, (4, 2), **kwargs)


def test_predictor_registry_is_a_plain_dict():
    assert set(PREDICTORS) == {"euler_maruyama", "reverse_diffusion", "ancestral", "none"}
