"""The converter: round trips are the identity, errors are clear."""

from __future__ import annotations

import pytest
import torch

from sdelab.interop import DiscreteVPSchedule
from sdelab.oracle import GaussianData
from sdelab.parametrization import KINDS, ScoreModel, convert, score_fn_to_kind
from sdelab.sde import MonotoneNetSchedule

D64 = torch.float64


def _point(schedule, shape=(6, 3, 4, 4)):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(shape, generator=g, dtype=D64)
    out = torch.randn(shape, generator=g, dtype=D64)
    u = torch.rand(shape[0], generator=g, dtype=D64)
    t = schedule.t_min + (schedule.T - schedule.t_min) * (0.05 + 0.9 * u)
    return x, out, t


def test_round_trip_chain_is_identity(schedule):
    """score → eps → x0 → v → drift → velocity → score, on image-shaped data with per-example t."""
    x, s0, t = _point(schedule)
    cur, kind = s0, "score"
    for nxt in ("eps", "x0", "v", "drift", "velocity", "score"):
        cur = convert(cur, source=kind, target=nxt, x=x, t=t, schedule=schedule)
        kind = nxt
    torch.testing.assert_close(cur, s0, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("kind", KINDS)
def test_each_kind_round_trips(schedule, kind):
    x, out, t = _point(schedule, (5, 7))
    back = convert(
        convert(out, source=kind, target="eps", x=x, t=t, schedule=schedule),
        source="eps",
        target=kind,
        x=x,
        t=t,
        schedule=schedule,
    )
    torch.testing.assert_close(back, out, rtol=1e-8, atol=1e-8)


def test_conversions_agree_with_definitions(schedule):
    """x̂0 = (x − σ ε̂)/α, v = α ε − σ x0, a = g s, s = −ε/σ, written out independently."""
    x, eps, t = _point(schedule, (5, 7))
    v = schedule(t)
    a, s, g = v.alpha[:, None], v.sigma[:, None], v.g[:, None]
    x0 = (x - s * eps) / a

    def conv(k):
        return convert(eps, source="eps", target=k, x=x, t=t, schedule=schedule)

    torch.testing.assert_close(conv("score"), -eps / s)
    torch.testing.assert_close(conv("x0"), x0)
    torch.testing.assert_close(conv("v"), a * eps - s * x0)
    torch.testing.assert_close(conv("drift"), -g * eps / s)
    # i-DODE's velocity: dx_t/dt = α' x0 + σ' ε along the path through (x0, ε)
    da, ds = v.d_alpha[:, None], v.d_sigma[:, None]
    torch.testing.assert_close(conv("velocity"), da * x0 + ds * eps)


def test_velocity_is_the_probability_flow_drift(schedule):
    """The velocity of the true score is the probability-flow ODE's vector field
    f x − ½ g² s (the schedule's own ``probability_flow``) and, for Gaussian data, the
    posterior mean E[α' x0 + σ' ε | x_t] computed in closed form from the data's covariance."""
    mean = torch.tensor([0.5, -1.0], dtype=D64)
    cov = torch.tensor([[1.0, 0.3], [0.3, 0.5]], dtype=D64)
    data = GaussianData(mean, cov)
    x, _, t = _point(schedule, (8, 2))
    score = data.score(x, t, schedule)
    vel = convert(score, source="score", target="velocity", x=x, t=t, schedule=schedule)
    torch.testing.assert_close(vel, schedule.probability_flow(x, t, score))
    # closed form: x_t = α x0 + σ ε is jointly Gaussian with x0, so E[x0 | x_t] =
    # μ + α Σ (α² Σ + σ² I)⁻¹ (x_t − α μ) and E[ε | x_t] = (x_t − α E[x0 | x_t]) / σ
    v = schedule(t)
    for i in range(x.shape[0]):
        a, s, da, ds = v.alpha[i], v.sigma[i], v.d_alpha[i], v.d_sigma[i]
        marg = a**2 * cov + s**2 * torch.eye(2, dtype=D64)
        x0_mean = mean + a * cov @ torch.linalg.solve(marg, x[i] - a * mean)
        eps_mean = (x[i] - a * x0_mean) / s
        torch.testing.assert_close(vel[i], da * x0_mean + ds * eps_mean)


def test_score_model_wraps_any_kind(schedule):
    """A network predicting x0 (here: the oracle's x̂0) gives the oracle score back."""
    data = GaussianData(
        torch.tensor([0.5, -1.0], dtype=D64), torch.tensor([[1.0, 0.3], [0.3, 0.5]], dtype=D64)
    )
    score = data.score_fn(schedule)
    x, _, t = _point(schedule, (8, 2))

    def at_net_time(fn):
        """The ScoreModel feeds its net ``schedule.net_time(t)`` (normalised γ for the learned
        γ-network, the step t·(N − 1) for a discrete chain, t otherwise): map it back to t."""
        if isinstance(schedule, DiscreteVPSchedule):
            return lambda x, tau: fn(x, tau / (schedule.num_steps - 1))
        if not isinstance(schedule, MonotoneNetSchedule):
            return fn
        g_min, g_max = schedule.ends

        def net(x, tau):
            return fn(x, schedule.t_of_log_snr(-(g_min + (g_max - g_min) * tau)).to(tau.dtype))

        return net

    for kind in KINDS:
        net = at_net_time(score_fn_to_kind(score, schedule, kind))
        model = ScoreModel(net, schedule, parametrization=kind)
        torch.testing.assert_close(model(x, t), score(x, t), rtol=1e-8, atol=1e-8)
        torch.testing.assert_close(model.eps(x, t), -schedule(t).sigma[:, None] * score(x, t))


def test_bad_kind_and_shapes(schedule):
    x, out, t = _point(schedule, (4, 3))
    with pytest.raises(ValueError, match="unknown parametrization 'noise'.*eps"):
        convert(out, source="noise", target="eps", x=x, t=t, schedule=schedule)
    with pytest.raises(ValueError, match="prediction shape"):
        convert(out[:, :2], source="eps", target="x0", x=x, t=t, schedule=schedule)
    with pytest.raises(ValueError, match="one time per example"):
        convert(out, source="eps", target="x0", x=x, t=t[:2], schedule=schedule)


def test_scalar_time_with_autograd_schedule():
    """A scalar t is expanded per example; the jvp fallback must accept it (regression)."""
    from conftest import OUSchedule

    sched = OUSchedule()
    x = torch.randn(5, 3, dtype=D64)
    out = convert(x, source="eps", target="x0", x=x, t=0.5, schedule=sched)
    a, s = sched.alpha_sigma(torch.tensor(0.5, dtype=D64))
    torch.testing.assert_close(out, (x - s * x) / a)
