"""Dequantization and bits/dim accounting, checked with densities whose answer is known."""

from __future__ import annotations

import math

import pytest
import torch
from scipy import stats

from sdelab.likelihood.bpd import bits_per_dim
from sdelab.likelihood.dequantization import check_levels, dequantize, nats_to_bpd
from sdelab.oracle import GaussianData
from sdelab.sde import VESchedule, VPSchedule

D64 = torch.float64


def integer_data(levels: int, n: int = 64, d: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, levels, (n, d), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("levels", [2, 5, 256])
def test_uniform_density_gives_exactly_log2_levels(levels):
    """The uniform density on [0, 1]^D, written in [0, 1] or in [−1, 1] (density 2^−D), gives
    exactly log2(L) bits/dim under uniform dequantization: P(k) = L^−D."""
    k = integer_data(levels)
    d = k.shape[1]
    unit = bits_per_dim(lambda y: torch.zeros(len(y), dtype=D64), k, levels, 1.0, 0.0, dtype=D64)
    sym = bits_per_dim(
        lambda y: torch.full((len(y),), -d * math.log(2), dtype=D64),
        k,
        levels,
        2.0,
        -1.0,
        dtype=D64,
    )
    for res in (unit, sym):
        torch.testing.assert_close(res.bpd, torch.full((64,), math.log2(levels), dtype=D64))
    assert unit.dequantization == "uniform" and unit.levels == levels and sym.scale == 2.0


def test_histogram_density_is_exact_in_any_space():
    """A density constant on each bin (p = P(k)·L^D/a^D) makes the uniform bound exact:
    bpd = −log2 P(k)/D for any affine map to model space."""
    levels, d = 4, 2
    logits = torch.randn(levels, levels, dtype=D64, generator=torch.Generator().manual_seed(0))
    log_pk = torch.log_softmax(logits.reshape(-1), 0).reshape(levels, levels)
    k = integer_data(levels, d=d, seed=1)
    for scale, shift in ((1.0, 0.0), (2.0, -1.0), (255.0, 3.0)):

        def logp(y, scale=scale, shift=shift):
            idx = ((y - shift) / scale * levels).floor().long()
            return log_pk[idx[:, 0], idx[:, 1]] + d * math.log(levels / scale)

        res = bits_per_dim(logp, k, levels, scale, shift, n_repeats=3, dtype=D64)
        expect = -log_pk[k[:, 0], k[:, 1]] / (d * math.log(2))
        torch.testing.assert_close(res.bpd, expect)
        torch.testing.assert_close(res.se, torch.zeros_like(res.se), atol=1e-12, rtol=0)


def true_bin_nll(data: GaussianData, k: torch.Tensor, levels: int, scale: float, shift: float):
    """−log P(k) for diagonal Gaussian data N(m, s²) on bins [a k/L + b, a (k+1)/L + b), with
    the mass Φ(hi) − Φ(lo) computed in log space (on the far side of the mean by symmetry)."""
    m, s = data.mean, data.evals.sqrt()
    lo = (scale * k.to(D64) / levels + shift - m) / s
    hi = lo + scale / levels / s
    right = lo > 0  # Φ(hi) − Φ(lo) = Φ(−lo) − Φ(−hi)
    a, b = torch.where(right, -hi, lo), torch.where(right, -lo, hi)
    log_b = torch.special.log_ndtr(b)
    log_mass = log_b + torch.log1p(-torch.exp(torch.special.log_ndtr(a) - log_b))
    return -log_mass.sum(1)


@pytest.mark.parametrize("std", [0.05, 0.3, 2.0])
def test_oracle_never_negative_and_bounds_the_bin_probability(std):
    """For Gaussian data (narrow, matched, wide relative to the bin width 0.5) the bpd of integer
    data is positive and, averaged over dequantization noise, ≥ −log2 P(k)/D within 4 SE."""
    levels = 4
    data = GaussianData(torch.tensor([0.1, -0.2], dtype=D64), torch.full((2,), std**2, dtype=D64))
    k = integer_data(levels, n=32, d=2, seed=int(100 * std))
    res = bits_per_dim(
        data.log_prob,
        k,
        levels,
        2.0,
        -1.0,
        n_repeats=64,
        dtype=D64,
        generator=torch.Generator().manual_seed(0),
    )
    assert bool((res.bpd > 0).all())
    floor = nats_to_bpd(true_bin_nll(data, k, levels, 2.0, -1.0), 2)
    assert bool((res.bpd > floor - 4 * res.se).all())


@pytest.mark.parametrize("dequantization", ["uniform", "truncated_normal"])
def test_ode_bits_per_dim_of_the_oracle(dequantization):
    """Through the ODE: the same dequantized points as the closed-form density give the same
    bpd (within the ODE tolerance), never negative, and above the exact bin probability of the
    model at t_min (the truncated normal lives in α·bin at t_min)."""
    levels = 4
    sde = VPSchedule(t_min=1e-3)
    data = GaussianData(torch.zeros(2, dtype=D64), torch.tensor([0.1, 0.3], dtype=D64))
    k = integer_data(levels, n=16, d=2, seed=3)
    common = dict(n_repeats=4, dtype=D64, dequantization=dequantization)
    ode = bits_per_dim(
        data.score_fn(sde),
        k,
        levels,
        2.0,
        -1.0,
        schedule=sde,
        tol=1e-5,
        generator=torch.Generator().manual_seed(5),
        **common,
    )
    closed = (
        bits_per_dim(
            lambda y: data.marginal_log_prob(y, sde.t_min, sde),
            k,
            levels,
            2.0,
            -1.0,
            generator=torch.Generator().manual_seed(5),
            **common,
        )
        if dequantization == "uniform"
        else None
    )
    assert ode.nfe > 0 and ode.dequantization == dequantization
    assert bool((ode.bpd > 0).all())
    if closed is not None:
        assert (ode.bpd - closed.bpd).abs().max() < 1e-3
    alpha, sigma = (float(v) for v in sde.alpha_sigma(torch.tensor(sde.t_min, dtype=D64)))
    scale = alpha if dequantization == "truncated_normal" else 1.0
    marg = GaussianData(alpha * data.mean, alpha**2 * data.evals + sigma**2)  # p_{t_min}
    floor = nats_to_bpd(true_bin_nll(marg, k, levels, 2.0 * scale, -scale), 2)
    assert bool((ode.bpd > floor - 4 * ode.se).all())


def test_truncated_normal_support_law_and_entropy():
    """Points stay inside α·bin, z follows N(0,1) truncated to [−τ, τ] (KS test), and the
    entropy is the closed form (checked against scipy)."""
    sde = VESchedule(t_min=0.05)
    levels, scale, shift = 8, 2.0, -1.0
    k = integer_data(levels, n=4000, d=2, seed=4)
    dq = dequantize(
        k,
        levels,
        scale,
        shift,
        method="truncated_normal",
        schedule=sde,
        dtype=D64,
        generator=torch.Generator().manual_seed(0),
    )
    alpha, sigma = (float(v) for v in sde.alpha_sigma(torch.tensor(0.05, dtype=D64)))
    centre = alpha * (scale * (k.to(D64) + 0.5) / levels + shift)
    half = alpha * scale / (2 * levels)
    assert float((dq.y - centre).abs().max()) <= half * (1 + 1e-12)
    tau = half / sigma
    z = ((dq.y - centre) / sigma).reshape(-1).numpy()
    assert stats.kstest(z, stats.truncnorm(-tau, tau).cdf).pvalue > 1e-3
    h = 2 * (stats.truncnorm(-tau, tau).entropy() + math.log(sigma))
    torch.testing.assert_close(dq.entropy, torch.full((4000,), h, dtype=D64))


def test_uniform_dequantization_fills_the_bin():
    k = integer_data(4, n=2000, d=1, seed=2)
    dq = dequantize(k, 4, 2.0, -1.0, dtype=D64, generator=torch.Generator().manual_seed(0))
    frac = ((dq.y + 1) / 2 * 4 - k.to(D64)).reshape(-1).numpy()
    assert frac.min() >= 0 and frac.max() < 1
    assert stats.kstest(frac, "uniform").pvalue > 1e-3
    torch.testing.assert_close(dq.entropy, torch.full((2000,), math.log(0.5), dtype=D64))


def test_bad_data_raise_errors_naming_the_fix():
    k = integer_data(256, n=4)
    logp = lambda y: torch.zeros(len(y))  # noqa: E731
    cases = [
        ((logp, k.float() / 255, 256, 2.0, -1.0), "integer"),
        ((logp, k.float() / 127.5 - 1, 256, 2.0, -1.0), "integer"),
        ((logp, torch.full((2, 2), 256), 256, 2.0, -1.0), r"levels=256 allows only 0\.\.255"),
        ((logp, k - 300, 256, 2.0, -1.0), "range|span"),
        ((logp, torch.full((2, 2), float("nan")), 256, 2.0, -1.0), "NaN"),
        ((logp, k, 1, 2.0, -1.0), "levels must be an integer >= 2"),
        ((logp, k, 2.5, 2.0, -1.0), "levels must be an integer"),
        ((logp, k, 256, 0.0, -1.0), "scale > 0"),
        ((logp, k, 256, 2.0, float("nan")), "finite shift"),
        ((logp, torch.arange(4), 256, 2.0, -1.0), "batch"),
    ]
    for args, match in cases:
        with pytest.raises(ValueError, match=match):
            bits_per_dim(*args)
    with pytest.raises(ValueError, match="schedule"):
        bits_per_dim(logp, k, 256, 2.0, -1.0, dequantization="truncated_normal")
    with pytest.raises(ValueError, match="uniform, truncated_normal, variational"):
        bits_per_dim(logp, k, 256, 2.0, -1.0, dequantization="bogus")
    with pytest.raises(ValueError, match="needs dequantizer"):
        bits_per_dim(logp, k, 256, 2.0, -1.0, dequantization="variational")
    with pytest.raises(ValueError, match="n_repeats"):
        bits_per_dim(logp, k, 256, 2.0, -1.0, n_repeats=0)
    with pytest.raises(ValueError, match="schedule"):
        bits_per_dim(logp, k, 256, 2.0, -1.0, tol=1e-3)
    with pytest.raises(ValueError, match="t_min > 0"):
        dequantize(k, 256, method="truncated_normal", schedule=VPSchedule(t_min=0.0))
    assert check_levels(k.to(torch.uint8), 256).dtype == torch.get_default_dtype()
