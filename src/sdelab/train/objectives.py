r"""The training objectives: one object per ``loss.objective``, each with one backward path.

An objective draws the global batch (:meth:`Objective.batch`) and runs the backward pass of
this process's share of it (:meth:`Objective.backward`), returning the global mean loss. The
same code serves one process, gradient accumulation (``train.grad_accum`` micro-batches) and
many processes: times and noise are drawn for the whole global batch, in the order the loss
draws them, and every rank keeps its rows — so N processes take the step one process takes.

- :data:`DSM` — denoising score matching (:func:`sdelab.losses.dsm_loss`) with the run's
  parametrization, weighting and time sampling; class-conditional nets get label dropout.
  With ``loss.score_matching_order`` 2 or 3 the high-order terms of Lu et al.
  (:func:`sdelab.losses.high_order_dsm_loss`) are added.
- :data:`VDM` — the VDM bound in bits/dim (:func:`sdelab.vdm.vdm_vlb`), with VDM's
  variance-minimising gradient for a learned schedule's shape.
- :data:`DDPM`, :data:`SMLD` — discrete time (:func:`sdelab.discrete.chain_loss`): DDPM's
  L_simple and NCSN's σ²-weighted loss at uniform integer steps of the run's chain.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from sdelab.discrete import chain_loss
from sdelab.likelihood.dequantization import nats_to_bpd
from sdelab.losses import (
    TimeSample,
    dsm_loss,
    high_order_dsm_loss,
    rademacher_like,
    sample_time,
)
from sdelab.train.build import Run
from sdelab.utils import randn_like
from sdelab.vdm import variance_gradient_step, vdm_vlb, vlb_times

__all__ = ["DDPM", "DSM", "OBJECTIVES", "SMLD", "VDM", "Objective", "drop_labels"]


def drop_labels(
    labels: Tensor, p: float, null: int, generator: torch.Generator | None = None
) -> Tensor:
    """Replace each label by the null label ``null`` with probability ``p`` (independently;
    the mask is drawn with ``generator`` over the whole batch). ``p = 0`` draws nothing."""
    if p == 0:
        return labels
    drop = torch.rand(labels.shape, generator=generator, device=labels.device) < p
    return torch.where(drop, torch.full_like(labels, null), labels)


def _labeled(net: Callable, labels: Tensor | None) -> Callable:
    """``net`` as ``(x, t) -> net(x, t, labels)`` for a conditional net (``dsm_loss`` calls
    ``net(x_t, t)``); ``net`` itself when unconditional."""
    return net if labels is None else (lambda x, t: net(x, t, labels))


def dsm_batch(run: Run) -> tuple[Tensor, Tensor | None]:
    """The global batch ``x0`` and, for a conditional net, its labels after label dropout
    (the mask drawn from the loss generator, before the times and noise)."""
    cfg = run.config
    b, k = cfg.train.batch_size, cfg.model.num_classes
    if not k:
        return run.dataset.sample(b, run.data_gen).to(run.device), None
    x0, labels = run.dataset.sample_labeled(b, run.data_gen)
    labels = drop_labels(labels.to(run.device), cfg.model.label_dropout, k, run.loss_gen)
    return x0.to(run.device), labels


def vdm_batch(run: Run) -> tuple[Tensor, None]:
    """A training batch for the VDM bound: on image data the integer levels (its decoder is
    discrete, no dequantization), otherwise the dataset's model-space sample (unconditional
    only: the config refuses VDM with labels)."""
    b = run.config.train.batch_size
    if run.dataset.num_levels is not None:
        return run.dataset.sample_levels(b, run.data_gen).to(run.device), None
    return run.dataset.sample(b, run.data_gen).to(run.device), None


def _micro_batches(
    run: Run, b: int, ddp_sync: bool = True
) -> Iterator[tuple[slice, contextlib.AbstractContextManager]]:
    """This rank's ``train.grad_accum`` micro-batches of a global batch of ``b`` rows: (rows,
    context); the context defers DDP's gradient all-reduce to the last micro-batch's backward
    (none with ``ddp_sync=False``)."""
    info, k = run.dist, run.config.train.grad_accum
    per_rank = b // info.world_size
    micro = per_rank // k
    for j in range(k):
        lo = info.rank * per_rank + j * micro
        last = j == k - 1
        plain = run.ddp is None or last or not ddp_sync
        sync = contextlib.nullcontext() if plain else run.ddp.no_sync()
        yield slice(lo, lo + micro), sync


def _autocast(run: Run):
    precision = run.precision
    if precision == "no":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=run.device.type, dtype=dtype)


def dsm_backward(run: Run, x0: Tensor, labels: Tensor | None = None) -> Tensor:
    """Backward of this rank's share of the global batch ``x0`` ``(B, ...)`` (with its labels
    after dropout, for a conditional net), in ``grad_accum`` micro-batches; returns the global
    mean loss (all-reduced).

    Times and noise are drawn for the whole global batch, in the order :func:`dsm_loss` draws
    them (the label-dropout mask before them, over the global batch too), so the rows of rank
    r are those a single process gives the same examples.
    """
    cfg = run.config
    b = x0.shape[0]
    time = sample_time(
        run.schedule,
        b,
        time_sampling=cfg.loss.time_sampling,
        low_discrepancy=cfg.loss.low_discrepancy,
        generator=run.loss_gen,
        device=x0.device,
        dtype=x0.dtype,
    )
    noise = randn_like(x0, run.loss_gen)
    if cfg.loss.score_matching_order > 1:
        return _high_order_backward(run, x0, labels, time, noise)
    net = run.ddp if run.ddp is not None else run.model.net

    def micro_loss(rows: slice) -> Tensor:
        return dsm_loss(
            _labeled(net, None if labels is None else labels[rows]),
            run.schedule,
            x0[rows],
            parametrization=cfg.loss.parametrization,
            weighting=cfg.loss.weighting,
            time=TimeSample(time.t[rows], time.weight[rows]),
            noise=noise[rows],
        ).loss

    return _accumulate(run, b, micro_loss)


def _high_order_backward(
    run: Run, x0: Tensor, labels: Tensor | None, time: TimeSample, noise: Tensor
) -> Tensor:
    """:func:`dsm_backward` with Lu et al.'s high-order terms; the Hutchinson probes are drawn
    for the global batch after the noise. The network is differentiated in its input (forward
    mode inside reverse mode), which DistributedDataParallel's hooks do not follow: with several
    processes the bare network runs and the gradients are averaged here."""
    cfg = run.config
    probe = rademacher_like(x0, run.loss_gen)
    net = run.model.net

    def micro_loss(rows: slice) -> Tensor:
        return high_order_dsm_loss(
            _labeled(net, None if labels is None else labels[rows]),
            run.schedule,
            x0[rows],
            order=cfg.loss.score_matching_order,
            parametrization=cfg.loss.parametrization,
            weighting=cfg.loss.weighting,
            high_order_weight=cfg.loss.high_order_weight,
            second_order_form=cfg.loss.second_order_form,
            time=TimeSample(time.t[rows], time.weight[rows]),
            noise=noise[rows],
            probe=probe[rows],
        ).loss

    loss = _accumulate(run, x0.shape[0], micro_loss, ddp_sync=False)
    if run.dist.enabled:
        import torch.distributed as dist

        for p in run.model.net.parameters():
            if p.requires_grad:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                dist.all_reduce(p.grad)
                p.grad /= run.dist.world_size
    return loss


def _accumulate(
    run: Run, b: int, micro_loss: Callable[[slice], Tensor], ddp_sync: bool = True
) -> Tensor:
    """Backward of this rank's ``grad_accum`` micro-batches of a global batch of ``b`` rows,
    ``micro_loss(rows) -> (micro,)`` per-example losses; returns the global mean loss
    (all-reduced), the same on every rank. ``ddp_sync=False``: the loss does not run the
    DDP-wrapped network, so no DDP context is entered (the caller reduces the gradients)."""
    per_rank = b // run.dist.world_size
    total = torch.zeros((), device=run.device)
    for rows, sync in _micro_batches(run, b, ddp_sync):
        with sync:
            with _autocast(run):
                loss = micro_loss(rows).float()  # (micro,)
            shard_mean = loss.sum() / per_rank  # DDP averages these over ranks: the global mean
            if run.scaler is not None:
                shard_mean = run.scaler.scale(shard_mean)
            shard_mean.backward()
        total += loss.detach().sum()
    if run.dist.enabled:
        import torch.distributed as dist

        dist.all_reduce(total)
    return total / b


def vdm_backward(run: Run, x0: Tensor, labels: Tensor | None = None) -> Tensor:
    """Backward of the VDM bound (in bits/dim) on this rank's share of the global batch
    ``x0`` (integer levels for image data), in ``grad_accum`` micro-batches; returns the
    global mean (all-reduced).

    The network and any learned end points get ∇ mean(VLB); a learned schedule's shape
    parameters get ∇ mean(L_diffusion²), VDM's variance-minimising gradient
    (:func:`sdelab.vdm.variance_gradient_step`). Times and both noises are drawn for the whole
    global batch in the order :func:`sdelab.vdm.vdm_vlb` draws them, so every split of the
    batch takes the same step. The schedule is not part of the DDP-wrapped network: its
    gradients are averaged over processes here.
    """
    cfg, info = run.config, run.dist
    levels = run.dataset.num_levels
    n_steps = cfg.loss.vlb_steps or None
    b = x0.shape[0]
    like = x0 if x0.is_floating_point() else x0.to(torch.get_default_dtype())
    t = vlb_times(
        run.schedule,
        b,
        n_steps=n_steps,
        time_sampling=cfg.loss.time_sampling,
        low_discrepancy=cfg.loss.low_discrepancy,
        generator=run.loss_gen,
        device=x0.device,
        dtype=like.dtype,
    )
    noise = randn_like(like, run.loss_gen)
    z0_noise = randn_like(like, run.loss_gen)
    shape = run.schedule.shape_parameters()
    ids = {id(p) for p in shape}
    others = [p for p in run.model.parameters() if id(p) not in ids]
    per_rank = b // info.world_size
    net = run.ddp if run.ddp is not None else run.model.net
    schedule = run.schedule

    def eps_fn(z: Tensor, time: Tensor) -> Tensor:
        return net(z, schedule.net_time(time))

    total = torch.zeros((), device=x0.device)
    for rows, sync in _micro_batches(run, b):
        with sync:
            with _autocast(run):
                vlb = vdm_vlb(
                    eps_fn,
                    schedule,
                    x0[rows],
                    num_levels=levels,
                    n_steps=n_steps,
                    parametrization=cfg.loss.parametrization,
                    t=t[rows],
                    noise=noise[rows],
                    z0_noise=z0_noise[rows],
                )
            to_bpd = nats_to_bpd(1.0, vlb.dims)
            bpd = vlb.total.float() * to_bpd
            variance_gradient_step(
                vlb.diffusion.float() * to_bpd,
                others,
                shape,
                total=bpd,
                denominator=per_rank,  # DDP averages over ranks: the global mean
                scale=run.scaler.scale if run.scaler is not None else None,
            )
        total += bpd.detach().sum()
    if info.enabled:
        import torch.distributed as dist

        for p in schedule.parameters():
            if p.requires_grad:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                dist.all_reduce(p.grad)
                p.grad /= info.world_size
        dist.all_reduce(total)
    return total / b


def discrete_backward(run: Run, x0: Tensor, labels: Tensor | None = None) -> Tensor:
    """Backward of DDPM's L_simple / NCSN's loss (:func:`sdelab.discrete.chain_loss`) on this
    rank's share of the global batch, in ``grad_accum`` micro-batches; returns the global mean
    (all-reduced). Integer steps and noise are drawn for the whole global batch (in that
    order, as ``chain_loss`` draws them), so every split of the batch takes the same step."""
    cfg = run.config
    chain = run.model.chain
    b = x0.shape[0]
    steps = torch.randint(0, chain.n, (b,), generator=run.loss_gen, device=x0.device)
    noise = randn_like(x0, run.loss_gen)
    net = run.ddp if run.ddp is not None else run.model.net

    def micro_loss(rows: slice) -> Tensor:
        return chain_loss(
            _labeled(net, None if labels is None else labels[rows]),
            chain,
            x0[rows],
            parametrization=cfg.loss.parametrization,
            steps=steps[rows],
            noise=noise[rows],
        ).loss

    return _accumulate(run, b, micro_loss)


@dataclass(frozen=True)
class Objective:
    """A training objective: ``batch(run) -> (x0, labels or None)`` draws the global batch;
    ``backward(run, x0, labels) -> loss`` accumulates this rank's gradients (zeroed before)
    and returns the global mean loss (the same on every rank)."""

    name: str
    batch: Callable[[Run], tuple[Tensor, Tensor | None]]
    backward: Callable[[Run, Tensor, Tensor | None], Tensor]


DSM = Objective("dsm", dsm_batch, dsm_backward)
VDM = Objective("vdm", vdm_batch, vdm_backward)
DDPM = Objective("ddpm", dsm_batch, discrete_backward)
SMLD = Objective("smld", dsm_batch, discrete_backward)
#: Objectives by ``loss.objective``.
OBJECTIVES: dict[str, Objective] = {"dsm": DSM, "vdm": VDM, "ddpm": DDPM, "smld": SMLD}
