r"""Training a variational dequantizer against a frozen model (ScoreFlow's ``train_deq`` mode).

With the score model fixed, the dequantizer q(u | k) (:class:`~sdelab.nets.dequantizer.
Dequantizer`) minimises the bound on −log P(k) of :mod:`sdelab.likelihood.dequantization`,

    J(q) = E_k E_{u ~ q(·|k)}[−log p_model(y) + log q(u | k)] − D log a + D log L,
    y = a (k + u)/L + b,

whose gap to −log P(k) is KL(q(·|k) ‖ p(·|k)). For a score model, −log p_model(y) is replaced
by ScoreFlow's bound (:func:`~sdelab.likelihood.scoreflow_bound`: cheap, unbiased in its
Monte-Carlo draws and differentiable in y), so J is a bound on a bound; evaluate the trained
dequantizer with the exact ODE likelihood. Gradients reach the dequantizer through the
reparameterised draw u = flow(ε; k); the model's parameters get none.

Nothing here knows folders or configs: the run layer builds the objects, calls
:func:`train_dequantizer` with a ``callback`` for logging, EMA and checkpoints.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from sdelab.likelihood.bounds import scoreflow_bound
from sdelab.likelihood.dequantization import check_levels, nats_to_bpd, variational_dequantize
from sdelab.nets.dequantizer import Dequantizer
from sdelab.sde import Schedule

__all__ = [
    "DequantizerTrainResult",
    "dequantization_bound",
    "dequantizer_step",
    "train_dequantizer",
]


def dequantization_bound(
    model: Callable[[Tensor], Tensor] | Callable[[Tensor, Tensor], Tensor],
    schedule: Schedule | None,
    k: Tensor,
    levels: int,
    scale: float,
    shift: float,
    dequantizer: Dequantizer,
    *,
    n_samples: int = 2,
    time_sampling: Literal["uniform", "importance"] = "importance",
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""One-draw estimate of the variational-dequantization bound on −log P(k), in nats.

    −log p_model(y) + log q(u | k) − D log a + D log L for one u ~ q(·|k) per example; its
    expectation over u is ≥ −log P(k) when ``model`` is an exact log-density, and ≥ the
    ScoreFlow bound's −log P(k) otherwise.

    Args:
        model: with ``schedule=None`` a log-density ``logp_fn(y) -> (B,)`` in model space; with a
            schedule a score function ``score_fn(x, t)`` whose −log p is ScoreFlow's bound.
        schedule: see ``model``.
        k: integer levels ``(B, C, H, W)`` in {0..levels−1}.
        levels, scale, shift: L and the map y = scale·(k + u)/L + shift to model space.
        dequantizer: the flow q(u | k).
        n_samples, time_sampling: passed to :func:`~sdelab.likelihood.scoreflow_bound`.
        generator: the source of all randomness.

    Returns:
        ``(B,)`` nats, differentiable w.r.t. the dequantizer's parameters.

    Raises:
        ValueError: bad data, map, or a dequantizer made for other data (see
            :func:`~sdelab.likelihood.dequantization.variational_dequantize`).
    """
    dq = variational_dequantize(k, levels, scale, shift, dequantizer, generator=generator)
    if schedule is None:
        neg_logp = -model(dq.y)
    else:
        neg_logp = scoreflow_bound(
            model,
            schedule,
            dq.y,
            n_samples=n_samples,
            time_sampling=time_sampling,
            generator=generator,
        ).nll_bound
    return neg_logp - dq.entropy


@dataclass(frozen=True)
class DequantizerTrainResult:
    """What :func:`train_dequantizer` did.

    Attributes:
        losses_bpd: the minibatch mean of the bound per step, in bits/dim.
        steps: the number of optimiser steps taken.
    """

    losses_bpd: list[float]
    steps: int


def _batches(data: Iterable) -> Callable[[], Tensor]:
    it = iter(data)

    def next_batch() -> Tensor:
        nonlocal it
        try:
            batch = next(it)
        except StopIteration:
            it = iter(data)  # a re-iterable (list, DataLoader) starts over; an iterator ends
            try:
                batch = next(it)
            except StopIteration:
                raise ValueError(
                    "the data ran out: pass a re-iterable (list, DataLoader) or an endless "
                    "iterator of integer batches"
                ) from None
        return batch[0] if isinstance(batch, tuple | list) else batch

    return next_batch


def dequantizer_step(
    model: Callable[[Tensor], Tensor] | Callable[[Tensor, Tensor], Tensor],
    schedule: Schedule | None,
    k: Tensor,
    dequantizer: Dequantizer,
    optimizer: torch.optim.Optimizer,
    *,
    levels: int,
    scale: float,
    shift: float,
    grad_clip: float | None = 1.0,
    n_samples: int = 2,
    time_sampling: Literal["uniform", "importance"] = "importance",
    generator: torch.Generator | None = None,
) -> float:
    """One optimiser step of the dequantizer on integer batch ``k`` against the frozen model
    (the minibatch mean of :func:`dequantization_bound`); returns the loss in bits/dim.
    Arguments as :func:`train_dequantizer`."""
    check_levels(k, levels)
    params = [p for p in dequantizer.parameters() if p.requires_grad]
    nll = dequantization_bound(
        model,
        schedule,
        k,
        levels,
        scale,
        shift,
        dequantizer,
        n_samples=n_samples,
        time_sampling=time_sampling,
        generator=generator,
    )
    loss = nats_to_bpd(nll.mean(), dequantizer.dim)
    optimizer.zero_grad(set_to_none=True)
    loss.backward(inputs=params)  # the frozen model accumulates no gradient
    if grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    optimizer.step()
    return float(loss.detach())


def train_dequantizer(
    model: Callable[[Tensor], Tensor] | Callable[[Tensor, Tensor], Tensor],
    schedule: Schedule | None,
    data: Iterable[Tensor | tuple | list],
    dequantizer: Dequantizer,
    steps: int,
    *,
    levels: int,
    scale: float,
    shift: float,
    optimizer: torch.optim.Optimizer | None = None,
    lr: float = 1e-3,
    grad_clip: float | None = 1.0,
    n_samples: int = 2,
    time_sampling: Literal["uniform", "importance"] = "importance",
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    callback: Callable[[int, float, Dequantizer], None] | None = None,
) -> DequantizerTrainResult:
    r"""Train ``dequantizer`` in place for ``steps`` steps against a frozen model (module
    docstring): minimise the minibatch mean of :func:`dequantization_bound`.

    Args:
        model, schedule: a log-density ``logp_fn(y)`` (``schedule=None``) or a score function
            with its schedule (ScoreFlow bound); never updated (gradients go only to the
            dequantizer; put a network in eval mode yourself).
        data: integer batches ``(B, C, H, W)`` (or tuples whose first item is one), levels in
            {0..levels−1}; a re-iterable is cycled.
        dequantizer: the flow to train (set to train mode during the call, restored after).
        steps: optimiser steps (>= 1).
        levels, scale, shift: L and the map to model space the model was trained with.
        optimizer: an optimiser over ``dequantizer``'s parameters (e.g. restored for a resume);
            default Adam with ``lr``.
        grad_clip: clip the gradient norm to this (``None``: no clipping).
        n_samples, time_sampling: the ScoreFlow bound's Monte-Carlo options.
        generator: the source of all randomness (base noise, times, noise of the bound).
        device: move each batch there first.
        callback: ``callback(step, loss_bpd, dequantizer)`` after every step (1-based), for
            logging, EMA and checkpoints.

    Returns:
        :class:`DequantizerTrainResult` with the per-step loss in bits/dim.

    Raises:
        ValueError: ``steps`` < 1, data that runs out, bad data or a dequantizer made for other
            data.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    params = [p for p in dequantizer.parameters() if p.requires_grad]
    if optimizer is None:
        optimizer = torch.optim.Adam(params, lr=lr)
    next_batch = _batches(data)
    losses: list[float] = []
    was_training = dequantizer.training
    dequantizer.train()
    try:
        for step in range(1, steps + 1):
            k = next_batch()
            if device is not None:
                k = k.to(device)
            losses.append(
                dequantizer_step(
                    model,
                    schedule,
                    k,
                    dequantizer,
                    optimizer,
                    levels=levels,
                    scale=scale,
                    shift=shift,
                    grad_clip=grad_clip,
                    n_samples=n_samples,
                    time_sampling=time_sampling,
                    generator=generator,
                )
            )
            if callback is not None:
                callback(step, losses[-1], dequantizer)
    finally:
        dequantizer.train(was_training)
    return DequantizerTrainResult(losses_bpd=losses, steps=steps)
