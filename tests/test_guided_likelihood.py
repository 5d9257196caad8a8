"""The likelihood of guided models: the probability-flow ODE of a guided score is a flow from the
prior, so it defines a density, and ``log_likelihood`` computes it on ``controllable``'s guided
score functions (classifier guidance differentiates the classifier inside the score: its
gradient must stay in the graph for the ODE's divergence).

Oracle: the two-component Gaussian mixture of ``sdelab.oracle`` with its exact classifier.
"""

from __future__ import annotations

import pytest
import torch
from scipy.stats import chi2

from sdelab.controllable import cfg_score_fn, guided_score_fn
from sdelab.likelihood import log_likelihood
from sdelab.likelihood.options import Augmented
from sdelab.oracle import GaussianData, mixture_classifier, mixture_score_fn
from sdelab.samplers import sample
from sdelab.sde import VPSchedule

MEANS = torch.tensor([[-1.5, 0.0], [1.5, 0.0]])
STD = 0.5
SCALE = 2.0  # guidance beyond the conditional: a density no diffusion of data has
H = 0.375  # grid spacing; the grid covers [-4.5, 4.5] × [-3, 3] (density < 1e-10 at the edge)
XS, YS = torch.arange(-12, 13) * H, torch.arange(-8, 9) * H


def guided(scale: float = SCALE):
    sde = VPSchedule()
    score = mixture_score_fn(MEANS, STD, sde)
    return guided_score_fn(score, mixture_classifier(MEANS, STD, sde), 0, scale), sde


@pytest.fixture(scope="module")
def grid_density():
    """exp(log p) of the guided ODE on the grid (tol 1e-2 nats per point), shaped (nx, ny)."""
    score, sde = guided()
    X, Y = torch.meshgrid(XS, YS, indexing="ij")
    pts = torch.stack([X.flatten(), Y.flatten()], 1)
    with torch.no_grad():
        res = log_likelihood(score, sde, pts, tol=1e-2, integrator=Augmented(check=False))
    return res.logp.exp().reshape(len(XS), len(YS))


def test_guided_density_integrates_to_one(grid_density):
    """∫ exp(log p) = 1 by the trapezoid rule on the grid. Tolerance 1e-2: the points' 1e-2
    nats plus the rule's error on this grid (measured 3e-3; 4e-5 at spacing 0.2). Without the
    classifier's second derivatives in the divergence the integral is 0.52."""
    total = torch.trapezoid(torch.trapezoid(grid_density, YS, dim=1), XS)
    assert abs(float(total) - 1.0) < 1e-2
    edge = torch.cat([grid_density[0], grid_density[-1], grid_density[:, 0], grid_density[:, -1]])
    assert float(edge.max()) < 1e-6  # the grid holds the mass


def _cell_probabilities(density: torch.Tensor, x_edges, y_edges) -> torch.Tensor:
    """Trapezoid mass of each grid-aligned cell, ``(len(x_edges) − 1, len(y_edges) − 1)``."""
    out = torch.zeros(len(x_edges) - 1, len(y_edges) - 1, dtype=density.dtype)
    for i in range(len(x_edges) - 1):
        xi = (XS >= x_edges[i] - 1e-9) & (XS <= x_edges[i + 1] + 1e-9)
        for j in range(len(y_edges) - 1):
            yj = (YS >= y_edges[j] - 1e-9) & (YS <= y_edges[j + 1] + 1e-9)
            block = density[xi][:, yj]
            out[i, j] = torch.trapezoid(torch.trapezoid(block, YS[yj], dim=1), XS[xi])
    return out


def test_guided_density_matches_the_guided_odes_samples(grid_density):
    """A histogram of 400 samples of the guided ODE (dopri5, the same score) against the cells'
    mass under exp(log p): Pearson's χ² below its 0.999 quantile (a false alarm 1 time in
    1000; the seed is fixed)."""
    score, sde = guided()
    n = 400
    res = sample(score, sde, (n, 2), sampler="ode", method="dopri5", rtol=1e-5, atol=1e-5,
                 generator=0)  # fmt: skip
    x_edges = [-4.5, -2.25, -1.875, -1.5, 4.5]
    y_edges = [-3.0, -0.375, 0.375, 3.0]
    prob = _cell_probabilities(grid_density, x_edges, y_edges).flatten()
    prob = prob / prob.sum()  # the grid's 3e-3 of rule error, not the test's business
    bins = [torch.tensor(e, dtype=torch.float64) for e in (x_edges, y_edges)]
    counts = torch.histogramdd(res.samples.double(), bins=bins).hist.flatten()
    assert int(counts.sum()) == n  # every sample inside the grid
    expected = n * prob.double()
    assert float(expected.min()) >= 5  # χ² regime
    stat = float(((counts - expected) ** 2 / expected).sum())
    assert stat < chi2.ppf(0.999, len(prob) - 1), (stat, counts, expected)


def test_classifier_guidance_of_scale_one_is_the_class_density():
    """Scale 1 with the exact classifier is the exact score of component 0, N(μ₀, s² I): its ODE
    density is the oracle's closed form (prior mismatch included)."""
    score, sde = guided(1.0)
    component = GaussianData(MEANS[0].double(), torch.full((2,), STD**2, dtype=torch.float64))
    x = component.sample(6, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        res = log_likelihood(score, sde, x, tol=1e-3)
    exact = component.ode_log_prob(x, sde)
    assert bool(((res.logp - exact).abs() <= res.error + 1e-3).all()), (res.logp - exact, res.error)


def test_classifier_free_guidance_gives_the_same_density():
    """On the oracle s(x, t, y) − s(x, t, ∅) = ∇ log p_t(y | x) exactly, so classifier-free
    guidance of scale S is classifier guidance of scale S: the same ODE, the same density."""
    sde = VPSchedule()
    mixture = mixture_score_fn(MEANS, STD, sde)
    components = [
        mixture_score_fn(MEANS[k : k + 1], STD, sde) for k in range(len(MEANS))
    ]  # one-component "mixtures": each class's exact score

    def model(x, t, labels):  # label K = 2 is the null class
        out = mixture(x, t)
        for k, comp in enumerate(components):
            out = torch.where((labels == k)[:, None], comp(x, t), out)
        return out

    cfg = cfg_score_fn(model, 0, SCALE, num_classes=2)
    clf, _ = guided(SCALE)
    x = torch.tensor([[-1.5, 0.0], [-2.0, 0.7], [-0.5, -0.4], [0.3, 0.2]], dtype=torch.float64)
    with torch.no_grad():
        a = log_likelihood(cfg, sde, x, tol=1e-3)
        b = log_likelihood(clf, sde, x, tol=1e-3)
    assert bool(((a.logp - b.logp).abs() <= a.error + b.error).all()), a.logp - b.logp
