"""Nested-variance statistics of repeated per-image estimates, against a simulated nested model
with known variances."""

from __future__ import annotations

import math

import pytest
import torch

from sdelab.likelihood.repeats import repeat_statistics


def simulate(trials, n, k, mu, sd_img, sd_rep, seed=0):
    """(trials, N, K) draws of v_ij = μ + a_i + e_ij."""
    g = torch.Generator().manual_seed(seed)
    a = sd_img * torch.randn(trials, n, 1, generator=g, dtype=torch.float64)
    e = sd_rep * torch.randn(trials, n, k, generator=g, dtype=torch.float64)
    return mu + a + e


@pytest.mark.parametrize(("sd_img", "sd_rep", "k"), [(0.5, 0.2, 4), (0.3, 0.6, 5), (1.0, 0.1, 2)])
def test_variance_components_and_standard_errors(sd_img, sd_rep, k):
    """Over 2000 simulated evaluations (N = 40): the variance estimates average to σ²_img and
    σ²_rep (within 4 Monte-Carlo SE), se² averages to Var m = σ²_img/N + σ²_rep/(NK) and matches
    the spread of m across evaluations, the ±1.96 se interval covers μ in 95 % ± 2 % of them, and
    se² = se_img² + se_rep² whenever σ̂²_img is not clipped at 0."""
    trials, n, mu = 2000, 40, 3.0
    stats = [repeat_statistics(v) for v in simulate(trials, n, k, mu, sd_img, sd_rep)]
    var_m = sd_img**2 / n + sd_rep**2 / (n * k)

    def check_mean(xs, target):
        x = torch.tensor(xs, dtype=torch.float64)
        se = float(x.std()) / math.sqrt(len(x))
        assert abs(float(x.mean()) - target) < 4 * se + 1e-12, (float(x.mean()), target, se)

    check_mean([s.var_repeats for s in stats], sd_rep**2)
    check_mean([s.var_images for s in stats], sd_img**2)  # clipping is negligible here
    check_mean([s.se**2 for s in stats], var_m)
    means = torch.tensor([s.mean for s in stats])
    # the sample variance of m over 2000 trials has relative SE √(2/1999) ≈ 3.2 %
    assert abs(float(means.var()) / var_m - 1) < 4 * math.sqrt(2 / (trials - 1))
    covered = sum(abs(s.mean - mu) < 1.96 * s.se for s in stats) / trials
    assert abs(covered - 0.95) < 0.02
    for s in stats:
        if s.var_images > 0:
            assert math.isclose(s.se**2, s.se_images**2 + s.se_repeats**2, rel_tol=1e-9)
        assert (s.n_images, s.n_repeats) == (n, k)


def test_more_repeats_shrink_only_the_repeat_part():
    """With σ_rep = 2 σ_img, going from K = 2 to K = 32 repeats shrinks se_repeats by ≈ 4 (√16)
    while se_images stays put (N = 2000: both estimates within ≈ ±12 %)."""
    few = repeat_statistics(simulate(1, 2000, 2, 0.0, 0.5, 1.0, seed=1)[0])
    many = repeat_statistics(simulate(1, 2000, 32, 0.0, 0.5, 1.0, seed=2)[0])
    assert 3.5 < few.se_repeats / many.se_repeats < 4.5
    assert 0.75 < few.se_images / many.se_images < 1.33


def test_one_repeat_and_bad_input():
    v = simulate(1, 10, 1, 1.0, 0.5, 0.5)[0]
    s = repeat_statistics(v)
    assert math.isclose(s.se, float(v.std()) / math.sqrt(10), rel_tol=1e-12)
    assert math.isnan(s.se_images) and math.isnan(s.se_repeats)
    with pytest.raises(ValueError, match=r"shape \(N images >= 2, K repeats >= 1\)"):
        repeat_statistics(torch.zeros(5))
    with pytest.raises(ValueError, match="NaN or inf"):
        repeat_statistics(torch.tensor([[1.0, float("nan")], [1.0, 2.0]]))
