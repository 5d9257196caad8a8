r"""Maximum-likelihood training of the probability-flow ODE.

The probability-flow ODE of a score model is a continuous normalising flow, so its exact
log-likelihood is a training objective in its own right — FFJORD's (Grathwohl et al. 2019),
applied to the ODE dx/dt = f x − ½ g² s_θ(x, t) of a (pre-trained) score model. Gradients flow
through :func:`~sdelab.likelihood.log_likelihood`'s :class:`Augmented` integrator, by
backpropagation through the solver's steps or by the adjoint method.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sdelab.likelihood.ode import log_likelihood
from sdelab.likelihood.options import Augmented, Exact, Hutchinson
from sdelab.sde import Schedule
from sdelab.utils import ScoreFn

__all__ = ["ode_nll_loss"]


def ode_nll_loss(
    score_fn: ScoreFn,
    schedule: Schedule,
    x: Tensor,
    *,
    tol: float | None = None,
    divergence: Exact | Hutchinson | None = None,
    integrator: Augmented | None = None,
    t_min: float | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Per-example negative log-likelihood −log p_{t_min}(x) of the probability-flow ODE in
    nats, differentiable in the score function's parameters (and in ``x``).

    Args:
        score_fn: the model, e.g. a :class:`~sdelab.parametrization.ScoreModel`; with
            ``Augmented(adjoint=True)`` it must be an ``nn.Module`` holding its parameters.
        schedule: the forward process (its prior is the flow's base density).
        x: data ``(B, ...)``.
        tol: per-example tolerance of the solve in nats (``None``: the default policy's 1e-2).
            The gradient is that of the solver's output at this tolerance; training tolerates
            a loose one.
        divergence: ``None``: the default policy for gradients (the exact trace for D ≤ 64,
            one Hutchinson probe above: an unbiased estimate of the loss and its gradient).
        integrator: an :class:`Augmented` (default ``Augmented()``: backpropagation through the
            solver; ``Augmented(adjoint=True)``: memory independent of the number of steps).
        t_min: where the data sits (default ``schedule.t_min``).
        generator: the Hutchinson probes.

    Returns:
        ``(B,)`` nats; average it for training (``loss.mean().backward()``).

    Raises:
        ValueError: an integrator other than :class:`Augmented` (the forward-only rules have no
            gradients), or as :func:`~sdelab.likelihood.log_likelihood`.
    """
    if integrator is not None and not isinstance(integrator, Augmented):
        raise ValueError(
            f"ode_nll_loss needs gradients: integrator must be Augmented(...), got "
            f"{type(integrator).__name__}"
        )
    res = log_likelihood(
        score_fn,
        schedule,
        x,
        tol=tol,
        divergence=divergence,
        integrator=integrator or Augmented(),
        t_min=t_min,
        generator=generator,
    )
    return res.nll
