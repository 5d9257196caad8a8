r"""Data-set likelihood: dequantize, estimate, account — nats and bits/dim you can report.

This module composes the maths below it: :mod:`sdelab.likelihood.dequantization` (levels, the map to model
space, the dequantization densities), :mod:`sdelab.likelihood` (the ODE log-likelihood and the
bounds) and :mod:`sdelab.distributed` (splitting a test set over launched processes).

- :func:`bits_per_dim` — per-example bits/dim of integer data k: dequantize, evaluate the
  model density (a log-density, or a score function through the probability-flow ODE), subtract
  the dequantization entropy: bpd = (E_q[−log p(y)] − H(q(·|k))) / (D log 2).
- :func:`evaluate_likelihood` — a whole data set, batch by batch, with any estimator
  (:data:`ESTIMATORS`: ``ode``, ``elbo``, ``scoreflow``): :class:`EvaluationResult` with
  per-example values and mean ± standard error.
- :func:`evaluate_sharded` — the same, batch i evaluated by launched process i mod N with a
  generator seeded by (seed, i), gathered in order: the numbers do not depend on N.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import Literal

import torch
from torch import Tensor
from tqdm.auto import tqdm

from sdelab import distributed
from sdelab.likelihood.bounds import elbo, scoreflow_bound
from sdelab.likelihood.dequantization import (
    DEQUANTIZATIONS,
    dequantize,
    nats_to_bpd,
    variational_dequantize,
)
from sdelab.likelihood.ode import log_likelihood
from sdelab.progress import Progress, TimeProgress
from sdelab.sde import Schedule
from sdelab.utils import ScoreFn, check_int, chunk_generator, mean_se, mean_se_float

__all__ = [
    "ESTIMATORS",
    "LIKELIHOOD_STREAM",
    "BPDResult",
    "EvaluationResult",
    "bits_per_dim",
    "evaluate_likelihood",
    "evaluate_sharded",
]

#: Seed stream of likelihood batch i > 0: ``derive_seed(seed, LIKELIHOOD_STREAM, i)``.
LIKELIHOOD_STREAM = 21


@dataclass(frozen=True)
class BPDResult:
    """Per-example bits/dim of integer data.

    Attributes:
        bpd: bound on −log2 P(k) / D, ``(B,)``, averaged over the dequantization repeats.
        nll: the same in nats (not per dimension), ``(B,)``.
        se: standard error of ``bpd`` over repeats, ``(B,)`` (NaN when ``n_repeats == 1``).
        nfe: total ODE function evaluations (0 for a plain log-density).
        levels, scale, shift, dequantization: the accounting used, to report beside the number.
        per_repeat: ``(R, B)`` nats of every repeat (for
            :func:`sdelab.likelihood.repeats.repeat_statistics` of ``per_repeat.T``).
    """

    bpd: Tensor
    nll: Tensor
    se: Tensor
    nfe: int
    levels: int
    scale: float
    shift: float
    dequantization: str
    per_repeat: Tensor | None = None


def bits_per_dim(
    model: Callable[[Tensor], Tensor] | Callable[[Tensor, Tensor], Tensor],
    k: Tensor,
    levels: int,
    scale: float,
    shift: float,
    *,
    schedule: Schedule | None = None,
    n_repeats: int = 1,
    dequantization: Literal["uniform", "truncated_normal", "variational"] = "uniform",
    dequantizer: torch.nn.Module | None = None,
    generator: torch.Generator | None = None,
    dtype: torch.dtype | None = None,
    t_min: float | None = None,
    **likelihood_kwargs,
) -> BPDResult:
    r"""Bits/dim of INTEGER data: dequantize, evaluate the model density, do the accounting.

    bpd = (E_q[−log p(y)] − H(q(·|k))) / (D log 2), which for uniform dequantization is
    (E_u[−log p_y(y)] − D log a + D log L) / (D log 2) (module docstring).

    Args:
        model: with ``schedule=None``, a log-density ``logp_fn(y) -> (B,)`` in model space; with
            a schedule, a score function ``score_fn(x, t)`` whose density is the probability-flow
            ODE's (:func:`~sdelab.likelihood.log_likelihood` at ``t_min``).
        k: integer levels in {0..levels−1}, shape ``(B, ...)``.
        levels: the number of levels L (e.g. 256, or any integer >= 2).
        scale, shift: the affine map y = scale·x + shift from [0, 1)^D to model space (explicit:
            ``scale=2, shift=-1`` for [−1, 1], ``scale=1, shift=0`` for [0, 1]).
        schedule: see ``model``; required for ``"truncated_normal"``.
        n_repeats: dequantization draws per example, averaged (ScoreFlow's ``num_repeats``).
        dequantization: ``"uniform"``, ``"truncated_normal"`` (i-DODE) or ``"variational"``
            (a trained flow q(u | k), ``dequantizer``; the bound then subtracts its one-draw
            −log q(u | k): :func:`~sdelab.likelihood.dequantization.variational_dequantize`).
        dequantizer: the :class:`~sdelab.nets.dequantizer.Dequantizer` of ``"variational"``.
        generator: randomness for dequantization and Hutchinson probes.
        dtype: floating dtype for the dequantized data (default: torch's default).
        t_min: time of the data for the ODE and the truncated normal (default schedule.t_min).
        **likelihood_kwargs: passed to ``log_likelihood`` (``rtol``, ``divergence``, …).

    Returns:
        :class:`BPDResult` (per-example ``bpd``, ``nll`` in nats, ``se``, ``nfe`` and the
        accounting used).

    Raises:
        ValueError: non-integer data (e.g. already scaled to [0, 1]), values outside
            [0, levels − 1], NaN, bad ``levels``/``scale``/``shift``/``n_repeats``, or the
            truncated normal without a schedule; each message names the fix.
    """
    check_int("n_repeats", n_repeats, 1)
    if dequantization not in (*DEQUANTIZATIONS, "variational"):
        raise ValueError(
            f"unknown dequantization {dequantization!r}: choose one of "
            f"{', '.join((*DEQUANTIZATIONS, 'variational'))}"
        )
    if (dequantization == "variational") != (dequantizer is not None):
        raise ValueError(
            "dequantization='variational' needs dequantizer=... (a trained flow), and a "
            "dequantizer needs dequantization='variational'"
        )
    if likelihood_kwargs and schedule is None:
        raise ValueError(
            f"options {sorted(likelihood_kwargs)} apply to the ODE likelihood: pass schedule=... "
            "with a score function, or drop them for a plain log-density"
        )
    nlls, nfe = [], 0
    for _ in range(n_repeats):
        if dequantizer is not None:
            with torch.no_grad():
                dq = variational_dequantize(
                    k, levels, scale, shift, dequantizer, generator=generator
                )
        else:
            dq = dequantize(
                k,
                levels,
                scale,
                shift,
                method=dequantization,
                schedule=schedule,
                t_min=t_min,
                generator=generator,
                dtype=dtype,
            )
        if schedule is None:
            logp = model(dq.y)
        else:
            res = log_likelihood(
                model, schedule, dq.y, t_min=t_min, generator=generator, **likelihood_kwargs
            )
            logp, nfe = res.logp, nfe + res.nfe
        nlls.append(-logp - dq.entropy)
    d = dq.y[0].numel()
    per_repeat = torch.stack(nlls)  # (R, B)
    nll, se = mean_se(per_repeat, dim=0)
    return BPDResult(
        bpd=nats_to_bpd(nll, d),
        nll=nll,
        se=nats_to_bpd(se, d),
        nfe=nfe,
        levels=levels,
        scale=float(scale),
        shift=float(shift),
        dequantization=dequantization,
        per_repeat=per_repeat,
    )


@dataclass(frozen=True)
class EvaluationResult:
    """Likelihood of a whole data set: per-example values and mean ± standard error.

    Attributes:
        nll: per-example negative log-likelihood (or its bound) in nats, ``(N,)``.
        bpd: per-example bits/dim, ``(N,)``.
        nll_mean, nll_se, bpd_mean, bpd_se: mean and standard error over examples.
        estimator: ``"ode"``, ``"elbo"`` or ``"scoreflow"``.
        dequantization: ``"uniform"``, ``"truncated_normal"``, or ``"none"`` for
            continuous data (then bpd is nats / (D log 2) of a density, not of a discrete law).
        nfe: total ODE function evaluations (0 for the bounds).
        per_repeat: ``(R, N)`` nats of each of the R dequantization/probe repeats of discrete
            data (``nll`` is their mean), ``None`` for continuous data; with R > 1,
            :func:`sdelab.likelihood.repeats.repeat_statistics` of ``per_repeat.T`` splits the standard
            error into its image and repeat parts.
    """

    nll: Tensor
    bpd: Tensor
    nll_mean: float
    nll_se: float
    bpd_mean: float
    bpd_se: float
    estimator: str
    dequantization: str
    nfe: int
    per_repeat: Tensor | None = None

    def __str__(self) -> str:
        return (
            f"{self.nll_mean:.4f} ± {self.nll_se:.4f} nats, {self.bpd_mean:.4f} ± "
            f"{self.bpd_se:.4f} bits/dim over {self.nll.numel()} examples "
            f"({self.estimator}, dequantization: {self.dequantization})"
        )


ESTIMATORS: tuple[str, ...] = ("ode", "elbo", "scoreflow")


def evaluate_likelihood(
    score_fn: ScoreFn,
    schedule: Schedule,
    batches: Iterable[Tensor | tuple | list],
    *,
    estimator: Literal["ode", "elbo", "scoreflow"] = "ode",
    levels: int | None = None,
    scale: float | None = None,
    shift: float | None = None,
    dequantization: Literal["uniform", "truncated_normal", "variational"] = "uniform",
    dequantizer: torch.nn.Module | None = None,
    n_repeats: int = 1,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    progress: bool = True,
    **kwargs,
) -> EvaluationResult:
    """Evaluate a data set batch by batch, with a progress bar; the CLI's ``likelihood`` command.

    Two kinds of data:

    - **discrete** (``levels`` given): each batch holds integer levels k ∈ {0..levels−1}; they
      are dequantized and mapped to model space y = scale·(k + u)/levels + shift by
      :func:`bits_per_dim`, whose accounting gives a bound on −log P(k).
    - **continuous** (``levels`` None): each batch is model-space data; the result is the
      density's −log p(x) and bpd = nats / (D log 2) (``dequantization="none"``).

    Args:
        score_fn, schedule: the model.
        batches: an iterable of tensors ``(B, ...)`` or of tuples/lists whose first element is
            the data (a ``DataLoader`` with labels works).
        estimator: ``"ode"`` (:func:`~sdelab.likelihood.log_likelihood`), ``"elbo"`` or
            ``"scoreflow"`` (bounds).
        levels, scale, shift: discrete data's level count and affine map to model space.
        dequantization, dequantizer, n_repeats: see :func:`bits_per_dim`.
        generator: randomness (dequantization noise, probes, bound samples).
        device: move each batch there first (default: leave it).
        progress: show a tqdm bar.
        **kwargs: passed to the estimator (e.g. ``rtol``, ``divergence``, ``n_samples``).

    Returns:
        :class:`EvaluationResult` with per-example nats and bpd and their mean ± standard error.

    Raises:
        ValueError: unknown estimator, empty data set, ``scale``/``shift`` missing for discrete
            data, or bad data (see ``bits_per_dim``).
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown estimator {estimator!r}: choose one of {', '.join(ESTIMATORS)}")
    if levels is not None and (scale is None or shift is None):
        raise ValueError(
            "discrete data needs its map to model space: pass scale and shift "
            "(e.g. scale=2, shift=-1 for a model trained on [-1, 1])"
        )

    if estimator == "ode":
        model, model_schedule, model_kwargs = score_fn, schedule, kwargs
    else:
        bound = elbo if estimator == "elbo" else scoreflow_bound

        def model(y: Tensor) -> Tensor:  # a lower bound on log p(y) is a valid log-density here
            return -bound(score_fn, schedule, y, generator=generator, **kwargs).nll_bound

        model_schedule, model_kwargs = None, {}

    nll, repeats, nfe, dim = [], [], 0, 0
    total = len(batches) if hasattr(batches, "__len__") else None
    with torch.no_grad():
        for batch in tqdm(batches, total=total, disable=not progress, desc="likelihood"):
            data = batch[0] if isinstance(batch, tuple | list) else batch
            if device is not None:
                data = data.to(device)
            if levels is not None:  # discrete: dequantize and account (bits_per_dim checks)
                res = bits_per_dim(
                    model,
                    data,
                    levels,
                    scale,
                    shift,
                    schedule=model_schedule,
                    n_repeats=n_repeats,
                    dequantization=dequantization,
                    dequantizer=dequantizer,
                    generator=generator,
                    **model_kwargs,
                )
                nll.append(res.nll)
                repeats.append(res.per_repeat)
                nfe += res.nfe
            elif estimator == "ode":  # continuous: the density itself
                res = log_likelihood(score_fn, schedule, data, generator=generator, **kwargs)
                nll.append(res.nll)
                nfe += res.nfe
            else:  # a bound of continuous data (the bound checks the batch)
                nll.append(-model(data))
            dim = data[0].numel()
    if not nll:
        raise ValueError("the data set is empty: batches yielded nothing")
    nll_all = torch.cat(nll)
    bpd_all = nats_to_bpd(nll_all, dim)
    nll_mean, nll_se = mean_se_float(nll_all)
    bpd_mean, bpd_se = mean_se_float(bpd_all)
    return EvaluationResult(
        nll=nll_all,
        bpd=bpd_all,
        nll_mean=nll_mean,
        nll_se=nll_se,
        bpd_mean=bpd_mean,
        bpd_se=bpd_se,
        estimator=estimator,
        dequantization="none" if levels is None else dequantization,
        nfe=nfe,
        per_repeat=torch.cat(repeats, dim=1) if repeats else None,
    )


def evaluate_sharded(
    score_fn,
    schedule,
    data: torch.Tensor,
    *,
    estimator: str = "ode",
    batch_size: int = 1000,
    seed: int = 0,
    device: torch.device | str = "cpu",
    progress: bool = False,
    cached: Callable[[int], EvaluationResult | None] | None = None,
    on_batch: Callable[[int, EvaluationResult], None] | None = None,
    **kwargs,
) -> EvaluationResult:
    """:func:`evaluate_likelihood` of ``data`` ``(N, ...)`` (integer levels with
    ``levels``/``scale``/``shift`` in ``kwargs``)
    split over the launched processes (one process: all of it, in order).

    Batch i (rows ``i·batch_size …``) is evaluated by process i mod N alone with a generator
    seeded by (seed, i); no collective runs until every process has finished its batches, so
    batches needing very different numbers of adaptive steps cannot deadlock. Every process
    returns the full result, per-example values in data order, equal to the single-process one.
    ``kwargs`` go to the estimator (``rtol``, ``divergence``, ...).

    Pre-emption: ``cached(i)`` may return batch i's result from an earlier, interrupted
    evaluation (it is then not recomputed) and ``on_batch(i, result)`` is called after each
    batch is computed (to store it). Since batch i's randomness depends only on (seed, i), a
    resumed evaluation gives exactly the per-example values of an uninterrupted one.
    """
    info = distributed.get_info()
    batches = data.split(batch_size)
    mine = distributed.shard(len(batches), info)
    local = []
    total = sum(len(batches[i]) for i in mine)
    bar = Progress(total, "likelihood", "examples", enabled=progress and info.is_main)
    with torch.no_grad(), bar:  # inference: the estimators enable grad internally where needed
        for i in mine:
            done = bar.n
            res = cached(i) if cached is not None else None
            if res is None:
                if estimator == "ode":  # the ODE runs from t_min to T: how far within the batch
                    scored = TimeProgress(
                        score_fn, bar, done, len(batches[i]), schedule.t_min, schedule.T
                    )
                else:
                    scored = score_fn
                res = evaluate_likelihood(
                    scored,
                    schedule,
                    [batches[i].to(device)],
                    estimator=estimator,
                    generator=chunk_generator(seed, LIKELIHOOD_STREAM, i, torch.device(device)),
                    progress=False,
                    **kwargs,
                )
                if on_batch is not None:
                    on_batch(i, _to_cpu(res))
            local.append((i, res))
            bar.set(done + len(batches[i]))
    parts = distributed.gather_indexed([(i, _to_cpu(r)) for i, r in local], info)
    return _concat(parts, dim=data[0].numel())


def _to_cpu(res: EvaluationResult) -> EvaluationResult:
    rep = None if res.per_repeat is None else res.per_repeat.cpu()
    return replace(res, nll=res.nll.cpu(), bpd=res.bpd.cpu(), per_repeat=rep)


def _concat(parts: list[EvaluationResult], dim: int) -> EvaluationResult:
    """One result from per-batch ones (in order): per-example values, mean ± SE, total NFE."""
    nll = torch.cat([p.nll for p in parts])
    bpd = nats_to_bpd(nll, dim)
    (nll_mean, nll_se), (bpd_mean, bpd_se) = mean_se_float(nll), mean_se_float(bpd)
    return EvaluationResult(
        nll=nll,
        bpd=bpd,
        nll_mean=nll_mean,
        nll_se=nll_se,
        bpd_mean=bpd_mean,
        bpd_se=bpd_se,
        estimator=parts[0].estimator,
        dequantization=parts[0].dequantization,
        nfe=sum(p.nfe for p in parts),
        per_repeat=None
        if parts[0].per_repeat is None
        else torch.cat([p.per_repeat for p in parts], dim=1),
    )
