"""VDM: learned schedules and the variational bound, against the Gaussian oracle."""

from __future__ import annotations

import math

import pytest
import torch

from sdelab.oracle import GaussianData
from sdelab.parametrization import score_fn_to_kind
from sdelab.sde import LearnedLinearSchedule, MonotoneNetSchedule, VDMLinearSchedule
from sdelab.vdm import levels_to_centres, variance_gradient_step, vdm_vlb

D64 = torch.float64


def gaussian() -> GaussianData:
    return GaussianData(
        torch.tensor([0.3, -0.2], dtype=D64), torch.tensor([[0.09, 0.03], [0.03, 0.04]], dtype=D64)
    )


def oracle_eps(data, schedule):
    return score_fn_to_kind(data.score_fn(schedule), schedule, "eps")


def _mean_se(v: torch.Tensor) -> tuple[float, float]:
    return float(v.mean()), float(v.std() / math.sqrt(v.numel()))


def test_continuous_diffusion_loss_is_vdm_formula():
    """½ γ'(t)‖ε − ε̂‖² with γ' = γ_max − γ_min, term by term for the same draws."""
    sched = VDMLinearSchedule()
    data = gaussian()
    x = data.sample(64, generator=torch.Generator().manual_seed(0))
    eps_fn = oracle_eps(data, sched)
    out = vdm_vlb(eps_fn, sched, x, generator=torch.Generator().manual_seed(1))
    # replay: low-discrepancy times (one offset), then the noise
    g = torch.Generator().manual_seed(1)
    u0 = torch.rand((), generator=g, dtype=D64)
    t = torch.remainder(u0 + torch.arange(64, dtype=D64) / 64, 1.0)
    eps = torch.randn(x.shape, generator=g, dtype=D64)
    a, s = sched.alpha_sigma(t)
    z = a[:, None] * x + s[:, None] * eps
    ref = 0.5 * 18.3 * ((eps - eps_fn(z, t)) ** 2).sum(1)
    torch.testing.assert_close(out.diffusion, ref)


def test_monotone_schedule_hits_endpoints_before_and_after_training():
    sched = MonotoneNetSchedule(hidden=64).double()
    t = torch.linspace(0, 1, 201, dtype=D64)
    opt = torch.optim.Adam(sched.parameters(), lr=0.1)
    for step in range(4):
        gam, dgam = sched.gamma(t)
        assert float(gam[0].detach()) == pytest.approx(-13.3, abs=1e-12)
        assert float(gam[-1].detach()) == pytest.approx(5.0, abs=1e-12)
        assert bool((torch.diff(gam.detach()) > 0).all()) and bool((dgam.detach() > 0).all())
        # an arbitrary objective that pulls the curve around
        obj = ((gam - 10 * torch.sin(7 * t)) ** 2).mean()
        opt.zero_grad()
        obj.backward()
        opt.step()
        if step == 0:
            before = gam.detach().clone()
    assert float((gam.detach() - before).abs().max()) > 1e-3, "training must move the curve"


def test_learned_endpoints_schedule():
    sched = LearnedLinearSchedule(-10.0, 6.0)
    lam = sched.log_snr(torch.tensor([0.0, 1.0]))
    torch.testing.assert_close(lam, torch.tensor([10.0, -6.0]))
    assert len(list(sched.parameters())) == 2


@pytest.mark.parametrize("ends,max_gap", [((-13.3, 5.0), 0.05), ((-20.0, 12.0), 0.005)])
def test_vlb_bounds_and_approaches_exact_nll(ends, max_gap):
    """Oracle ε̂: VLB ≥ −log p(x) (within 3 SE) and the gap shrinks as the prior and
    reconstruction terms vanish (wider γ end points)."""
    sched = VDMLinearSchedule(*ends).double()
    data = gaussian()
    g = torch.Generator().manual_seed(3)
    x = data.sample(4000, generator=g)
    out = vdm_vlb(oracle_eps(data, sched), sched, x, generator=g)
    gap, se = _mean_se(out.total + data.log_prob(x))
    assert gap > -3 * se, (gap, se)
    assert gap < max_gap + 3 * se, (gap, se)


def test_discrete_steps_approach_continuous():
    sched = VDMLinearSchedule().double()
    data = gaussian()
    eps_fn = oracle_eps(data, sched)
    x = data.sample(4000, generator=torch.Generator().manual_seed(4))
    cont = vdm_vlb(eps_fn, sched, x, generator=torch.Generator().manual_seed(5)).diffusion
    many = vdm_vlb(eps_fn, sched, x, n_steps=1000, generator=torch.Generator().manual_seed(6))
    few = vdm_vlb(eps_fn, sched, x, n_steps=2, generator=torch.Generator().manual_seed(7))
    (mc, sc), (mm, sm), (mf, sf) = (_mean_se(v) for v in (cont, many.diffusion, few.diffusion))
    assert abs(mm - mc) < 4 * math.hypot(sc, sm)
    assert mf > mc + 3 * math.hypot(sc, sf), "T = 2 steps must cost more than T = ∞ (VDM §4)"


def test_discrete_data_bpd_and_errors():
    sched = VDMLinearSchedule()
    k = torch.randint(0, 256, (8, 1, 4, 4), generator=torch.Generator().manual_seed(0))
    out = vdm_vlb(lambda z, t: torch.zeros_like(z), sched, k, num_levels=256)
    assert out.bpd.shape == (8,) and bool((out.bpd > 0).all())
    assert bool((out.reconstruction >= 0).all())  # −log of a probability mass
    centres = levels_to_centres(torch.tensor([0, 255]), 256)
    torch.testing.assert_close(centres, torch.tensor([-255 / 256, 255 / 256]))
    with pytest.raises(ValueError, match=r"levels must lie in \[0, 15\]"):
        vdm_vlb(lambda z, t: z, sched, k, num_levels=16)
    with pytest.raises(ValueError, match="integers"):
        levels_to_centres(torch.tensor([0.5]), 256)
    with pytest.raises(ValueError, match="log-SNR schedule on"):
        from sdelab.sde import VPSchedule

        vdm_vlb(lambda z, t: z, VPSchedule(), k.float())


def test_variance_minimisation_lowers_loss_variance():
    """Training γ_η on E[L²] with the oracle ε̂ keeps E[L] and lowers Var[L] on a 2-D Gaussian."""
    torch.manual_seed(0)
    data = gaussian()
    sched = MonotoneNetSchedule(hidden=32).double()
    x_eval = data.sample(20_000, generator=torch.Generator().manual_seed(1))

    def diffusion_loss(x, gen):
        return vdm_vlb(
            oracle_eps(data, sched), sched, x, low_discrepancy=False, generator=gen
        ).diffusion

    with torch.no_grad():
        before = diffusion_loss(x_eval, torch.Generator().manual_seed(2))
    opt = torch.optim.Adam(sched.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(3)
    for _ in range(100):
        opt.zero_grad()
        loss = diffusion_loss(data.sample(256, generator=g), g)
        variance_gradient_step(loss, [], sched.parameters())
        opt.step()
    with torch.no_grad():
        after = diffusion_loss(x_eval, torch.Generator().manual_seed(2))
    (mb, sb), (ma, sa) = _mean_se(before), _mean_se(after)
    assert abs(ma - mb) < 4 * math.hypot(sa, sb), "the schedule must not change E[L]"
    assert float(after.var()) < 0.8 * float(before.var()), (float(before.var()), float(after.var()))
