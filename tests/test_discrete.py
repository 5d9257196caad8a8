"""Discrete-time DDPM / SMLD against the Gaussian oracle: chains, loss minimisers, the discrete
variational bound, the exact chains and the continuous view."""

from __future__ import annotations

import math

import pytest
import torch

from sdelab.discrete import (
    DiscreteScoreModel,
    chain_loss,
    ddpm_chain,
    ddpm_vlb,
    discretized_gaussian_nll,
    sample_ddpm,
    sample_ncsn,
    smld_chain,
)
from sdelab.likelihood import log_likelihood
from sdelab.likelihood.options import Exact
from sdelab.oracle import GaussianData
from sdelab.samplers import sample
from sdelab.sde import VESchedule, VPSchedule

EULER_GAMMA = 0.5772156649015329
MEAN = torch.tensor([0.3, -0.5], dtype=torch.float64)
VAR = torch.tensor([0.5, 2.0], dtype=torch.float64)  # diagonal covariance


def oracle_eps_net(chain):
    """ε̂ = −σ ∇log p = σ C⁻¹(x − α μ) with C = α²Σ + σ²I, at the network's step input τ."""

    def net(x, tau):
        alpha, sigma = chain.alpha_sigma_at(tau * (chain.n - 1))
        a, s = alpha[:, None], sigma[:, None]
        return s * (x - a * MEAN) / (a**2 * VAR + s**2)

    return net


def oracle_step_fn(chain):
    net = oracle_eps_net(chain)
    return lambda x, i: net(x, chain.net_input(i.to(x.dtype)))


def closed_form_vlb(chain):
    """Data-averaged discrete bound with the exact ε̂: every term is Gaussian and closed-form
    (E‖ε − ε̂‖² = tr Cov(ε | x_i) = D − σ_i² tr C_i⁻¹)."""
    a, s, lam = chain.alpha, chain.sigma, chain.log_snr
    c = a[:, None] ** 2 * VAR + s[:, None] ** 2
    per_step = VAR.numel() - s**2 * (1 / c).sum(1)
    diffusion = (0.5 * torch.expm1(lam[:-1] - lam[1:]) * per_step[1:]).sum()
    prior = 0.5 * (s[-1] ** 2 + a[-1] ** 2 * (MEAN**2 + VAR) - 1 - torch.log(s[-1] ** 2)).sum()
    post_var = VAR - a[0] ** 2 * VAR**2 / c[0]  # Var(x_0 | x at step 0)
    rec = VAR.numel() / 2 * math.log(2 * math.pi * s[0] ** 2) + post_var.sum() / (2 * s[0] ** 2)
    return float(prior + diffusion + rec)


def closed_form_continuous_vlb(schedule, m=200_000):
    """The continuous VLB (prior + ½∫ −λ' E‖ε − ε̂‖² dt + Gaussian decoder at t_min) by the
    trapezoid rule in λ."""
    out = schedule(torch.linspace(schedule.t_min, schedule.T, m + 1, dtype=torch.float64))
    a, s, lam = out.alpha, out.sigma, out.log_snr
    c = a[:, None] ** 2 * VAR + s[:, None] ** 2
    f = 0.5 * (VAR.numel() - s**2 * (1 / c).sum(1))
    diffusion = ((f[1:] + f[:-1]) / 2 * (lam[:-1] - lam[1:])).sum()
    prior = 0.5 * (s[-1] ** 2 + a[-1] ** 2 * (MEAN**2 + VAR) - 1 - torch.log(s[-1] ** 2)).sum()
    post_var = VAR - a[0] ** 2 * VAR**2 / c[0]
    rec = VAR.numel() / 2 * math.log(2 * math.pi * s[0] ** 2) + post_var.sum() / (2 * s[0] ** 2)
    return float(prior + diffusion + rec)


def gaussian():
    return GaussianData(MEAN, torch.diag(VAR))


def test_chains_match_their_definitions():
    vp, ve = VPSchedule(), VESchedule()
    ddpm = ddpm_chain(vp, 1000)
    betas = vp.discrete_betas(1000, torch.float64)
    torch.testing.assert_close(ddpm.alpha**2, torch.cumprod(1 - betas, 0))
    torch.testing.assert_close(ddpm.alpha**2 + ddpm.sigma**2, torch.ones(1000, dtype=torch.float64))
    smld = smld_chain(ve, 50)
    torch.testing.assert_close(smld.sigma, ve.discrete_sigmas(50, torch.float64))
    # the VE chain interpolates to the VE schedule itself: σ_t = σ_min (σ_max/σ_min)^t
    t = torch.rand(100, dtype=torch.float64) * (1 - 1e-5) + 1e-5
    _, sigma = smld.alpha_sigma_at(smld.step_of_time(t))
    torch.testing.assert_close(sigma, ve(t).sigma)
    with pytest.raises(ValueError, match="more steps"):
        ddpm_chain(vp, 10)  # β_max/N = 2 is no probability
    with pytest.raises(ValueError, match="VPSchedule"):
        ddpm_chain(ve, 100)


@pytest.mark.parametrize("name", ["ddpm", "smld"])
def test_loss_minimiser_is_the_exact_eps_at_each_step(name):
    """Least squares of the loss over affine ε̂ (a class holding the exact ε̂) gives the oracle
    ε̂_i(x) = σ_i C_i⁻¹ (x − α_i μ) at each integer step; SE ≈ 1/√n per coefficient."""
    chain = ddpm_chain(VPSchedule(), 100) if name == "ddpm" else smld_chain(VESchedule(0.1, 5), 20)
    gen = torch.Generator().manual_seed(0)
    n = 40_000
    for step in (0, chain.n // 2, chain.n - 1):
        x0 = gaussian().sample(n, generator=gen)
        out = chain_loss(
            lambda x, tau: torch.zeros_like(x),
            chain,
            x0,
            steps=torch.full((n,), step),
            generator=gen,
        )
        design = torch.cat([out.x_t, torch.ones(n, 1, dtype=x0.dtype)], 1)
        coef = torch.linalg.lstsq(design, out.noise).solution  # (3, 2)
        a, s = float(chain.alpha[step]), float(chain.sigma[step])
        c = a**2 * VAR + s**2
        torch.testing.assert_close(coef[:2], torch.diag(s / c), atol=0.03, rtol=0)
        torch.testing.assert_close(coef[2], -s * a * MEAN / c, atol=0.03, rtol=0)
        # the loss is ½‖ε̂ − ε‖² with the net's prediction
        torch.testing.assert_close(out.loss, 0.5 * (out.noise**2).sum(1))


def test_ddpm_vlb_estimate_matches_closed_form():
    chain = ddpm_chain(VPSchedule(), 40)
    gen = torch.Generator().manual_seed(1)
    x = gaussian().sample(20_000, generator=gen)
    vlb = ddpm_vlb(oracle_step_fn(chain), chain, x, generator=gen)
    mean, se = float(vlb.total.mean()), float(vlb.total.std() / math.sqrt(x.shape[0]))
    assert abs(mean - closed_form_vlb(chain)) < 4 * se
    # the unbiased few-term estimate has the same expectation
    est = ddpm_vlb(oracle_step_fn(chain), chain, x, n_terms=2, generator=gen).total
    assert abs(float(est.mean()) - closed_form_vlb(chain)) < 4 * float(est.std()) / math.sqrt(
        x.shape[0]
    )


def test_ddpm_bound_is_above_entropy_and_tends_to_continuous_vlb_plus_euler_gap():
    """E_p[bound] ≥ E_p[−log p] = H (cross-entropy ≥ entropy), for every N. As N grows the bound
    approaches the continuous VLB (= H here, with the exact score) plus ½·D·γ (Euler's
    constant): DDPM's linear β makes σ_i² ∝ i + 1 near the data, so its first steps stay O(1)
    in log-SNR at any N and Σ 1/i − ∫ dλ → γ per dimension where E‖ε − ε̂‖² ≈ 1 (continuous
    data only; on discrete data ε becomes identifiable as σ → 0 and the gap closes)."""
    vp = VPSchedule()
    entropy = gaussian().entropy()
    assert abs(closed_form_continuous_vlb(vp) - entropy) < 1e-3
    gaps = []
    for n in (100, 1000, 10_000, 100_000):
        bound = closed_form_vlb(ddpm_chain(vp, n))
        assert bound >= entropy
        gaps.append(abs(bound - entropy - 0.5 * VAR.numel() * EULER_GAMMA))
    assert gaps == sorted(gaps, reverse=True)
    assert gaps[-1] < 0.02  # nats, at N = 10^5


def test_discretized_decoder_is_a_distribution_over_levels():
    levels = 8
    mean = torch.tensor([[-0.3], [0.9], [0.0]], dtype=torch.float64)
    std = torch.full_like(mean, 0.2)
    total = torch.zeros(3, dtype=torch.float64)
    for k in range(levels):
        kk = torch.full((3, 1), k)
        total += torch.exp(-discretized_gaussian_nll(kk, mean, std, levels))
    torch.testing.assert_close(total, torch.ones(3, dtype=torch.float64))


def test_exact_chains_sample_the_gaussian():
    gen = torch.Generator().manual_seed(2)
    n = 20_000
    ddpm = ddpm_chain(VPSchedule(), 1000)
    x = sample_ddpm(oracle_step_fn(ddpm), ddpm, (n, 2), generator=gen, dtype=torch.float64)
    torch.testing.assert_close(x.mean(0), MEAN, atol=0.05, rtol=0)
    torch.testing.assert_close(x.var(0), VAR, atol=0.08, rtol=0)
    smld = smld_chain(VESchedule(0.01, 10.0), 100)
    x = sample_ncsn(
        oracle_step_fn(smld),
        smld,
        (n, 2),
        n_steps_each=5,
        step_lr=2e-4,
        generator=gen,
        dtype=torch.float64,
    )
    torch.testing.assert_close(x.mean(0), MEAN, atol=0.05, rtol=0)
    torch.testing.assert_close(x.var(0), VAR, atol=0.1, rtol=0)


def test_continuous_view_runs_every_sampler_and_the_ode_likelihood():
    """For SMLD the continuous view of the exact discrete model is the exact VE score at every t,
    so its ODE likelihood is the oracle's; for DDPM it is exact at the steps."""
    ve = VESchedule(0.01, 10.0)
    smld = smld_chain(ve, 100)
    model = DiscreteScoreModel(oracle_eps_net(smld), smld, output="eps")
    data = gaussian()
    gen = torch.Generator().manual_seed(3)
    x = data.sample(64, generator=gen)
    t = torch.rand(64, dtype=torch.float64) * 0.99 + 0.01
    torch.testing.assert_close(model(x, t), data.score_fn(ve)(x, t))
    opts = dict(divergence=Exact(), tol=1e-5)
    ll = log_likelihood(model, ve, x[:16], **opts)
    exact = log_likelihood(data.score_fn(ve), ve, x[:16], **opts)
    torch.testing.assert_close(ll.nll, exact.nll, atol=1e-4, rtol=0)

    vp = VPSchedule()
    ddpm = ddpm_chain(vp, 1000)
    model = DiscreteScoreModel(oracle_eps_net(ddpm), ddpm, output="eps")
    steps = torch.randint(0, 1000, (64,), generator=gen)
    a, s = ddpm.at_step(steps, x)
    exact = -(x - a[:, None] * MEAN) / (a[:, None] ** 2 * VAR + s[:, None] ** 2)
    torch.testing.assert_close(model(x, steps.double() / 999), exact)
    torch.testing.assert_close(model.at_step(x, steps, "score"), exact)
    res = sample(model, vp, (4000, 2), sampler="pc", steps=200, generator=4, dtype=torch.float64)
    torch.testing.assert_close(res.samples.mean(0), MEAN, atol=0.1, rtol=0)
    torch.testing.assert_close(res.samples.var(0), VAR, atol=0.2, rtol=0)


def test_ddpm_bound_on_discrete_data_tends_to_minus_log_p():
    """Data on L = 4 levels (bin centres in [−1, 1]) with the exact ε̂ of their Gaussian-mixture
    marginals: E[bound] ≥ H(P) = E[−log P(k)] at every N, and the gap closes as N grows — with
    ε identifiable once σ_0 ≪ bin width, the first steps' O(1) log-SNR jumps cost nothing and
    DDPM's bound meets the continuous VLB (here H(P), the exact score's). SE from 4000 draws."""
    probs = torch.tensor([0.1, 0.4, 0.2, 0.3], dtype=torch.float64)
    centres = 2 * (torch.arange(4, dtype=torch.float64) + 0.5) / 4 - 1
    entropy = float(-(probs * probs.log()).sum())

    def step_fn_for(chain):
        def eps(x, i):
            a, s = (v[:, None] for v in chain.at_step(i, x))
            post = torch.softmax(probs.log() - 0.5 * ((x - a * centres) / s) ** 2, -1)
            return (x - a * (post * centres).sum(-1, keepdim=True)) / s

        return eps

    gen = torch.Generator().manual_seed(0)
    gaps = []
    for n in (100, 1000):
        chain = ddpm_chain(VPSchedule(), n)
        k = torch.multinomial(probs, 4000, replacement=True, generator=gen)[:, None]
        total = ddpm_vlb(step_fn_for(chain), chain, k, levels=4, generator=gen).total
        se = float(total.std()) / math.sqrt(len(total))
        gaps.append(float(total.mean()) - entropy)
        assert gaps[-1] > -3 * se
    assert gaps[1] < gaps[0] / 3 and gaps[1] < 0.05  # nats, at N = 1000
