"""Schedules = SDEs: identities against autograd, inverses, simulation, prior, errors."""

from __future__ import annotations

import math

import pytest
import torch

from sdelab.sde import (
    SCHEDULES,
    Schedule,
    SubVPSchedule,
    TutorialSchedule,
    VDMLinearSchedule,
    VESchedule,
    VPSchedule,
    make_schedule,
)

D64 = torch.float64


def _grid(s: Schedule, n: int = 41) -> torch.Tensor:
    return torch.linspace(s.t_min, s.T, n, dtype=D64)


def _autograd(fn, t):
    t = t.clone().requires_grad_(True)
    y = fn(t)
    if not y.requires_grad:  # constant in t
        return torch.zeros_like(t)
    return torch.autograd.grad(y.sum(), t)[0]


def test_derivatives_match_autograd(schedule):
    t = _grid(schedule)
    v = schedule(t)
    d_alpha = _autograd(lambda u: schedule.alpha_sigma(u)[0], t)
    d_sigma = _autograd(lambda u: schedule.alpha_sigma(u)[1], t)
    d_lam = _autograd(schedule.log_snr, t)
    torch.testing.assert_close(v.d_alpha, d_alpha, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(v.d_sigma, d_sigma, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(v.d_log_snr, d_lam, rtol=1e-9, atol=1e-12)


def test_f_is_dlogalpha_and_g2_formula(schedule):
    t = _grid(schedule)
    v = schedule(t)
    f_auto = _autograd(lambda u: torch.log(schedule.alpha_sigma(u)[0]), t)
    dvar = _autograd(lambda u: schedule.alpha_sigma(u)[1] ** 2, t)
    torch.testing.assert_close(v.f, f_auto, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(v.g2, dvar - 2 * f_auto * v.sigma**2, rtol=1e-9, atol=1e-12)
    assert bool((v.g2 > 0).all())


def test_g2_over_sigma2_is_minus_dlogsnr(schedule):
    v = schedule(_grid(schedule))
    torch.testing.assert_close(v.g2 / v.sigma**2, -v.d_log_snr, rtol=1e-9, atol=0.0)
    assert bool((v.d_log_snr < 0).all()), "log-SNR must decrease in t"


def test_log_snr_definition(schedule):
    v = schedule(_grid(schedule))
    torch.testing.assert_close(v.log_snr, torch.log(v.alpha**2 / v.sigma**2), rtol=1e-9, atol=1e-9)


def test_inverse_log_snr(schedule):
    t = _grid(schedule, 101)
    torch.testing.assert_close(schedule.t_of_log_snr(schedule.log_snr(t)), t, rtol=1e-9, atol=1e-9)


def test_closed_form_inverse_matches_bisection():
    for name in SCHEDULES:
        s = make_schedule(name)
        lam = s.log_snr(_grid(s, 33))
        torch.testing.assert_close(
            s.t_of_log_snr(lam), Schedule.t_of_log_snr(s, lam), rtol=1e-9, atol=1e-10
        )


def test_generic_derivatives_match_closed_forms():
    """The jvp fallback (what a user schedule gets) agrees with every hand-written derivative."""
    for name in SCHEDULES:
        s = make_schedule(name)
        t = _grid(s)
        with torch.no_grad():  # must also work without grad mode
            generic = Schedule.derivatives(s, t)
        for a, b in zip(generic, s.derivatives(t)):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_transition_composes(schedule):
    """σ_t² = α_{t|s}² σ_s² + σ_{t|s}² and α_t = α_{t|s} α_s on random pairs s < t."""
    g = torch.Generator().manual_seed(0)
    u = torch.rand(2, 200, generator=g, dtype=D64).sort(dim=0).values
    s_, t_ = schedule.t_min + (schedule.T - schedule.t_min) * u
    a_ts, s_ts = schedule.transition(s_, t_)
    a_s, sig_s = schedule.alpha_sigma(s_)
    a_t, sig_t = schedule.alpha_sigma(t_)
    torch.testing.assert_close(a_ts * a_s, a_t, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(a_ts**2 * sig_s**2 + s_ts**2, sig_t**2, rtol=1e-8, atol=1e-14)


@torch.no_grad()
def test_euler_maruyama_reproduces_marginal(schedule):
    """Simulate dx = f x dt + g dw from x_{t_min} ~ N(α x_0, σ²) on a fine log-SNR grid.

    Tolerance: 4 standard errors of the sample mean / std (n = 20,000 paths) plus a 2 %
    discretisation budget for Euler–Maruyama with 1,000 steps (weak order 1).
    """
    n, steps, x0 = 20_000, 1000, 1.5
    g = torch.Generator().manual_seed(7)
    # A grid uniform in log-SNR keeps f·dt = ½σ²dλ and g²dt = −σ²dλ small for every
    # schedule (a uniform-t grid is stiff near T for the cosine schedule).
    ends = schedule.log_snr(torch.tensor([schedule.t_min, schedule.T], dtype=D64))
    ts = schedule.t_of_log_snr(torch.linspace(float(ends[0]), float(ends[1]), steps + 1, dtype=D64))
    ts = ts.clamp(schedule.t_min, schedule.T)
    a0, s0 = schedule.alpha_sigma(ts[:1])
    x = a0 * x0 + s0 * torch.randn(n, generator=g, dtype=D64)
    checkpoints = {steps // 4, steps // 2, steps}
    for i in range(steps):
        t, h = ts[i : i + 1], ts[i + 1] - ts[i]
        v = schedule(t)
        x = x + v.f * x * h + v.g * h.sqrt() * torch.randn(n, generator=g, dtype=D64)
        if i + 1 in checkpoints:
            a, s = schedule.alpha_sigma(ts[i + 1])
            mean_tol = 4 * float(s) / math.sqrt(n) + 0.02 * abs(float(a) * x0) + 1e-3 * float(s)
            assert abs(float(x.mean()) - float(a) * x0) < mean_tol, (i, float(x.mean()), float(a))
            rel = float(x.std()) / float(s) - 1
            assert abs(rel) < 4 / math.sqrt(2 * n) + 0.02, (i, float(x.std()), float(s))


def test_prior_matches_definition():
    assert VESchedule(sigma_max=50.0).prior_std == pytest.approx(50.0)
    assert VPSchedule().prior_std == 1.0 and SubVPSchedule().prior_std == 1.0
    assert VDMLinearSchedule().prior_std == 1.0
    tut = TutorialSchedule(s=25.0)
    assert tut.prior_std == pytest.approx(math.sqrt((25.0**2 - 1) / (2 * math.log(25.0))))
    for s in (VESchedule(), VPSchedule(), tut):
        z = s.prior_sample((5, 3, 2), generator=torch.Generator().manual_seed(0), dtype=D64)
        ref = torch.distributions.Normal(0.0, s.prior_std).log_prob(z).sum(dim=(1, 2))
        torch.testing.assert_close(s.prior_logp(z), ref)


def test_prior_sample_statistics():
    z = VESchedule().prior_sample((200_000,), generator=torch.Generator().manual_seed(1), dtype=D64)
    assert abs(float(z.std()) / 50.0 - 1) < 4 / math.sqrt(2 * 200_000)


def test_vp_discrete_chain_matches_ddpm():
    vp = VPSchedule()
    betas = vp.discrete_betas(1000)
    assert betas[0] == pytest.approx(0.1 / 1000) and betas[-1] == pytest.approx(20 / 1000)
    # The exact chain on a uniform grid has 1 − β_i = α²_{t_i | t_{i−1}} ≈ exp(−β(t) Δt).
    ts = torch.linspace(0, 1, 1001, dtype=D64)[1:]
    a, _ = vp.transition(ts - 1e-3, ts)
    torch.testing.assert_close(1 - a**2, betas.to(D64), rtol=2e-2, atol=1e-4)
    ve = VESchedule()
    sig = ve.discrete_sigmas(10)
    assert sig[0] == pytest.approx(0.01) and sig[-1] == pytest.approx(50.0, rel=1e-5)


def test_unknown_name_and_bad_options():
    with pytest.raises(ValueError, match="unknown schedule 'vpp'.*ve, vp"):
        make_schedule("vpp")
    with pytest.raises(ValueError, match="bad options.*beta_min"):
        make_schedule("vp", sigma_max=3.0)
    with pytest.raises(ValueError, match="sigma_min < sigma_max"):
        VESchedule(sigma_min=5.0, sigma_max=1.0)
    with pytest.raises(ValueError, match="t_min < T"):
        VPSchedule(t_min=1.0, T=0.5)
    assert isinstance(make_schedule("Sub-VP"), SubVPSchedule)


def test_time_outside_range_is_rejected(schedule):
    with pytest.raises(ValueError, match="leaves the schedule's interval"):
        schedule(torch.tensor([schedule.T * 1.5 + 1]))
    with pytest.raises(ValueError, match="NaN"):
        schedule(torch.tensor([float("nan")]))
    schedule(torch.tensor([schedule.t_min, schedule.T]))  # the ends are fine


def test_reverse_family_and_probability_flow(schedule):
    """λ-family drift/diffusion match their formula; λ = 1 is the PF-ODE; bad λ is rejected."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, generator=g, dtype=D64)
    s = torch.randn(4, 3, generator=g, dtype=D64)
    t = torch.full((4,), 0.5 * (schedule.t_min + schedule.T), dtype=D64)
    v = schedule(t)
    for lam in (0.0, 0.5, 1.0):
        drift, diff = schedule.reverse_sde(x, t, s, lam)
        ref = v.f[:, None] * x - (1 - lam / 2) * v.g2[:, None] * s
        torch.testing.assert_close(drift, ref)
        torch.testing.assert_close(diff, ((1 - lam) * v.g2[:, None]).sqrt().expand_as(x))
    torch.testing.assert_close(
        schedule.probability_flow(x, t, s), schedule.reverse_sde(x, t, s, 1.0)[0]
    )
    with pytest.raises(ValueError, match=r"lam must lie in \[0, 1\]"):
        schedule.reverse_sde(x, t, s, 1.5)
