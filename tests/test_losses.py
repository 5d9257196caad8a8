"""Losses and time samplers, checked against the Gaussian oracle."""

from __future__ import annotations

import math

import pytest
import torch
from scipy import stats

from sdelab.losses import TimeSample, dsm_loss, sample_time, sdeflow_dsm
from sdelab.oracle import GaussianData
from sdelab.parametrization import KINDS, score_fn_to_kind
from sdelab.sde import VPSchedule

D64 = torch.float64


def correlated_gaussian() -> GaussianData:
    return GaussianData(
        torch.tensor([1.0, -0.5], dtype=D64), torch.tensor([[1.0, 0.7], [0.7, 0.8]], dtype=D64)
    )


def test_importance_sampler_ks(schedule):
    """t from the importance sampler has CDF F(t) = (λ(t_min) − λ(t)) / Λ (KS test, α = 1e-3)."""
    ts = sample_time(
        schedule,
        4000,
        time_sampling="importance",
        generator=torch.Generator().manual_seed(5),
        dtype=D64,
    )
    ends = schedule.log_snr(torch.tensor([schedule.t_min, schedule.T], dtype=D64))

    def cdf(t):
        lam = schedule.log_snr(torch.as_tensor(t, dtype=D64))
        return ((ends[0] - lam) / (ends[0] - ends[1])).detach().numpy()

    assert stats.kstest(ts.t.detach().numpy(), cdf).pvalue > 1e-3
    # weight is 1/q(t) = Λ / (−λ'(t))
    torch.testing.assert_close(ts.weight, (ends[0] - ends[1]) / -schedule.d_log_snr(ts.t))


def test_velocity_importance_sampler_ks(schedule):
    """i-DODE's sampler: λ(t) has density ∝ sigmoid(λ), CDF (softplus(λ(t_min)) −
    softplus(λ(t))) / Z (KS test), weight Z / (−λ'(t) sigmoid(λ(t)))."""
    ts = sample_time(
        schedule,
        4000,
        time_sampling="importance-velocity",
        generator=torch.Generator().manual_seed(6),
        dtype=D64,
    )
    sp = torch.nn.functional.softplus
    ends = sp(schedule.log_snr(torch.tensor([schedule.t_min, schedule.T], dtype=D64)))
    z = ends[0] - ends[1]

    def cdf(t):
        lam = schedule.log_snr(torch.as_tensor(t, dtype=D64))
        return ((ends[0] - sp(lam)) / z).detach().numpy()

    assert stats.kstest(ts.t.detach().numpy(), cdf).pvalue > 1e-3
    lam = schedule.log_snr(ts.t)
    torch.testing.assert_close(ts.weight, z / (-schedule.d_log_snr(ts.t) * torch.sigmoid(lam)))


def test_velocity_importance_gives_idode_constant_weight():
    """On a VP schedule the likelihood-weighted loss in v, ½ (g²/σ²) α² ‖v̂ − v‖², times the
    weight of the velocity importance sampler is i-DODE's ½ Z ‖v̂ − v‖², Z = ∫ α² dλ."""
    schedule = VPSchedule()
    ts = sample_time(
        schedule,
        256,
        time_sampling="importance-velocity",
        generator=torch.Generator().manual_seed(1),
    )
    v = schedule(ts.t.double())
    lam = schedule.log_snr(torch.tensor([schedule.t_min, schedule.T], dtype=D64))
    z = float(torch.nn.functional.softplus(lam[0]) - torch.nn.functional.softplus(lam[1]))
    weight = ts.weight.double() * v.g2 / v.sigma**2 * v.alpha**2
    torch.testing.assert_close(weight, torch.full_like(weight, z), rtol=1e-4, atol=0)


def test_uniform_and_low_discrepancy_samplers(schedule):
    ts = sample_time(schedule, 3000, generator=torch.Generator().manual_seed(0), dtype=D64)
    span = schedule.T - schedule.t_min
    u = ((ts.t - schedule.t_min) / span).numpy()
    assert stats.kstest(u, "uniform").pvalue > 1e-3
    assert bool((ts.weight == span).all())
    ld = sample_time(
        schedule, 64, low_discrepancy=True, dtype=D64, generator=torch.Generator().manual_seed(0)
    )
    gaps = torch.diff(((ld.t - schedule.t_min) / span).sort().values)
    torch.testing.assert_close(gaps, torch.full_like(gaps, 1 / 64), rtol=1e-6, atol=1e-6)


def _batched_means(values: torch.Tensor, k: int = 50) -> tuple[float, float]:
    chunks = values.reshape(k, -1).mean(dim=1)
    return float(chunks.mean()), float(chunks.std() / math.sqrt(k))


@pytest.mark.parametrize(
    "weighting,time_sampling",
    [
        ("score-matching", "uniform"),
        ("likelihood", "importance"),
        ("likelihood", "importance-velocity"),
    ],
)
def test_oracle_is_stationary_point(schedule, weighting, time_sampling):
    """d loss / d offset = 0 at the oracle score (within 4.5 SE of 50 batch means)."""
    data = correlated_gaussian()
    score = data.score_fn(schedule)
    offset = torch.zeros(2, dtype=D64, requires_grad=True)
    g = torch.Generator().manual_seed(11)
    grads = []
    for _ in range(50):
        x0 = data.sample(400, generator=g)
        out = dsm_loss(
            lambda x, t: score(x, t) + offset,
            schedule,
            x0,
            parametrization="score",
            weighting=weighting,
            time_sampling=time_sampling,
            generator=g,
        )
        grads.append(torch.autograd.grad(out.loss.mean(), offset)[0])
    grads = torch.stack(grads)
    z = grads.mean(0) / (grads.std(0) / math.sqrt(len(grads)))
    assert bool((z.abs() < 4.5).all()), z


def test_velocity_oracle_minimises_the_idode_loss(schedule):
    """A velocity network (the oracle's α' x0 + σ' ε posterior mean plus an offset) trained by
    likelihood weighting with i-DODE's importance sampling: d loss / d offset = 0 at the
    oracle (4.5 SE), and the offset oracle has a larger loss with common random numbers."""
    data = correlated_gaussian()
    oracle = score_fn_to_kind(data.score_fn(schedule), schedule, "velocity")
    offset = torch.zeros(2, dtype=D64, requires_grad=True)
    g = torch.Generator().manual_seed(13)
    grads = []
    for _ in range(40):
        out = dsm_loss(
            lambda x, t: oracle(x, t) + offset,
            schedule,
            data.sample(400, generator=g),
            parametrization="velocity",
            weighting="likelihood",
            time_sampling="importance-velocity",
            generator=g,
        )
        grads.append(torch.autograd.grad(out.loss.mean(), offset)[0])
    grads = torch.stack(grads)
    z = grads.mean(0) / (grads.std(0) / math.sqrt(len(grads)))
    assert bool((z.abs() < 4.5).all()), z
    x0 = data.sample(20_000, generator=g)
    base = dsm_loss(
        oracle,
        schedule,
        x0,
        parametrization="velocity",
        weighting="likelihood",
        time_sampling="importance-velocity",
        generator=g,
    )
    draws = dict(time=TimeSample(base.t, base.weight), noise=base.noise)
    worse = dsm_loss(
        lambda x, t: oracle(x, t) + 0.3,
        schedule,
        x0,
        parametrization="velocity",
        weighting="likelihood",
        **draws,
    )
    mean, se = _batched_means((worse.loss - base.loss).detach())
    assert mean > 4 * se and mean > 0, (mean, se)


def test_perturbing_the_oracle_raises_the_loss(schedule):
    """With common random numbers, oracle + δ or a rescaled oracle has larger expected loss."""
    data = correlated_gaussian()
    score = data.score_fn(schedule)
    x0 = data.sample(20_000, generator=torch.Generator().manual_seed(2))
    base = dsm_loss(
        score, schedule, x0, parametrization="score", generator=torch.Generator().manual_seed(3)
    )
    draws = dict(time=TimeSample(base.t, base.weight), noise=base.noise)
    for fn in (lambda x, t: score(x, t) + 0.3, lambda x, t: 0.8 * score(x, t)):
        worse = dsm_loss(fn, schedule, x0, parametrization="score", **draws)
        diff = worse.loss - base.loss
        mean, se = _batched_means(diff)
        assert mean > 4 * se and mean > 0, (mean, se)


def test_loss_is_the_same_in_every_parametrization(schedule):
    data = correlated_gaussian()
    score = data.score_fn(schedule)
    x0 = data.sample(64, generator=torch.Generator().manual_seed(4))
    ref = dsm_loss(
        score,
        schedule,
        x0,
        parametrization="score",
        weighting="likelihood",
        generator=torch.Generator().manual_seed(9),
    )
    for kind in KINDS:
        out = dsm_loss(
            score_fn_to_kind(score, schedule, kind),
            schedule,
            x0,
            parametrization=kind,
            weighting="likelihood",
            time=TimeSample(ref.t, ref.weight),
            noise=ref.noise,
        )
        torch.testing.assert_close(out.loss, ref.loss, rtol=1e-7, atol=1e-9)


def test_importance_sampling_same_mean_smaller_variance():
    """Likelihood-weighted loss: IS and uniform t estimate the same integral; IS has far less
    variance. Means agree within 4 combined SE (n = 100,000 each, t_min = 1e-3)."""
    schedule = VPSchedule(t_min=1e-3)
    data = correlated_gaussian()
    score = data.score_fn(schedule)
    g = torch.Generator().manual_seed(21)
    x0 = data.sample(100_000, generator=g)
    uni = dsm_loss(
        score, schedule, x0, parametrization="score", weighting="likelihood", generator=g
    ).loss
    imp = dsm_loss(
        score,
        schedule,
        x0,
        parametrization="score",
        weighting="likelihood",
        time_sampling="importance",
        generator=g,
    ).loss
    mu, su = _batched_means(uni, 100)
    mi, si = _batched_means(imp, 100)
    assert abs(mu - mi) < 4 * math.hypot(su, si), (mu, su, mi, si)
    assert float(imp.var()) < 0.1 * float(uni.var())


def test_likelihood_weighting_is_vdm_loss_in_eps():
    """½ g²‖s − ∇log p_{0t}‖² = ½ γ'(t) ‖ε − ε̂‖² term by term, and with IS = ½ Λ ‖ε − ε̂‖²."""
    from sdelab.sde import VDMLinearSchedule

    schedule = VDMLinearSchedule()
    data = correlated_gaussian()
    eps_fn = score_fn_to_kind(data.score_fn(schedule), schedule, "eps")
    x0 = data.sample(256, generator=torch.Generator().manual_seed(0))
    out = dsm_loss(
        eps_fn, schedule, x0, weighting="likelihood", generator=torch.Generator().manual_seed(1)
    )
    sq = ((out.eps_hat - out.noise) ** 2).sum(1)
    torch.testing.assert_close(
        out.loss, 0.5 * (5.0 + 13.3) * sq
    )  # γ' = γ_max − γ_min, T − t_min = 1
    imp = dsm_loss(
        eps_fn,
        schedule,
        x0,
        weighting="likelihood",
        time_sampling="importance",
        generator=torch.Generator().manual_seed(1),
    )
    torch.testing.assert_close(imp.loss, 0.5 * 18.3 * ((imp.eps_hat - imp.noise) ** 2).sum(1))


def test_sdeflow_dsm_matches_its_formula():
    schedule = VPSchedule()
    data = correlated_gaussian()
    drift = score_fn_to_kind(data.score_fn(schedule), schedule, "drift")
    x0 = data.sample(32, generator=torch.Generator().manual_seed(0))
    for debias in (False, True):
        loss = sdeflow_dsm(
            drift, schedule, x0, debias=debias, generator=torch.Generator().manual_seed(5)
        )
        # replay the same draws: times first, then noise
        g = torch.Generator().manual_seed(5)
        ts = sample_time(
            schedule,
            32,
            time_sampling="importance" if debias else "uniform",
            generator=g,
            dtype=D64,
        )
        eps = torch.randn(x0.shape, generator=g, dtype=D64)
        v = schedule(ts.t)
        xt = v.alpha[:, None] * x0 + v.sigma[:, None] * eps
        a = drift(xt, ts.t)
        ref = 0.5 * ((a * v.sigma[:, None] / v.g[:, None] + eps) ** 2).sum(1)
        const = (
            1.0 - 1e-5
            if not debias
            else float(
                schedule.log_snr(torch.tensor(1e-5, dtype=D64))
                - schedule.log_snr(torch.tensor(1.0, dtype=D64))
            )
        )
        torch.testing.assert_close(loss, const * ref)


def test_bad_loss_inputs():
    schedule = VPSchedule()
    x0 = torch.zeros(4, 2)
    with pytest.raises(ValueError, match="unknown weighting 'sm'.*score-matching"):
        dsm_loss(lambda x, t: x, schedule, x0, weighting="sm")
    with pytest.raises(ValueError, match="unknown time sampler 'lognormal'"):
        dsm_loss(lambda x, t: x, schedule, x0, time_sampling="lognormal")
    with pytest.raises(ValueError, match="noise shape"):
        dsm_loss(lambda x, t: x, schedule, x0, noise=torch.zeros(4, 3))
    with pytest.raises(ValueError, match="leaves the schedule's interval"):
        dsm_loss(
            lambda x, t: x, schedule, x0, time=TimeSample(torch.full((4,), 2.0), torch.ones(4))
        )
