"""Bits/dim and data-set likelihood (sdelab.likelihood.bpd): the accounting of known densities,
the Gaussian oracle within the reported error bars, the standard error split by source, the
solver-bias bound of the fixed-grid default, and the option objects."""

from __future__ import annotations

import json
import math

import pytest
import torch

from sdelab.likelihood.bpd import (
    ELBO,
    ODE,
    Dequantization,
    Levels,
    ScoreFlow,
    bits_per_dim,
    evaluate_likelihood,
    evaluate_sharded,
)
from sdelab.likelihood.dequantization import dequantize
from sdelab.likelihood.options import Exact, Hutchinson, Randomized, default_policy
from sdelab.oracle import GaussianData
from sdelab.sde import VPSchedule
from sdelab.train.evalstore import EvalStore

D64 = torch.float64


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def aniso(d: int, lo: float = 0.05, hi: float = 2.0) -> GaussianData:
    evals = torch.exp(torch.linspace(math.log(lo), math.log(hi), d, dtype=D64))
    return GaussianData(torch.zeros(d, dtype=D64), evals)


def test_bits_per_dim_of_a_known_density_is_the_closed_form_accounting():
    """A Gaussian log-density on 7 levels mapped to [−1, 1]: bits/dim is
    (−log p(y) + D log(L/a)) / (D log 2) at the dequantized points (the same draws)."""
    data = GaussianData(torch.tensor([0.2, -0.1, 0.0], dtype=D64), torch.full((3,), 0.4, dtype=D64))
    k = torch.randint(0, 7, (50, 3), generator=gen(0)).to(D64)
    res = bits_per_dim(data.log_prob, k, Levels(7, 2.0, -1.0), generator=gen(1))
    y = dequantize(k, 7, 2.0, -1.0, generator=gen(1), dtype=D64).y
    expect = (-data.log_prob(y) + 3 * math.log(7 / 2.0)) / (3 * math.log(2))
    torch.testing.assert_close(res.bpd, expect)
    torch.testing.assert_close(res.nll, expect * 3 * math.log(2))
    assert res.policy["tag"] == "density" and res.nfe == 0


def test_continuous_evaluation_matches_the_oracle_within_its_error_bars():
    """Default policy on 2-D data (exact trace, augmented solve, tol 1e-2): every example
    within its reported error (≥ 90 %), the mean within the bias bound, and the SE is all
    images (no probes, no dequantization)."""
    data = aniso(2, 0.1, 1.0)
    sde = VPSchedule()
    x = data.sample(40, generator=gen(0))
    x[:3] *= 4.0  # far-tail points
    res = evaluate_likelihood(
        data.score_fn(sde), sde, [x[:16], (x[16:], torch.zeros(24))], progress=False
    )
    truth = -data.marginal_log_prob(x, sde.t_min, sde)
    assert res.policy["tag"] == default_policy(2).tag and res.estimator == "ode"
    assert res.nll.shape == res.error.shape == (40,) and res.dequantization == "none"
    err = (res.nll - truth).abs()
    assert float((err <= res.error).double().mean()) >= 0.9
    assert abs(float(res.nll.mean() - truth.mean())) <= res.bias_bound
    assert res.nll_se == pytest.approx(float(res.nll.std()) / math.sqrt(40))
    assert res.se_probes == 0 and res.se_dequantization == 0
    assert res.se_images == pytest.approx(res.nll_se)
    torch.testing.assert_close(res.bpd, res.nll / (2 * math.log(2)))
    assert res.bias_bound_bpd == pytest.approx(res.bias_bound / (2 * math.log(2)))
    text = str(res)
    assert "bits/dim" in text and res.tag in text and "solver bias ≤" in text


def test_discrete_repeats_equal_the_closed_form_and_the_se_split_adds_up():
    """Integer data with 4 dequantization repeats: the ODE (exact trace) gives the closed-form
    density's bits/dim of the same draws within each example's error; with exact traces all
    repeat noise is dequantization, and se² = se_images² + se_repeats² (unclipped)."""
    data = GaussianData(torch.zeros(2, dtype=D64), torch.tensor([0.1, 0.3], dtype=D64))
    sde = VPSchedule(t_min=1e-3)
    k = torch.randint(0, 4, (16, 2), generator=gen(3)).to(D64)
    levels, deq = Levels(4, 2.0, -1.0), Dequantization(n_repeats=4)
    res = evaluate_likelihood(
        data.score_fn(sde),
        sde,
        [k],  # one batch: the same dequantization draws as one bits_per_dim call
        estimator=ODE(tol=1e-3, divergence=Exact()),
        levels=levels,
        dequantization=deq,
        generator=gen(5),
        progress=False,
    )
    closed = bits_per_dim(
        lambda y: data.ode_log_prob(y, sde),  # the exact density of the ODE model
        k,
        levels,
        dequantization=deq,
        generator=gen(5),
    )
    assert res.per_repeat.shape == (4, 16) and res.dequantization == "uniform"
    assert bool(((res.nll - closed.nll).abs() <= res.error + 1e-9).all())
    assert res.se_probes == 0 and res.se_repeats > 0
    assert res.se_dequantization == pytest.approx(res.se_repeats)
    if res.se_images > 0:
        assert res.nll_se**2 == pytest.approx(res.se_images**2 + res.se_repeats**2)
    assert res.bias_bound == pytest.approx(float(res.error.mean()))


def test_bound_estimates_split_their_noise_into_probes_and_dequantization():
    """ELBO on integer data with 3 repeats: the bound's Monte-Carlo SE is the probe part, the
    rest of the within-example noise is dequantization (se_rep² = se_probes² + se_deq²), and
    an unbiased estimate has no solver bias."""
    data = GaussianData(torch.zeros(4, dtype=D64), torch.full((4,), 0.3, dtype=D64))
    sde = VPSchedule()
    k = torch.randint(0, 8, (30, 4), generator=gen(0)).to(D64)
    res = evaluate_likelihood(
        data.score_fn(sde),
        sde,
        [k],
        estimator=ELBO(n_samples=4),
        levels=Levels(8, 2.0, -1.0),
        dequantization=Dequantization(n_repeats=3),
        generator=gen(1),
        progress=False,
    )
    assert res.estimator == "elbo" and res.policy == ELBO(n_samples=4).record()
    assert res.se_probes > 0 and res.bias_bound == 0 and bool(res.error.isnan().all())
    if res.se_dequantization > 0:
        assert res.se_repeats**2 == pytest.approx(res.se_probes**2 + res.se_dequantization**2)
    if res.se_images > 0:
        assert res.nll_se**2 == pytest.approx(res.se_images**2 + res.se_repeats**2)


@pytest.mark.parametrize("steps", [None, 16])
def test_randomized_bias_bound_covers_the_true_bias(steps):
    """D = 128 (the default picks the randomized rule on DPM-Solver++(3M)): the mean's true
    error against the exact density lies within bias_bound + 3 SE of the estimator's noise;
    at 16 steps the bias is far above the noise and the bound is tight (≤ 1.5× the truth)."""
    data = aniso(128)
    sde = VPSchedule()
    x = data.sample(64, generator=gen(1))
    est = None if steps is None else ODE(integrator=Randomized(steps=steps))
    res = evaluate_likelihood(
        data.score_fn(sde), sde, [x[:40], x[40:]], estimator=est, generator=gen(0), progress=False
    )
    if steps is None:
        assert res.tag == default_policy(128).tag == "randomized32_dpm3m64_hutchinson1"
    truth = -data.marginal_log_prob(x, sde.t_min, sde)
    bias = abs(float((res.nll - truth).mean()))
    assert bias <= res.bias_bound + 3 * res.se_probes
    assert res.bias_bound == res.grid_check > 0 and math.isfinite(res.se_images)
    if steps is not None:
        assert bias > 10 * res.se_probes and res.bias_bound <= 1.5 * bias
    else:
        assert res.bias_bound_bpd < 1e-3


def test_sharded_evaluation_without_a_group_does_every_batch_and_resumes_exactly(tmp_path):
    """No group: this process evaluates every batch (even if a process group existed); a
    resumed evaluation from stored batches gives the same per-example values, error bars and
    bias bound (the grid check is stored with batch 0)."""
    data = aniso(128)
    sde = VPSchedule()
    x = data.sample(24, generator=gen(2))
    store = EvalStore(tmp_path / "store", {"test": 1}, resume=False)
    store.open()
    seen = []

    def keep(i, r):
        seen.append(i)
        store.put(i, r)

    kw = dict(batch_size=10, seed=3)
    first = evaluate_sharded(data.score_fn(sde), sde, x, on_batch=keep, **kw)
    assert seen == [0, 1, 2] and first.nll.shape == (24,)
    again = evaluate_sharded(data.score_fn(sde), sde, x, cached=store.get, **kw)
    torch.testing.assert_close(again.nll, first.nll)
    assert again.bias_bound == first.bias_bound and again.tag == first.tag
    assert again.se_probes == pytest.approx(first.se_probes) and again.dim == 128
    store.close()


def test_option_objects_refuse_bad_input_in_one_line():
    sde = VPSchedule()
    x = torch.zeros(2, 2, dtype=D64)
    sf = GaussianData(torch.zeros(2, dtype=D64), torch.ones(2, dtype=D64)).score_fn(sde)
    cases = [
        (lambda: ODE(tol=-1.0), "tol must be a positive number"),
        (lambda: ODE(integrator="randomized"), "integrator must be Augmented"),
        (lambda: ODE(divergence="exact"), "divergence must be Exact"),
        (lambda: ELBO(n_samples=1), "n_samples must be an integer >= 2"),
        (lambda: ELBO(time_sampling="log"), "uniform, importance"),
        (lambda: ScoreFlow(n_samples=True), "n_samples"),
        (lambda: evaluate_likelihood(sf, sde, [x], estimator="ode"), "estimator must be ODE()"),
        (lambda: evaluate_likelihood(sf, sde, [], progress=False), "empty"),
        (
            lambda: evaluate_likelihood(sf, sde, [x], dequantization=Dequantization()),
            "pass levels=Levels",
        ),
        (lambda: evaluate_sharded(sf, sde, x, batch_size=0), "batch_size"),
    ]
    for make, match in cases:
        with pytest.raises(ValueError, match=match) as err:
            make()
        assert "\n" not in str(err.value)
    assert ODE().tag == "ode"
    assert ODE(tol=0.1, divergence=Hutchinson(2)).tag == "ode_hutchinson2_tol0.1"
    for obj in (ODE(integrator=Randomized()), ELBO(), ScoreFlow(), Levels(256, 2, -1)):
        assert json.loads(json.dumps(obj.record()))["tag"] == obj.tag
