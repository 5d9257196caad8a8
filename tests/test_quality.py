"""Sample-quality composition: extractors, streamed statistics, .npz files, one evaluation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sdelab.metrics import feature_moments
from sdelab.nets.classifier import ConvClassifier, TimeClassifier
from sdelab.nets.inception import FIDInceptionV3
from sdelab.quality import (
    METRICS,
    ClassifierFeatures,
    IdentityFeatures,
    InceptionFeatures,
    check_metrics,
    collect_features,
    evaluate_quality,
    feature_stats,
    load_stats,
    save_stats,
)

D64 = torch.float64


def _gaussian(n: int, mean: torch.Tensor, sd: torch.Tensor, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return mean + sd * torch.randn(n, mean.numel(), generator=g, dtype=D64)


def test_streamed_stats_equal_the_moments_of_all_rows():
    """Batches of any size give the mean and unbiased covariance of the concatenation, also with
    a large offset (sums are taken around the first batch's mean)."""
    x = _gaussian(1000, torch.tensor([1e6, -3.0, 0.5]), torch.tensor([1.0, 2.0, 0.1]), 0)
    batches = [(x[i : i + 97], torch.zeros(97)) for i in range(0, 1000, 97)]  # loader-style
    mu, sigma, n = feature_stats(IdentityFeatures(), batches)
    mu_ref, sigma_ref = feature_moments(x)
    assert n == 1000
    assert torch.allclose(mu, mu_ref, rtol=0, atol=1e-9)
    assert torch.allclose(sigma, sigma_ref, rtol=1e-9, atol=1e-9)
    mu5, sigma5, n5 = feature_stats(IdentityFeatures(), batches, max_n=150)
    assert n5 == 150 and torch.allclose(mu5, x[:150].mean(0), atol=1e-9)
    assert torch.allclose(sigma5, feature_moments(x[:150])[1], atol=1e-9)
    with pytest.raises(ValueError, match="at least 2 rows"):
        feature_stats(IdentityFeatures(), [x[:1]])


def test_stats_file_round_trip_and_foreign_files(tmp_path):
    x = _gaussian(50, torch.zeros(4), torch.ones(4), 1)
    stats = feature_stats(IdentityFeatures(), [x])
    path = save_stats(tmp_path / "sub" / "stats.npz", stats)
    with np.load(path) as data:
        assert {"mu", "sigma"} <= set(data) and data["sigma"].shape == (4, 4)
    back = load_stats(path)
    assert torch.equal(back.mu, stats.mu) and torch.equal(back.sigma, stats.sigma)
    assert back.n == 50
    # a file with only mu and sigma (ScoreFlow's cifar10_stats.npz layout) loads with n None
    foreign = tmp_path / "cifar10_stats.npz"
    np.savez(foreign, mu=np.zeros(3, np.float32), sigma=np.eye(3, dtype=np.float32))
    assert load_stats(foreign).n is None
    np.savez(tmp_path / "bad.npz", mean=np.zeros(3))
    with pytest.raises(ValueError, match="need 'mu' and 'sigma'"):
        load_stats(tmp_path / "bad.npz")
    with pytest.raises(FileNotFoundError, match="sdelab stats"):
        load_stats(tmp_path / "none.npz")


def test_evaluate_quality_matches_closed_forms_on_gaussians():
    """Identity features of N(0, I) and N(m, s² I) samples: FD → ‖m‖² + D (1 − s)², sliced
    W2 → √(‖m‖²/D + (1 − s)²); against statistics of the reference FD is the same number."""
    d, m, s = 3, torch.tensor([1.0, 0.0, 1.0], dtype=D64), 1.5
    ref = _gaussian(8000, torch.zeros(d, dtype=D64), torch.ones(d, dtype=D64), 2)
    x = _gaussian(8000, m, torch.full((d,), s, dtype=D64), 3)
    g = torch.Generator().manual_seed(0)
    r = evaluate_quality(x, ref, "fd,sw2", num_projections=200, generator=g)
    assert r.fd == pytest.approx(float(m @ m) + d * (1 - s) ** 2, abs=0.25)  # ~4 sd
    assert r.sliced_w2 == pytest.approx(math.sqrt(float(m @ m) / d + (1 - s) ** 2), rel=0.05)
    assert r.kid is None and set(r.as_dict()) == {"n_samples", "n_reference", "fd", "sliced_w2"}
    r_stats = evaluate_quality(x, feature_stats(IdentityFeatures(), [ref]), ["fd"])
    assert r_stats.fd == pytest.approx(r.fd, rel=1e-9) and r_stats.n_reference == 8000


def test_evaluate_quality_of_a_set_against_itself_and_far_away():
    ref = _gaussian(300, torch.zeros(2, dtype=D64), torch.ones(2, dtype=D64), 4)
    same = evaluate_quality(ref, ref, ("fd", "pr"))
    assert same.fd == pytest.approx(0, abs=1e-9) and (same.precision, same.recall) == (1.0, 1.0)
    # an independent draw of the same law: the unbiased estimates scatter around 0 (a sd of
    # one subset bounds the mean of overlapping subsets)
    other = _gaussian(300, torch.zeros(2, dtype=D64), torch.ones(2, dtype=D64), 5)
    g = torch.Generator().manual_seed(1)
    eq = evaluate_quality(other, ref, ("kid", "energy", "mmd"), kid_subset_size=100, generator=g)
    assert abs(eq.kid) < 4 * eq.kid_sd and abs(eq.energy) < 0.05 and abs(eq.mmd2) < 0.02
    far = evaluate_quality(
        ref + 50, ref, ("kid", "pr", "energy", "mmd"), kid_subset_size=100, generator=g
    )
    assert (far.precision, far.recall) == (0.0, 0.0)
    # energy distance of a shift δ ≫ spread: 2 E‖X − Y‖ − 2 E‖X − X'‖ → 2 (δ √2 − E‖X − X'‖)
    assert far.energy == pytest.approx(2 * 50 * math.sqrt(2) - 2 * math.sqrt(math.pi), rel=0.02)
    assert far.kid > 10 * far.kid_sd > 0 and far.mmd2 > 0


def test_evaluate_quality_errors_name_the_fix():
    x = torch.randn(20, 3, generator=torch.Generator().manual_seed(5))
    with pytest.raises(ValueError, match="choose from fd, kid, is, pr, energy, mmd, sw2"):
        evaluate_quality(x, x, ("fd", "fid"))
    with pytest.raises(ValueError, match="'is' needs class probabilities"):
        evaluate_quality(x, x)  # the default metrics include the Inception score
    stats = feature_stats(IdentityFeatures(), [x])
    with pytest.raises(ValueError, match="need reference features"):
        evaluate_quality(x, stats, ("fd", "kid"))
    with pytest.raises(ValueError, match="rows of class probabilities"):
        evaluate_quality(x, x, ["is"], sample_probs=torch.full((5, 2), 0.5))
    with pytest.raises(ValueError, match="same feature extractor"):
        evaluate_quality(x, x[:, :2], ("fd",))
    with pytest.raises(ValueError, match="NaN"):
        evaluate_quality(x.masked_fill(x > 1, float("nan")), x, ("fd",))
    with pytest.raises(ValueError, match="gives no class probabilities"):
        collect_features(IdentityFeatures(), [x], probs=True)
    assert set(METRICS) == {"fd", "kid", "is", "pr", "energy", "mmd", "sw2"}
    assert check_metrics(" fd, kid ") == ("fd", "kid")
    with pytest.raises(ValueError, match="none given"):
        check_metrics("")


@pytest.mark.parametrize(
    "net, x",
    [
        (ConvClassifier(1, 10, channels=8, image_shape=(1, 8, 8)), torch.rand(12, 1, 8, 8)),
        (TimeClassifier(2, 8, width=16, depth=2), torch.randn(12, 2)),
    ],
)
def test_classifier_features_are_what_the_head_reads(net, x):
    torch.manual_seed(0)
    t = torch.full((x.shape[0],), 1e-3)
    with torch.no_grad():
        h = net.features(x, t)
        assert torch.allclose(net.classify(h), net(x, t))
    extractor = ClassifierFeatures(net, t=1e-3)
    feats = collect_features(extractor, [x[:5], x[5:]], probs=True, max_n=10)
    assert feats.features.shape == (10, h.shape[1]) and feats.probs.shape == (10, net.num_classes)
    assert torch.allclose(feats.features, h[:10].double(), atol=1e-6)
    assert torch.allclose(feats.probs.sum(1), torch.ones(10, dtype=D64))
    r = evaluate_quality(feats, collect_features(extractor, [x]), ("fd", "is"), is_splits=2)
    assert 1.0 <= r.inception_score <= net.num_classes and r.fd >= 0


def test_conv_classifier_takes_flat_images():
    net = ConvClassifier(1, 3, channels=4, image_shape=(1, 8, 8))
    x, t = torch.rand(2, 1, 8, 8), torch.zeros(2)
    assert torch.equal(net.features(x.reshape(2, -1), t), net.features(x, t))
    assert net.features(x, t).shape == (2, 8)


def test_inception_features_of_model_space_images():
    """Random-init FID Inception on [−1, 1] model-space images: 2048 features, 1008 probs; the
    extractor maps y back to x = (y + 1)/2 ∈ [0, 1]."""
    torch.manual_seed(0)
    net = FIDInceptionV3()
    y = torch.rand(2, 3 * 8 * 8) * 2 - 1
    extractor = InceptionFeatures(net, image_shape=(3, 8, 8))
    f, p = extractor.features_and_probs(y)
    assert f.shape == (2, 2048) and p.shape == (2, 1008)
    with torch.no_grad():
        direct = net((y.reshape(2, 3, 8, 8) + 1) / 2)
    assert torch.allclose(f, direct) and torch.allclose(p.sum(1), torch.ones(2))
