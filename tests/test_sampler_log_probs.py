"""Per-step log-probabilities of the stochastic samplers (``sample(..., return_log_probs=True)``).

On Gaussian data the exact score is affine in x, so every sampler below is a linear-Gaussian
chain x_{k+1} = A_k x_k + b_k + S_k ε_k per coordinate, with A_k, b_k, S_k written out here from
the papers' formulas and the schedules' closed forms (not from the library). Two truths:

- the path (x_T, x_1, …, x_K) is then jointly Gaussian: its mean and covariance follow from the
  recursion, and the multivariate normal log-density of the path must equal ``path_log_prob``
  (the chain rule of densities, computed here without any conditional);
- each step's value is the log-density of the noise it drew: re-drawing the generator's stream
  gives ε_k, and −½‖ε_k‖² − (D/2) log 2π − Σ log S_k must equal ``log_probs[k]`` while
  x_{k+1} = A_k x_k + b_k + S_k ε_k reproduces the trajectory.
"""

from __future__ import annotations

import math

import pytest
import torch

from sdelab.oracle import GaussianData
from sdelab.samplers import PREDICTOR_STEPS, gaussian_log_prob, sample
from sdelab.sde import VESchedule, VPSchedule

# few uniform steps on purpose (a short chain); the probe's accuracy warning is beside the point
pytestmark = pytest.mark.filterwarnings("ignore:.*inaccurate or unstable:UserWarning")

D64 = torch.float64
MEAN = torch.tensor([1.0, -0.5], dtype=D64)
VAR = torch.tensor([0.5, 2.0], dtype=D64)  # diagonal covariance: coordinates independent
B, STEPS, SNR = 6, 4, 0.16


# ---- the schedules in closed form (VP: β linear; VE: σ geometric) ---------------------------
def vp_values(t: float, beta_min: float = 0.1, beta_max: float = 20.0) -> dict:
    big_b = beta_min * t + 0.5 * (beta_max - beta_min) * t**2
    beta = beta_min + (beta_max - beta_min) * t
    return {"alpha": math.exp(-0.5 * big_b), "sigma": math.sqrt(-math.expm1(-big_b)),
            "f": -0.5 * beta, "g2": beta}  # fmt: skip


def ve_values(t: float, sigma_min: float = 0.01, sigma_max: float = 50.0) -> dict:
    log_r = math.log(sigma_max / sigma_min)
    sigma = sigma_min * math.exp(t * log_r)
    return {"alpha": 1.0, "sigma": sigma, "f": 0.0, "g2": 2 * sigma**2 * log_r}


SCHEDULES = {"vp": (VPSchedule, vp_values, 1.0), "ve": (VESchedule, ve_values, 50.0)}


def marginal_var(v: dict) -> torch.Tensor:
    return v["alpha"] ** 2 * VAR + v["sigma"] ** 2  # M_t = α² v + σ², per coordinate


# ---- each sampler's step as x_s = A x_t + b + S ε (per coordinate) ---------------------------
def euler_maruyama_coeffs(vals, t: float, s: float, lam: float = 0.0):
    """x_s = x + h [−f x + (1 − λ/2) g² ∇log p_t] + √((1 − λ) g² h) ε, h = t − s."""
    v, h, c = vals(t), t - s, 1 - 0.5 * lam
    m = marginal_var(v)
    a = 1 - h * v["f"] - c * v["g2"] * h / m
    b = c * v["g2"] * h * v["alpha"] * MEAN / m
    return a, b, torch.full_like(VAR, math.sqrt((1 - lam) * v["g2"] * h))


def chain(vals, t: float, s: float):
    """The forward chain x_t = a x_s + G ε: a = α_t/α_s, G² = σ_t² − a² σ_s²."""
    vt, vs = vals(t), vals(s)
    a = vt["alpha"] / vs["alpha"]
    return vt, vs, a, vt["sigma"] ** 2 - a**2 * vs["sigma"] ** 2


def reverse_diffusion_coeffs(vals, t: float, s: float):
    """Score-SDE Eq. 46: x_s = x − (a − 1) x + G² ∇log p_t(x) + G ε."""
    vt, _, a, g2 = chain(vals, t, s)
    m = marginal_var(vt)
    return 2 - a - g2 / m, g2 * vt["alpha"] * MEAN / m, torch.full_like(VAR, math.sqrt(g2))


def ancestral_coeffs(vals, t: float, s: float):
    """q(x_s | x_t, x̂_0) = N((a σ_s² x_t + α_s G² x̂_0)/σ_t², σ_s² G²/σ_t²), x̂_0 by Tweedie:
    x̂_0 = (x + σ_t² ∇log p_t(x))/α_t = (x (1 − σ_t²/M) + σ_t² α_t μ/M)/α_t."""
    vt, vs, a, g2 = chain(vals, t, s)
    m, st2 = marginal_var(vt), vt["sigma"] ** 2
    x0_a = (1 - st2 / m) / vt["alpha"]
    x0_b = st2 * MEAN / m  # α_t cancels: (σ_t² α_t μ/M)/α_t
    a_coef = (a * vs["sigma"] ** 2 + vs["alpha"] * g2 * x0_a) / st2
    b_coef = vs["alpha"] * g2 * x0_b / st2
    std = vs["sigma"] * math.sqrt(g2) / vt["sigma"]
    return a_coef, b_coef, torch.full_like(VAR, std)


def ald_coeffs(vals, t: float, s: float):
    """NCSN's step at s: x + ε ∇log p_s(x) + √(2ε) z, ε = 2 a² (snr σ_s)² (Score-SDE)."""
    _, vs, a, _ = chain(vals, t, s)
    eps = 2 * a**2 * (SNR * vs["sigma"]) ** 2
    m = marginal_var(vs)
    return 1 - eps / m, eps * vs["alpha"] * MEAN / m, torch.full_like(VAR, math.sqrt(2 * eps))


CASES = {
    "euler_maruyama": ({}, euler_maruyama_coeffs),
    "lambda": ({"lam": 0.5}, lambda vals, t, s: euler_maruyama_coeffs(vals, t, s, 0.5)),
    "reverse_diffusion": ({}, reverse_diffusion_coeffs),
    "ancestral": ({}, ancestral_coeffs),
    "annealed_langevin": ({}, ald_coeffs),
}


def run(name: str, sched: str, steps: int = STEPS, **extra):
    cls, vals, prior_std = SCHEDULES[sched]
    sde = cls()
    data = GaussianData(MEAN, VAR)
    opts, coeffs = CASES[name]
    res = sample(data.score_fn(sde), sde, (B, 2), sampler=name, steps=steps, grid="uniform",
                 generator=7, dtype=D64, return_trajectory=True, return_log_probs=True,
                 **opts, **extra)  # fmt: skip
    ts = [float(t) for t in res.grid_times]
    steps_abs = [coeffs(vals, ts[k], ts[k + 1]) for k in range(len(ts) - 1)]
    return res, steps_abs, prior_std


def joint_path_log_density(path: torch.Tensor, steps_abs, prior_std: float) -> torch.Tensor:
    """log N(path; m, C) of the whole path per example, from the chain's mean and covariance.

    ``path`` is ``(K + 1, B, D)``; coordinates are independent, so the joint is the product
    over d of (K + 1)-variate normals whose mean/covariance follow the linear recursion."""
    k1 = path.shape[0]
    total = torch.zeros(path.shape[1], dtype=D64)
    for d in range(path.shape[2]):
        m = torch.zeros(k1, dtype=D64)
        c = torch.zeros(k1, k1, dtype=D64)
        c[0, 0] = prior_std**2
        for k, (a, b, s) in enumerate(steps_abs):
            m[k + 1] = a[d] * m[k] + b[d]
            c[k + 1, : k + 1] = a[d] * c[k, : k + 1]
            c[: k + 1, k + 1] = c[k + 1, : k + 1]
            c[k + 1, k + 1] = a[d] ** 2 * c[k, k] + s[d] ** 2
        mvn = torch.distributions.MultivariateNormal(m, covariance_matrix=c)
        total += mvn.log_prob(path[:, :, d].T)
    return total


@pytest.mark.parametrize("sched", ["vp", "ve"])
@pytest.mark.parametrize("name", list(CASES))
def test_path_log_prob_is_the_joint_density_of_the_path(name, sched):
    res, steps_abs, prior_std = run(name, sched)
    assert res.log_probs.shape == (STEPS, B)
    path = res.trajectory  # (K + 1, B, D): x_T, then the state after every step
    expected = joint_path_log_density(path, steps_abs, prior_std)
    # float64 Cholesky of a covariance spanning σ² from 1e-4 to 2500 (VE): ~1e-7 nats
    torch.testing.assert_close(res.path_log_prob, expected, rtol=1e-7, atol=1e-6)


@pytest.mark.parametrize("sched", ["vp", "ve"])
@pytest.mark.parametrize("name", list(CASES))
def test_step_log_prob_is_the_density_of_the_noise_drawn(name, sched):
    res, steps_abs, prior_std = run(name, sched)
    gen = torch.Generator().manual_seed(7)
    x = prior_std * torch.randn((B, 2), generator=gen, dtype=D64)  # the prior draw
    torch.testing.assert_close(res.trajectory[0], x)
    for k, (a, b, s) in enumerate(steps_abs):
        eps = torch.randn((B, 2), generator=gen, dtype=D64)  # the noise step k drew
        x = a * x + b + s * eps
        torch.testing.assert_close(res.trajectory[k + 1], x, rtol=1e-10, atol=1e-10)
        noise_density = -0.5 * (eps**2).sum(1) - math.log(2 * math.pi) - s.log().sum()
        torch.testing.assert_close(res.log_probs[k], noise_density, rtol=1e-10, atol=1e-10)
    # the prior term: the schedule's N(0, prior_std² I) at x_T
    prior_law = torch.distributions.Normal(torch.tensor(0.0, dtype=D64), float(prior_std))
    prior = prior_law.log_prob(res.trajectory[0]).sum(1)
    torch.testing.assert_close(res.path_log_prob, prior + res.log_probs.sum(0))


@pytest.mark.parametrize("name", list(CASES))
def test_log_probs_leave_the_samples_unchanged(name):
    sde = VPSchedule()
    score = GaussianData(MEAN, VAR).score_fn(sde)
    opts = CASES[name][0]
    kw = dict(sampler=name, steps=STEPS, grid="uniform", generator=3, dtype=D64, **opts)
    plain = sample(score, sde, (B, 2), **kw)
    logged = sample(score, sde, (B, 2), return_log_probs=True, **kw)
    assert torch.equal(plain.samples, logged.samples)
    assert plain.log_probs is None and plain.path_log_prob is None


def test_pc_rows_follow_the_steps_taken():
    """PC with a Gaussian corrector: predictor row then corrector rows per grid step; its
    predictor rows alone reproduce the predictor-only sampler's (same draws)."""
    sde = VPSchedule()
    score = GaussianData(MEAN, VAR).score_fn(sde)
    kw = dict(steps=3, grid="uniform", generator=5, dtype=D64, return_log_probs=True)
    res = sample(score, sde, (B, 2), sampler="pc", predictor="ancestral", corrector="ald",
                 n_corrector_steps=2, **kw)  # fmt: skip
    assert res.log_probs.shape == (3 * 3, B)
    alone = sample(score, sde, (B, 2), sampler="pc", predictor="ancestral", corrector="none", **kw)
    ref = sample(score, sde, (B, 2), sampler="ancestral", **kw)
    torch.testing.assert_close(alone.log_probs, ref.log_probs)
    torch.testing.assert_close(alone.path_log_prob, ref.path_log_prob)


def test_step_law_recomputes_a_stored_step():
    """``PREDICTOR_STEPS`` + ``gaussian_log_prob`` give a stored step's log-probability again
    (the recomputation a policy-gradient update differentiates)."""
    sde = VPSchedule()
    score = GaussianData(MEAN, VAR).score_fn(sde)
    res = sample(score, sde, (B, 2), sampler="ancestral", steps=STEPS, grid="uniform",
                 generator=1, dtype=D64, return_trajectory=True, return_log_probs=True)  # fmt: skip
    for k in range(STEPS):
        t, s = res.grid_times[k], res.grid_times[k + 1]
        x_mean, std = PREDICTOR_STEPS["ancestral"](score, sde, res.trajectory[k], t, s)
        lp = gaussian_log_prob(res.trajectory[k + 1], x_mean, std)
        torch.testing.assert_close(lp, res.log_probs[k])


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"sampler": "ode"}, "'ode' is deterministic"),
        ({"sampler": "dpm_solver"}, "'dpm_solver' is deterministic"),
        ({"sampler": "lambda", "lam": 1.0}, "lam=1"),
        ({"sampler": "pc"}, "corrector 'langevin' has no Gaussian step law"),
        (
            {"sampler": "pc", "predictor": lambda *a, **k: a[2], "corrector": "none"},
            "custom callable",
        ),
        (
            {"sampler": "ancestral", "constraint": lambda x, t: x},
            "constraint",
        ),
    ],
)
def test_non_gaussian_steps_refuse_log_probs(kw, match):
    sde = VPSchedule()
    score = GaussianData(MEAN, VAR).score_fn(sde)
    with pytest.raises(ValueError, match=match):
        sample(score, sde, (2, 2), steps=3, grid="uniform", return_log_probs=True, **kw)
