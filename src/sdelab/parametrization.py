r"""The one converter between network output kinds.

With x_t = α x_0 + σ ε, a network may predict any of

    score  s  = ∇ log p_t(x) = −ε/σ
    eps    ε̂
    x0     x̂_0 = (x_t − σ ε̂)/α
    v      v  = α ε − σ x_0                      (Salimans & Ho)
    drift  a  = g s                              (sdeflow-light's parameterisation)
    velocity u = dx_t/dt = α' x_0 + σ' ε        (i-DODE's probability-flow velocity)

The velocity is the probability-flow ODE's drift: with f = α'/α and g² = dσ²/dt − 2fσ²,
α' x_0 + σ' ε = f x_t + (σ' − f σ) ε = f x_t + g²/(2σ) ε = f x_t − ½ g² s, so a velocity
network *is* the ODE's vector field (i-DODE, Zheng et al. 2023). It is not Salimans & Ho's v,
which is the velocity in the angle time arctan(σ/α) of a variance-preserving schedule.

and every other module converts through :func:`convert`, which goes via ε. The formulas hold
for any schedule (α² + σ² need not be 1).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

from torch import Tensor, nn

from sdelab.sde import Schedule, ScheduleOutput
from sdelab.utils import append_dims, batch_time

__all__ = ["KINDS", "Kind", "ScoreModel", "convert", "from_eps", "score_fn_to_kind", "to_eps"]

Kind = Literal["score", "eps", "x0", "v", "drift", "velocity"]
KINDS: tuple[str, ...] = ("score", "eps", "x0", "v", "drift", "velocity")


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown parametrization {kind!r}: choose one of {', '.join(KINDS)}")


def _coeffs(vals: ScheduleOutput, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    n = x.ndim
    return append_dims(vals.alpha, n), append_dims(vals.sigma, n), append_dims(vals.g, n)


def _flow_coeffs(vals: ScheduleOutput, x: Tensor) -> tuple[Tensor, Tensor]:
    """(f, g²/(2σ)): the velocity is u = f x_t + g²/(2σ) ε."""
    n = x.ndim
    return append_dims(vals.f, n), append_dims(vals.g2 / (2 * vals.sigma), n)


def to_eps(out: Tensor, kind: str, x: Tensor, vals: ScheduleOutput) -> Tensor:
    """Convert a prediction of ``kind`` at (x_t, t) into the implied ε̂."""
    _check_kind(kind)
    alpha, sigma, g = _coeffs(vals, x)
    if kind == "eps":
        return out
    if kind == "score":
        return -sigma * out
    if kind == "x0":
        return (x - alpha * out) / sigma
    if kind == "v":
        return (alpha * out + sigma * x) / (alpha**2 + sigma**2)
    if kind == "velocity":
        f, c = _flow_coeffs(vals, x)
        return (out - f * x) / c
    return -sigma * out / g  # drift a = g s


def from_eps(eps: Tensor, kind: str, x: Tensor, vals: ScheduleOutput) -> Tensor:
    """Convert ε̂ at (x_t, t) into a prediction of ``kind``."""
    _check_kind(kind)
    alpha, sigma, g = _coeffs(vals, x)
    if kind == "eps":
        return eps
    if kind == "score":
        return -eps / sigma
    if kind == "velocity":
        f, c = _flow_coeffs(vals, x)
        return f * x + c * eps
    x0 = (x - sigma * eps) / alpha
    if kind == "x0":
        return x0
    if kind == "v":
        return alpha * eps - sigma * x0
    return -g * eps / sigma  # drift a = g s


def convert(
    out: Tensor,
    *,
    source: str,
    target: str,
    x: Tensor,
    t: Tensor | float,
    schedule: Schedule,
) -> Tensor:
    """Convert a prediction ``out`` of kind ``source`` at (x_t = ``x``, ``t``) into kind ``target``.

    Args:
        out: the prediction, same shape as ``x``.
        source, target: one of ``score``, ``eps``, ``x0``, ``v``, ``drift``, ``velocity``.
        x: the noisy input x_t, shape ``(B, ...)``.
        t: a scalar or one time per example, shape ``(B,)``.
        schedule: the schedule that defines α, σ, g.
    """
    if out.shape != x.shape:
        raise ValueError(
            f"prediction shape {tuple(out.shape)} differs from input shape {tuple(x.shape)}: "
            "a network must return a tensor shaped like x_t"
        )
    vals = schedule(batch_time(t, x))
    return from_eps(to_eps(out, source, x, vals), target, x, vals)


class ScoreModel(nn.Module):
    """Wrap a network ``net(x_t, t)`` that predicts ``parametrization`` into every other kind.

    Calling the wrapper returns the score, so a ``ScoreModel`` works wherever a plain
    ``score_fn(x, t)`` does (samplers, likelihood, bounds). ``model.predict(x, t, "x0")``
    returns any other kind. A class-conditional network takes labels as a third argument:
    ``model(x, t, y)`` (``y = None``: the null class, i.e. the unconditional score).
    """

    def __init__(
        self,
        net: nn.Module | Callable[[Tensor, Tensor], Tensor],
        schedule: Schedule,
        parametrization: Kind = "eps",
    ) -> None:
        super().__init__()
        _check_kind(parametrization)
        self.net = net
        self.schedule = schedule
        self.parametrization = parametrization

    def predict(
        self, x: Tensor, t: Tensor | float, kind: str = "score", y: Tensor | None = None
    ) -> Tensor:
        """The network's prediction at (x, t) (and labels ``y`` for a conditional network),
        converted to ``kind``."""
        t = batch_time(t, x)
        tau = self.schedule.net_time(t)
        out = self.net(x, tau) if y is None else self.net(x, tau, y)
        if kind == self.parametrization:
            return out
        return convert(
            out, source=self.parametrization, target=kind, x=x, t=t, schedule=self.schedule
        )

    def forward(self, x: Tensor, t: Tensor | float, y: Tensor | None = None) -> Tensor:
        return self.predict(x, t, "score", y)

    def eps(self, x: Tensor, t: Tensor | float) -> Tensor:
        return self.predict(x, t, "eps")

    def x0(self, x: Tensor, t: Tensor | float) -> Tensor:
        return self.predict(x, t, "x0")

    def drift(self, x: Tensor, t: Tensor | float) -> Tensor:
        return self.predict(x, t, "drift")


def score_fn_to_kind(
    score_fn: Callable[[Tensor, Tensor], Tensor], schedule: Schedule, kind: str
) -> Callable[[Tensor, Tensor], Tensor]:
    """Turn a plain ``score_fn(x, t)`` into a function predicting ``kind`` (e.g. oracle ε̂)."""
    _check_kind(kind)

    def fn(x: Tensor, t: Tensor) -> Tensor:
        t = batch_time(t, x)
        return convert(score_fn(x, t), source="score", target=kind, x=x, t=t, schedule=schedule)

    return fn
