"""Out-of-distribution scores: AUROC against its closed form, compression lengths at their
extremes, the likelihood ratio across noise levels against the Gaussian oracle."""

from __future__ import annotations

import math

import pytest
import torch

from sdelab.data.images import requantize
from sdelab.likelihood.ood import auroc, compression_bits_per_dim, noise_level_log_ratio
from sdelab.likelihood.options import Augmented, Exact
from sdelab.oracle import GaussianData
from sdelab.sde import VESchedule, VPSchedule

D64 = torch.float64


def normal_cdf(x: float) -> float:
    return 0.5 * (1 + math.erf(x / math.sqrt(2)))


@pytest.mark.parametrize("shift", [0.0, 0.5, 1.5])
def test_auroc_of_two_gaussians_matches_the_closed_form(shift):
    """Scores N(0, 1) in, N(d, 1) out: AUROC = Φ(d/√2); the estimate lies within 4 of its own
    standard errors, and that standard error matches the spread over 40 repetitions within
    35 %."""
    g = torch.Generator().manual_seed(1)
    truth = normal_cdf(shift / math.sqrt(2))
    values, ses = [], []
    for _ in range(40):
        a = torch.randn(300, generator=g, dtype=D64)
        b = torch.randn(200, generator=g, dtype=D64) + shift
        res = auroc(a, b)
        values.append(res.value)
        ses.append(res.se)
    values = torch.tensor(values)
    assert abs(values[0] - truth) <= 4 * ses[0]
    assert abs(float(values.mean()) - truth) <= 4 * float(values.std()) / math.sqrt(40)
    ratio = float(torch.tensor(ses).mean()) / float(values.std())
    assert 0.65 <= ratio <= 1.35, ratio


def test_auroc_extremes_and_ties():
    a = torch.tensor([0.0, 1.0, 2.0])
    assert auroc(a, a + 10).value == 1.0
    assert auroc(a + 10, a).value == 0.0
    assert auroc(torch.ones(5), torch.ones(7)).value == 0.5  # all tied: chance
    # one tie among 2×2 pairs: (1 + ½ + 1 + 1) / 4
    assert auroc(torch.tensor([0.0, 1.0]), torch.tensor([1.0, 2.0])).value == pytest.approx(0.875)
    with pytest.raises(ValueError, match="NaN or inf"):
        auroc(torch.tensor([0.0, float("nan")]), a)
    with pytest.raises(ValueError, match="non-empty 1-D"):
        auroc(torch.zeros(0), a)


@pytest.mark.parametrize("compressor", ["png", "zlib", "lzma"])
def test_compression_length_orders_constant_below_structure_below_noise(compressor):
    """A constant image compresses to a small fraction of a bit per pixel; uniform noise cannot
    be compressed below its entropy (8 bits per pixel); a smooth gradient lies between. (64×64
    images: the compressors' fixed headers, ~50–80 bytes, are 0.1–0.15 bit per pixel there.)"""
    g = torch.Generator().manual_seed(0)
    const = torch.full((1, 1, 64, 64), 7)
    noise = torch.randint(0, 256, (1, 1, 64, 64), generator=g)
    ramp = (torch.arange(64)[None, :] * 4 + torch.arange(64)[:, None] * 0).expand(64, 64)
    ramp = ramp.reshape(1, 1, 64, 64)
    bits = compression_bits_per_dim(torch.cat([const, ramp, noise]), compressor=compressor)
    assert bits[0] < 0.25 and bits[2] >= 8.0 and bits[0] < bits[1] < bits[2], bits


def test_compression_scales_fewer_levels_to_8_bits_and_refuses_bad_input():
    k = torch.randint(0, 17, (2, 1, 8, 8), generator=torch.Generator().manual_seed(0))
    same = compression_bits_per_dim(k * 255 // 16, compressor="zlib")
    assert torch.equal(compression_bits_per_dim(k, num_levels=17, compressor="zlib"), same)
    with pytest.raises(ValueError, match="outside"):
        compression_bits_per_dim(k, num_levels=16)
    with pytest.raises(ValueError, match="unknown compressor"):
        compression_bits_per_dim(k, compressor="gif")
    with pytest.raises(ValueError, match="integer levels"):
        compression_bits_per_dim(k.double())


@pytest.mark.parametrize("kind", ["VP", "VE"])
def test_noise_level_ratio_splits_the_exact_log_density(kind):
    """log p_{t_min}(x) = log p_t(x_t) + log-ratio: with the oracle's exact density at t (a
    schedule whose t_min is t, evaluated at the returned x_t) the two parts add up to the exact
    log-density of x within 3·tol, at two noise levels; and as the flow of Gaussian data is
    linear (∇·v does not depend on x), every example gets the same ratio."""
    sched = VPSchedule() if kind == "VP" else VESchedule()
    g = torch.Generator().manual_seed(0)
    dim = 4
    a = torch.randn(dim, dim, generator=g, dtype=D64)
    data = GaussianData(
        torch.randn(dim, generator=g, dtype=D64), a @ a.T / dim + 0.05 * torch.eye(dim, dtype=D64)
    )
    x = data.sample(16, generator=g)
    truth = data.ode_log_prob(x, sched)
    tol = 1e-3
    for t in (0.05, 0.3):
        with torch.no_grad():
            res = noise_level_log_ratio(data.score_fn(sched), sched, x, t, tol=tol)
        assert (
            res.result.policy.integrator == Augmented() and res.result.policy.divergence == Exact()
        )
        coarse_sched = (VPSchedule if kind == "VP" else VESchedule)(t_min=t)
        coarse = data.ode_log_prob(res.z, coarse_sched)
        err = (coarse + res.log_ratio - truth).abs()
        assert float(err.max()) <= 3 * tol, float(err.max())
        assert res.sigma == pytest.approx(float(sched.alpha_sigma(torch.tensor(t, dtype=D64))[1]))
        assert float(res.log_ratio.max() - res.log_ratio.min()) <= 3 * tol


def test_noise_level_ratio_refuses_t_outside_the_schedule():
    sched = VPSchedule()
    data = GaussianData(torch.zeros(2, dtype=D64), torch.eye(2, dtype=D64))
    for t in (sched.t_min, 1.5):
        with pytest.raises(ValueError, match="must lie in"):
            noise_level_log_ratio(data.score_fn(sched), sched, torch.zeros(1, 2, dtype=D64), t)


def test_requantize_maps_levels_and_size():
    """17 levels to 256: 0 → 0, 16 → 255, order kept; resized images keep the range."""
    k = torch.arange(17).reshape(1, 1, 1, 17).expand(1, 1, 17, 17)
    out = requantize(k, 17, 256)
    assert out.dtype == torch.int64 and int(out.min()) == 0 and int(out.max()) == 255
    assert bool((out[0, 0, 0, 1:] > out[0, 0, 0, :-1]).all())
    big = requantize(k, 17, 256, size=28)
    assert big.shape == (1, 1, 28, 28) and int(big.min()) >= 0 and int(big.max()) <= 255
    with pytest.raises(ValueError, match="outside"):
        requantize(k + 1, 17, 256)
