"""Controllable generation against closed forms: Gaussian conditionals, the exact classifier of
the 8gaussians mixture, the decoupling matrix of colorization."""

from __future__ import annotations

import math

import pytest
import torch

from sdelab.controllable import (
    DECOUPLE,
    cfg_score,
    colorize,
    couple,
    decouple,
    guided_score_fn,
    inpaint,
    inpainting_constraint,
)
from sdelab.data import make_dataset
from sdelab.data.toys import eight_gaussians_mixture
from sdelab.nets.classifier import ConvClassifier, TimeClassifier
from sdelab.oracle import GaussianData, mixture_classifier, mixture_score_fn
from sdelab.samplers import sample
from sdelab.sde import VESchedule, VPSchedule
from sdelab.train.classifier import fit_classifier

F64 = torch.float64

# a correlated 4-D Gaussian; coordinates 0, 1 observed, 2, 3 inpainted
COV = torch.tensor(
    [[1.0, 0.6, 0.3, -0.2], [0.6, 1.2, 0.4, 0.1], [0.3, 0.4, 0.9, 0.5], [-0.2, 0.1, 0.5, 1.1]],
    dtype=F64,
)
MEAN = torch.tensor([0.5, -1.0, 0.3, 1.0], dtype=F64)
KNOWN, UNKNOWN = [0, 1], [2, 3]
Y_KNOWN = torch.tensor([1.5, -0.2], dtype=F64)


def _conditional() -> tuple[torch.Tensor, torch.Tensor]:
    """Closed form: μ_u + Σ_uk Σ_kk⁻¹ (y − μ_k), Σ_uu − Σ_uk Σ_kk⁻¹ Σ_ku."""
    skk = COV[KNOWN][:, KNOWN]
    suk = COV[UNKNOWN][:, KNOWN]
    mean = MEAN[UNKNOWN] + suk @ torch.linalg.solve(skk, Y_KNOWN - MEAN[KNOWN])
    cov = COV[UNKNOWN][:, UNKNOWN] - suk @ torch.linalg.solve(skk, suk.T)
    return mean, cov


def _observation(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    y = torch.zeros(n, 4, dtype=F64)
    y[:, KNOWN] = Y_KNOWN
    mask = torch.zeros(4, dtype=F64)
    mask[KNOWN] = 1
    return y, mask


@pytest.mark.parametrize("schedule", [VPSchedule(), VESchedule()], ids=["vp", "ve"])
def test_inpainting_matches_gaussian_conditional(schedule):
    """PC (reverse diffusion + 1 Langevin corrector, 500 steps) with the exact score.

    Why it works: near t_min the known block is y up to σ_t jitter, and the corrector keeps the
    unknown block close to p_t(x_u | x_k) → p_0(x_u | y). Tolerances: mean within 4 standard
    errors (SE = √(diag Σ_cond / n)); covariance within 0.1 absolute (~13 % of the smallest
    conditional variance, 0.75). The covariance error is dominated by a bias, not by noise
    (SE of an entry ≈ 0.02): with finite corrector steps the unknown block remembers earlier
    jitter of the known block and the Langevin step adds its own O(ε) inflation; over 4 seeds
    we measured variance excesses up to +0.044 with 1 corrector (up to +0.09 with 2).
    Without correctors (Euler–Maruyama, probability-flow ODE) the mean is off by 3-13 SE.
    """
    n = 4000
    data = GaussianData(MEAN, COV)
    y, mask = _observation(n)
    res = inpaint(data.score_fn(schedule), schedule, y, mask, steps=500, generator=0)
    cond_mean, cond_cov = _conditional()
    s = res.samples[:, UNKNOWN]
    se = (cond_cov.diagonal() / n).sqrt()
    assert torch.all((s.mean(0) - cond_mean).abs() < 4 * se), (s.mean(0), cond_mean)
    assert torch.allclose(torch.cov(s.T), cond_cov, atol=0.1), (torch.cov(s.T), cond_cov)
    assert torch.equal(res.samples[:, KNOWN], y[:, KNOWN])  # the observation is kept exactly
    assert res.nfe == 1000


@pytest.mark.parametrize(
    "sampler,options",
    [("lambda", {"lam": 0.5}), ("ode", {"method": "rk4"}), ("dpm_solver", {})],
)
def test_inpainting_runs_with_every_stepping_sampler(sampler, options):
    data = GaussianData(MEAN, COV)
    schedule = VPSchedule()
    y, mask = _observation(64)
    res = inpaint(
        data.score_fn(schedule),
        schedule,
        y,
        mask,
        sampler=sampler,
        steps=20,
        generator=0,
        **options,
    )
    assert torch.isfinite(res.samples).all()
    assert torch.equal(res.samples[:, KNOWN], y[:, KNOWN])


def test_inpainting_is_reproducible_and_starts_from_the_prior():
    """Same seed, same samples; the unknown region does not depend on y's unknown values."""
    data = GaussianData(MEAN, COV)
    schedule = VPSchedule()
    y, mask = _observation(32)
    kwargs = dict(steps=10, generator=3)
    a = inpaint(data.score_fn(schedule), schedule, y, mask, **kwargs).samples
    b = inpaint(data.score_fn(schedule), schedule, y, mask, **kwargs).samples
    assert torch.equal(a, b)
    y2 = y.clone()
    y2[:, UNKNOWN] = 100.0  # garbage in the unknown region must be ignored
    c = inpaint(data.score_fn(schedule), schedule, y2, mask, **kwargs).samples
    assert torch.equal(a, c)


def test_constraint_diffuses_the_observation():
    """x_known_t = α_t y + σ_t ε with fresh ε: mean α_t y and std σ_t over many calls."""
    schedule = VPSchedule()
    y, mask = _observation(20000)
    c = inpainting_constraint(schedule, y, mask, generator=torch.Generator().manual_seed(0))
    t = torch.full((20000,), 0.5, dtype=F64)
    x = c(torch.zeros_like(y), t)
    alpha, sigma = schedule.alpha_sigma(torch.tensor(0.5, dtype=F64))
    assert torch.allclose(x[:, KNOWN].mean(0), alpha * Y_KNOWN, atol=4 * sigma / 140)
    assert torch.allclose(x[:, KNOWN].std(0), sigma.expand(2), rtol=0.03)
    assert torch.equal(x[:, UNKNOWN], torch.zeros(20000, 2, dtype=F64))


def test_bad_mask_is_a_value_error():
    data = GaussianData(MEAN, COV)
    schedule = VPSchedule()
    y, _ = _observation(8)
    with pytest.raises(ValueError, match="mask has shape"):
        inpaint(data.score_fn(schedule), schedule, y, torch.ones(3), steps=2)
    with pytest.raises(ValueError, match="only 0"):
        inpaint(data.score_fn(schedule), schedule, y, torch.full((4,), 0.5), steps=2)


# ---- colorization --------------------------------------------------------------------------
def test_decoupling_matrix_is_orthogonal_with_gray_first_row():
    assert torch.allclose(DECOUPLE @ DECOUPLE.T, torch.eye(3, dtype=F64), atol=1e-12)
    assert torch.allclose(DECOUPLE[0], torch.full((3,), 1 / math.sqrt(3), dtype=F64))
    x = torch.randn(5, 3, 4, 4, dtype=F64)
    assert torch.allclose(couple(decouple(x)), x, atol=1e-12)
    assert torch.allclose(decouple(x)[:, 0], math.sqrt(3) * x.mean(1), atol=1e-12)


def test_colorization_keeps_the_gray_channel():
    """An exact Gaussian score on 3×2×2 'images'; the output's channel mean is the input."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(12, 12, generator=g, dtype=F64)
    data = GaussianData(torch.zeros(12, dtype=F64), a @ a.T / 12 + 0.3 * torch.eye(12, dtype=F64))
    schedule = VPSchedule()
    score = data.score_fn(schedule)
    gray = torch.rand(16, 1, 2, 2, generator=g, dtype=F64) * 2 - 1
    res = colorize(score, schedule, gray, steps=50, generator=1)
    assert res.samples.shape == (16, 3, 2, 2)
    assert torch.allclose(res.samples.mean(1, keepdim=True), gray, atol=1e-12)
    assert res.samples.std() > 0.1  # the chroma channels were generated, not zero
    rgb = torch.randn(4, 3, 2, 2, generator=g, dtype=F64)  # an RGB input: its gray is kept
    out = colorize(score, schedule, rgb, steps=5, generator=1).samples
    assert torch.allclose(out.mean(1), rgb.mean(1), atol=1e-12)
    with pytest.raises(ValueError, match="gray must have shape"):
        colorize(score, schedule, torch.zeros(4, 2, 2, 2, dtype=F64), steps=2)


# ---- class-conditional ---------------------------------------------------------------------
def test_mixture_classifier_and_score_are_exact():
    """At t_min the classifier is the data posterior; the score is the autograd gradient of the
    diffused mixture's log-density, and p_t(k | x) sums to 1."""
    means, std = eight_gaussians_mixture()
    assert means.shape == (8, 2) and math.isclose(std, 0.5 / 1.414)
    schedule = VPSchedule()
    clf = mixture_classifier(means, std, schedule)
    score = mixture_score_fn(means, std, schedule)
    x = torch.randn(64, 2) * 3
    t = torch.rand(64) * 0.9 + 0.05
    logp = clf(x, t)
    assert torch.allclose(logp.exp().sum(1), torch.ones(64), atol=1e-5)

    def log_density(x):
        alpha, sigma = schedule.alpha_sigma(t)
        var = (alpha**2 * std**2 + sigma**2)[:, None]
        sq = ((x[:, None] - alpha[:, None, None] * means) ** 2).sum(-1)
        return torch.logsumexp(-0.5 * sq / var - torch.log(2 * math.pi * var), 1).sum()

    xg = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(log_density(xg), xg)
    assert torch.allclose(score(x, t), grad, atol=1e-4)


def _nearest(x, means):
    return torch.cdist(x, means).argmin(1)


@pytest.mark.parametrize("label", [0, 3])
def test_class_conditional_sampling_on_8gaussians(label):
    """With the exact classifier and scale 1, s + ∇ log p_t(k | x) is the score of component k
    alone, so ≥ 95 % of samples must land nearest mean k (ideal: 99.8 %, two-sided 3.06 σ)."""
    means, std = eight_gaussians_mixture()
    schedule = VPSchedule()
    score = guided_score_fn(
        mixture_score_fn(means, std, schedule),
        mixture_classifier(means, std, schedule),
        label,
        scale=1.0,
        num_classes=8,
    )
    res = sample(score, schedule, (1000, 2), sampler="euler_maruyama", steps=200, generator=0)
    frac = (_nearest(res.samples, means) == label).float().mean()
    assert frac >= 0.95, frac
    unguided = sample(
        mixture_score_fn(means, std, schedule),
        schedule,
        (1000, 2),
        sampler="euler_maruyama",
        steps=200,
        generator=0,
    ).samples
    assert (_nearest(unguided, means) == label).float().mean() < 0.25  # ~1/8 without guidance


def test_cfg_equals_classifier_guidance_with_scale_one_plus_w():
    """s_cond − s_uncond = ∇ log p_t(y | x), so cfg(w) = classifier guidance with 1 + w."""
    means, std = eight_gaussians_mixture()
    schedule = VPSchedule()
    uncond = mixture_score_fn(means, std, schedule)
    cond = mixture_score_fn(means[2:3], std, schedule)  # component 2 alone
    clf = mixture_classifier(means, std, schedule)
    x, t = torch.randn(32, 2) * 2, torch.full((32,), 0.3)
    for w in (0.0, 1.0, 3.0):
        guided = guided_score_fn(uncond, clf, 2, scale=1 + w)(x, t)
        assert torch.allclose(cfg_score(cond(x, t), uncond(x, t), w), guided, atol=1e-4)


def test_class_index_out_of_range_is_a_value_error():
    means, std = eight_gaussians_mixture()
    schedule = VPSchedule()
    score, clf = mixture_score_fn(means, std, schedule), mixture_classifier(means, std, schedule)
    with pytest.raises(ValueError, match="class index 8 out of range"):
        guided_score_fn(score, clf, 8, num_classes=8)
    fn = guided_score_fn(score, clf, -1)
    with pytest.raises(ValueError, match="out of range"):
        fn(torch.zeros(4, 2), torch.full((4,), 0.5))


def test_trained_classifier_beats_chance_at_small_t():
    """A tiny MLP trained for 300 steps on noised 8gaussians: accuracy far above 1/8 at
    small t (the clean components overlap by ~0.2 %)."""
    torch.manual_seed(0)
    schedule = VPSchedule()
    net = TimeClassifier(2, 8, width=32, depth=2)
    losses = fit_classifier(
        net,
        make_dataset("8gaussians").sample_labeled,
        schedule,
        steps=300,
        batch_size=256,
        lr=3e-3,
    )
    assert losses[-1] < losses[0]
    g = torch.Generator().manual_seed(1)
    x0, labels = make_dataset("8gaussians").sample_labeled(2000, g)
    t = torch.full((2000,), 0.05)
    xt = schedule.perturb(x0, t, torch.randn(x0.shape, generator=g))
    with torch.no_grad():
        acc = (net(xt, t).argmax(1) == labels).float().mean()
    assert acc > 0.8, acc


def test_conv_classifier_shapes():
    net = ConvClassifier(1, 10, channels=8)
    assert net(torch.randn(3, 1, 8, 8), torch.rand(3)).shape == (3, 10)


def test_unlabeled_dataset_is_a_value_error():
    with pytest.raises(ValueError, match="no class labels"):
        make_dataset("swissroll").sample_labeled(4, torch.Generator())
