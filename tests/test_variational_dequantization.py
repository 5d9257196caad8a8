"""Variational dequantization: the flow is a density on (0, 1)^D, the bound holds where P(k) is
known exactly, and training q closes most of the gap that uniform dequantization leaves."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from sdelab.likelihood.bpd import Dequantization, Levels, bits_per_dim
from sdelab.likelihood.dequantization import dequantize, variational_dequantize
from sdelab.likelihood.dequantizer import dequantization_bound, train_dequantizer
from sdelab.nets.dequantizer import DEQUANTIZER_PRESETS, Dequantizer, DequantizerConfig
from sdelab.oracle import GaussianData
from sdelab.sde import VPSchedule

D64 = torch.float64
TINY = DequantizerConfig(
    couplings=4, filters=16, blocks=1, components=8, context_channels=8, context_blocks=1
)


def _perturbed(shape, levels, config=TINY, scale=0.3, seed=1) -> Dequantizer:
    """A dequantizer far from its near-identity start: every parameter gets noise."""
    flow = Dequantizer(shape, levels, config, seed=seed).to(D64)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=D64))
    return flow


def test_density_integrates_to_one_on_the_unit_square():
    """∫_{(0,1)²} q(u | k) du = 1 for a D = 2 image (1×1×2), by quadrature in logit coordinates
    u = sigmoid(v) (du = σ(v)(1 − σ(v)) dv), for several k."""
    flow = _perturbed((1, 1, 2), 5, scale=0.2)
    v = torch.linspace(-12, 12, 161, dtype=D64)
    dv = float(v[1] - v[0])
    vv = torch.cartesian_prod(v, v)  # (n², 2)
    u = torch.sigmoid(vv).reshape(-1, 1, 1, 2)
    log_jac = (torch.log(torch.sigmoid(vv)) + torch.log(torch.sigmoid(-vv))).sum(1)
    with torch.no_grad():
        for k_val in ([0, 4], [3, 1]):
            k = torch.tensor(k_val).reshape(1, 1, 1, 2).expand(len(u), 1, 1, 2)
            log_q = flow.log_prob(u, k)
            total = float(torch.exp(log_q + log_jac).sum()) * dv * dv
            assert abs(total - 1.0) < 1e-3, (k_val, total)  # quadrature error ≈ 2e-4


def test_inverse_and_log_determinant_match_autograd():
    """inverse(transform(ε)) = ε, and log q(u | k) = log N(ε) − log|det ∂u/∂ε| with the
    Jacobian from autograd (3 channels, so the 1×1 mixing is a real matrix)."""
    flow = _perturbed((3, 2, 4), 7, scale=0.1)
    g = torch.Generator().manual_seed(0)
    k = torch.randint(0, 7, (3, 3, 2, 4), generator=g)
    eps = torch.randn(k.shape, generator=g, dtype=D64)
    out = flow.transform(eps, k)
    assert ((out.u > 0) & (out.u < 1)).all()
    torch.testing.assert_close(flow.inverse(out.u, k), eps, atol=1e-7, rtol=0)
    for i in range(len(k)):
        jac = torch.autograd.functional.jacobian(
            lambda e, i=i: flow.transform(e.reshape(1, 3, 2, 4), k[i : i + 1]).u.reshape(-1),
            eps[i].reshape(-1),
        )
        log_base = -0.5 * float((eps[i] ** 2).sum()) - 12 * math.log(2 * math.pi)
        expected = log_base - torch.linalg.slogdet(jac)[1]
        torch.testing.assert_close(out.log_q[i], expected, atol=1e-8, rtol=1e-8)


# ---- a discretised Gaussian: P(k) is a product of CDF differences -----------------------------
L, A, B, S = 4, 2.0, -1.0, 0.35  # 4 levels on [−1, 1], data density N(0, 0.35²) per pixel
NORMAL = torch.distributions.Normal(torch.tensor(0.0, dtype=D64), torch.tensor(S, dtype=D64))
ALL_K = torch.cartesian_prod(torch.arange(L), torch.arange(L)).reshape(-1, 1, 1, 2)  # 16 images


def _logp(y):
    return NORMAL.log_prob(y).flatten(1).sum(1)


def _exact_nll(k):
    lo, hi = A * k / L + B, A * (k + 1) / L + B
    return -torch.log(NORMAL.cdf(hi) - NORMAL.cdf(lo)).flatten(1).sum(1)


def _mean_gap(estimates, k, repeats):
    """Per-image mean over ``repeats`` draws of (bound − (−log P(k))), and its SE."""
    gap = (estimates - _exact_nll(k)).reshape(repeats, -1)
    return gap.mean(0), gap.std(0) / math.sqrt(repeats)


def test_bound_is_above_the_exact_discrete_nll_for_any_q():
    """E_q[−log p_y(y) + log q(u|k)] − D log a + D log L ≥ −log P(k) for an untrained flow, a
    perturbed flow and uniform dequantization (each per image, within 4 SE)."""
    g = torch.Generator().manual_seed(0)
    rep = 400
    k = ALL_K.repeat(rep, 1, 1, 1)
    dq = dequantize(k, L, A, B, generator=g, dtype=D64)
    estimates = {"uniform": -_logp(dq.y) - dq.entropy}
    with torch.no_grad():
        for name, flow in {
            "untrained": Dequantizer((1, 1, 2), L, TINY).to(D64),
            "perturbed": _perturbed((1, 1, 2), L, scale=0.3),
        }.items():
            estimates[name] = dequantization_bound(_logp, None, k, L, A, B, flow, generator=g)
    for name, est in estimates.items():
        mean, se = _mean_gap(est, k, rep)
        assert (mean > -4 * se).all(), (name, mean, se)


def test_training_shrinks_the_gap_far_below_uniform():
    """Training q on the 16 images shrinks the gap KL(q(·|k) ‖ p(·|k)) from uniform's ≈ 0.39
    nats per image to below 0.06 nats (and below 20 % of uniform's); the gap stays ≥ 0.
    (Flow++'s flow has Gaussian tails in logit space, so it cannot reach a density that is
    non-zero at the bin edges exactly: a small floor, ≈ 0.03 nats here, remains.)"""
    g = torch.Generator().manual_seed(0)
    flow = Dequantizer((1, 1, 2), L, TINY, seed=0).to(D64)
    steps = 300
    opt = torch.optim.Adam(flow.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    result = train_dequantizer(
        _logp,
        None,
        [ALL_K.repeat(8, 1, 1, 1)],
        flow,
        steps,
        levels=L,
        scale=A,
        shift=B,
        optimizer=opt,
        generator=g,
        callback=lambda *_: sched.step(),
    )
    assert result.steps == steps and len(result.losses_bpd) == steps
    rep = 400
    k = ALL_K.repeat(rep, 1, 1, 1)
    dq = dequantize(k, L, A, B, generator=g, dtype=D64)
    uniform_gap = float(_mean_gap(-_logp(dq.y) - dq.entropy, k, rep)[0].mean())
    with torch.no_grad():
        trained = dequantization_bound(_logp, None, k, L, A, B, flow, generator=g)
    gap, se = _mean_gap(trained, k, rep)
    mean_gap = float(gap.mean())
    assert uniform_gap > 0.3
    assert -0.01 < mean_gap < min(0.06, 0.2 * uniform_gap), (mean_gap, uniform_gap)
    assert (gap > -4 * se - 1e-3).all()


def test_scoreflow_path_trains_only_the_dequantizer():
    """With a score model (the Gaussian oracle's exact score behind a module with a dummy
    parameter), train_dequantizer moves the flow's parameters and leaves the model's alone
    with no gradient."""

    class Oracle(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.ones((), dtype=D64))
            self.data = GaussianData(torch.zeros(2, dtype=D64), torch.full((2,), S**2, dtype=D64))
            self.score = self.data.score_fn(VPSchedule(t_min=1e-3))

        def forward(self, x, t):
            return self.w * self.score(x.reshape(len(x), 2), t).reshape(x.shape)

    oracle, schedule = Oracle(), VPSchedule(t_min=1e-3)
    flow = Dequantizer((1, 1, 2), L, TINY).to(D64)
    before = [p.detach().clone() for p in flow.parameters()]
    seen = []
    train_dequantizer(
        oracle,
        schedule,
        iter([ALL_K] * 3),
        flow,
        3,
        levels=L,
        scale=A,
        shift=B,
        generator=torch.Generator().manual_seed(0),
        callback=lambda step, loss, _: seen.append((step, loss)),
    )
    assert [s for s, _ in seen] == [1, 2, 3] and all(math.isfinite(v) for _, v in seen)
    assert oracle.w.grad is None and float(oracle.w.detach()) == 1.0
    assert any(not torch.equal(a, b) for a, b in zip(before, flow.parameters(), strict=True))


def test_the_data_running_out_is_an_error():
    flow = Dequantizer((1, 1, 2), L, TINY).to(D64)
    with pytest.raises(ValueError, match="ran out"):
        train_dequantizer(_logp, None, iter([ALL_K]), flow, 2, levels=L, scale=A, shift=B)


def test_mismatched_data_is_refused():
    flow = Dequantizer((1, 2, 2), 17, TINY)
    k = torch.zeros(2, 1, 2, 2, dtype=torch.long)
    with pytest.raises(ValueError, match="17 levels but the data has levels=256"):
        variational_dequantize(k, 256, 2.0, -1.0, flow)
    with pytest.raises(ValueError, match=r"shape \(1, 2, 2\) but the data has shape \(1, 2, 4\)"):
        variational_dequantize(torch.zeros(2, 1, 2, 4, dtype=torch.long), 17, 2.0, -1.0, flow)
    with pytest.raises(ValueError, match="non-integer"):
        variational_dequantize(k + 0.5, 17, 2.0, -1.0, flow)
    with pytest.raises(ValueError, match="W must be even"):
        Dequantizer((1, 3, 3), 17)
    with pytest.raises(ValueError, match="unknown dequantizer preset"):
        Dequantizer((1, 2, 2), 17, "huge")
    with pytest.raises(ValueError, match="divisible by heads"):
        DequantizerConfig(filters=10, heads=4)


def test_variational_dequantize_accounting():
    """y lies in k's bin, and entropy = −log q(u|k) + D log(a/L) (the change of variables)."""
    flow = _perturbed((1, 2, 2), 17, scale=0.1)
    g = torch.Generator().manual_seed(3)
    k = torch.randint(0, 17, (5, 1, 2, 2), generator=g)
    dq = variational_dequantize(k, 17, 2.0, -1.0, flow, generator=torch.Generator().manual_seed(0))
    out = flow(k, generator=torch.Generator().manual_seed(0))
    lo = 2.0 * k / 17 - 1.0
    assert ((dq.y >= lo) & (dq.y <= lo + 2.0 / 17)).all()
    torch.testing.assert_close(dq.entropy, -out.log_q + 4 * math.log(2.0 / 17))


def test_seeded_construction_and_presets():
    """The seed fixes the initial parameters without touching the global random stream; the
    "flowpp" preset is the seed's size (about 3.4–3.7 M parameters at CIFAR-10's 3×32×32)."""
    state = torch.random.get_rng_state()
    a, b = Dequantizer((1, 2, 2), 5, seed=7), Dequantizer((1, 2, 2), 5, seed=7)
    assert torch.equal(state, torch.random.get_rng_state())
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    cfg = DEQUANTIZER_PRESETS["flowpp"]
    assert (cfg.couplings, cfg.filters, cfg.blocks, cfg.components) == (4, 96, 2, 32)
    n = sum(p.numel() for p in Dequantizer((3, 32, 32), 256, "flowpp").parameters())
    assert 3.2e6 < n < 3.8e6


def test_bits_per_dim_with_a_dequantizer_is_the_variational_bound():
    """`bits_per_dim` with a variational dequantization is −log p(y) + log q(u|k) − D log a +
    D log L per example, for the same draw as `variational_dequantize` (same generator)."""
    torch.manual_seed(0)
    flow = Dequantizer((1, 2, 2), levels=4, config="small", seed=0)
    k = torch.randint(0, 4, (5, 1, 2, 2))

    def logp(y):  # a standard normal density in model space
        return -0.5 * (y**2).flatten(1).sum(1) - 2 * math.log(2 * math.pi)

    res = bits_per_dim(
        logp,
        k,
        Levels(4, 2.0, -1.0),
        dequantization=Dequantization("variational", flow),
        generator=torch.Generator().manual_seed(1),
    )
    with torch.no_grad():
        dq = variational_dequantize(
            k, 4, 2.0, -1.0, flow, generator=torch.Generator().manual_seed(1)
        )
    expect = (-logp(dq.y) - dq.entropy) / (4 * math.log(2))
    torch.testing.assert_close(res.bpd, expect)
    assert res.per_repeat.shape == (1, 5)
    with pytest.raises(ValueError, match="needs dequantizer"):
        Dequantization("variational")
