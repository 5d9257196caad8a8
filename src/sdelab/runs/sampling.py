"""Samples of a trained run: chunked, seeded per chunk, split over launched processes
(:func:`sample_chunks`), plain (:func:`sample_run`) or class-guided (:func:`guided_sample_run`)."""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from sdelab import distributed, streams
from sdelab.controllable import cfg_score_fn, guided_score_fn
from sdelab.progress import Progress, TimeProgress
from sdelab.runs.core import LoadedRun, check_finite_samples, open_run
from sdelab.samplers import SampleResult, sample
from sdelab.sde import Schedule
from sdelab.train.classifier import load_classifier
from sdelab.utils import chunk_generator


def sample_run(
    run: str | Path | LoadedRun,
    *,
    n: int,
    sampler: str = "euler_maruyama",
    steps: int = 1000,
    seed: int = 0,
    which: str = "ema",
    options: dict[str, Any] | None = None,
    return_trajectory: bool = False,
    batch_size: int | None = None,
    guide: Callable[[Any, Any, Any], Callable] | None = None,
    progress: bool = False,
    cached: Callable[[int], SampleResult | None] | None = None,
    on_chunk: Callable[[int, SampleResult], None] | None = None,
) -> SampleResult:
    """Draw ``n`` samples from a trained run with any sampler in ``sdelab.samplers.SAMPLERS``.

    ``guide(config, model, schedule) -> score_fn`` (optional) replaces the run's score by
    another built from it, e.g. classifier guidance (:func:`guided_sample_run`);
    it may raise ``ValueError`` when the run does not fit.

    The samples are drawn in chunks of ``batch_size`` (default: all ``n`` at once); chunk i
    is seeded by (seed, i) and, under a launcher, drawn by process i mod N — the result is the
    same for any number of processes. ``nfe`` is the largest NFE of any chunk (the work per
    sample). ``return_trajectory`` needs a single chunk in a single process. ``progress``:
    show how far the chunks are from T to t_min, with an ETA (:class:`~sdelab.progress.Progress`).

    Raises ValueError when a sample is not finite (NaN/inf: a diverged run or an unstable
    sampler), naming how many.
    """
    loaded = open_run(run, which)
    config, model, schedule = loaded.config, loaded.model, loaded.schedule
    shape = config.model.image_shape or [config.model.dim]  # U-Net runs sample (n, C, H, W)
    score_fn = model if guide is None else guide(config, model, schedule)
    return sample_chunks(
        score_fn,
        schedule,
        tuple(shape),
        n=n,
        sampler=sampler,
        steps=steps,
        seed=seed,
        options=options,
        batch_size=batch_size,
        device=next(iter(model.parameters())).device,
        return_trajectory=return_trajectory,
        progress=progress,
        source=f"the run {loaded.run_dir}",
        cached=cached,
        on_chunk=on_chunk,
    )


def sample_chunks(
    score_fn: Callable,
    schedule: Schedule,
    shape: tuple[int, ...],
    *,
    n: int,
    sampler: str,
    steps: int,
    seed: int = 0,
    options: dict[str, Any] | None = None,
    batch_size: int | None = None,
    device: torch.device | str = "cpu",
    return_trajectory: bool = False,
    progress: bool = False,
    source: str = "the model",
    cached: Callable[[int], SampleResult | None] | None = None,
    on_chunk: Callable[[int, SampleResult], None] | None = None,
) -> SampleResult:
    """``n`` samples of shape ``shape`` each in chunks of ``batch_size`` (default all at once):
    chunk i seeded by (seed, i) and, under a launcher, drawn by process i mod N, gathered in
    order — the result does not depend on the number of processes. ``nfe`` is the largest of
    any chunk (the work per sample); ``return_trajectory`` needs one chunk and one process.
    ``progress`` shows how far the chunks are from T to t_min; ``source`` names the model in
    the error for samples that are not finite (:func:`check_finite_samples`). Pre-emption:
    ``cached(i)`` may return chunk i from an interrupted run (not redrawn) and
    ``on_chunk(i, result)`` is called after each chunk is drawn (to store it); chunk i depends
    only on (seed, i), so a resumed draw equals an uninterrupted one."""
    if n < 1:
        raise ValueError(f"--n must be a positive number of samples, got {n}")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"--batch-size must be positive, got {batch_size}")
    _check_fits(n, shape, steps)
    info = distributed.get_info()
    size = n if batch_size is None else min(batch_size, n)
    n_chunks = math.ceil(n / size)
    if return_trajectory and (n_chunks > 1 or info.enabled):
        raise ValueError("return_trajectory needs one chunk (batch_size >= n) and one process")
    mine = distributed.shard(n_chunks, info)
    total = sum(min(size, n - i * size) for i in mine)
    bar = Progress(total, "sample", "samples", enabled=progress and info.is_main)
    local = []
    with torch.no_grad(), bar:
        for k, i in enumerate(mine):
            b = min(size, n - i * size)
            res = cached(i) if cached is not None else None
            if res is not None:
                local.append((i, res))
                bar.set(k * size + b)
                continue
            res = sample(
                TimeProgress(score_fn, bar, k * size, b, schedule.T, schedule.t_min),
                schedule,
                (b, *shape),
                sampler=sampler,
                steps=steps,
                generator=chunk_generator(seed, streams.RUN_SAMPLES, i, device),
                device=device,
                return_trajectory=return_trajectory,
                **(options or {}),
            )
            bar.set(k * size + b)
            if return_trajectory:
                check_finite_samples(res.samples, source)
                return res
            res = replace(res, samples=res.samples.cpu())
            if on_chunk is not None:
                on_chunk(i, res)
            local.append((i, res))
    parts = distributed.gather_indexed(local, info)
    samples = torch.cat([p.samples for p in parts])
    check_finite_samples(samples, source)
    # every chunk ran the same grid and options; nfe is the largest (the work per sample)
    return replace(
        parts[0],
        samples=samples,
        nfe=max(p.nfe for p in parts),
        grid_times=None if parts[0].grid_times is None else parts[0].grid_times.cpu(),
    )


def _check_fits(n: int, shape: tuple[int, ...], steps: int) -> None:
    """Refuse, in one line before any work, ``n`` samples whose float32 values alone exceed
    this machine's memory, or a time grid of ``steps`` (float64) that does."""
    try:
        have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # not available on this platform
        return
    need = 4 * n * math.prod(shape)
    if need > have:
        raise ValueError(
            f"{n:,} samples of {math.prod(shape):,} numbers need {need / 2**30:,.1f} GiB, more "
            f"than this machine's {have / 2**30:,.1f} GiB of memory: draw fewer (--n)"
        )
    if 8 * (steps + 1) > have:
        raise ValueError(
            f"a time grid of {steps:,} steps needs {8 * (steps + 1) / 2**30:,.1f} GiB, more than "
            f"this machine's {have / 2**30:,.1f} GiB of memory: take fewer --steps"
        )


def guided_sample_run(
    run: str | Path | LoadedRun,
    classifier_dir: str | Path | None,
    label: int,
    *,
    scale: float = 1.0,
    n: int = 1000,
    sampler: str = "euler_maruyama",
    steps: int = 1000,
    seed: int = 0,
    which: str = "ema",
    options: dict[str, Any] | None = None,
    batch_size: int | None = None,
    progress: bool = False,
) -> SampleResult:
    """Class-conditional samples of a trained run, drawn by :func:`sample_run`
    (same chunking, device and processes).

    With ``classifier_dir`` (from :func:`sdelab.train.classifier.train_classifier`): classifier
    guidance of the run's (unconditional) score, s + scale · ∇ log p_t(label | x). Without it
    the run must be class-conditional (``model.num_classes``): classifier-free guidance
    s(x, t, ∅) + scale · (s(x, t, label) − s(x, t, ∅))
    (:func:`sdelab.controllable.cfg_score_fn`). ``scale`` means the same in both: 0
    unconditional, 1 conditional, > 1 guided.

    Raises ValueError for a class index out of range, a classifier trained for another
    schedule or data dimension, no classifier for an unconditional run, or a scale other than
    1 on a conditional run trained without label dropout.
    """
    if n < 1:
        raise ValueError(f"--n must be a positive number of samples, got {n}")
    loaded = open_run(run, which)
    net, meta = load_classifier(classifier_dir) if classifier_dir is not None else (None, {})
    if net is not None and not 0 <= label < meta["num_classes"]:
        raise ValueError(
            f"class index {label} out of range: the classifier has {meta['num_classes']} classes"
        )

    def guide(config, model, schedule):
        k = config.model.num_classes
        if net is None:
            if not k:
                raise ValueError(
                    f"run {loaded.run_dir} is unconditional (model.num_classes=0): pass "
                    "--classifier DIR from sdelab train-classifier for classifier guidance, or "
                    "train with model.num_classes=K for classifier-free guidance"
                )
            if not 0 <= label < k:
                raise ValueError(
                    f"class index {label} out of range: the run has {k} classes (0…{k - 1})"
                )
            if scale != 1 and config.model.label_dropout == 0:
                raise ValueError(
                    f"run {loaded.run_dir} was trained without label dropout "
                    "(model.label_dropout=0), so its null class is untrained: use --guidance 1 "
                    "(the conditional score) or retrain with model.label_dropout=0.1"
                )
            return cfg_score_fn(model, label, scale, num_classes=k)
        if meta["dim"] != config.model.dim:
            raise ValueError(
                f"classifier for data dimension {meta['dim']}, run of dimension {config.model.dim}"
            )
        if meta["sde"] != {"name": config.sde.name, "kwargs": config.sde.kwargs}:
            raise ValueError(f"classifier trained with sde {meta['sde']}, run uses {config.sde}")
        return guided_score_fn(model, net, label, scale, num_classes=meta["num_classes"])

    return sample_run(
        loaded,
        n=n,
        sampler=sampler,
        steps=steps,
        seed=seed,
        which=which,
        options=options,
        batch_size=batch_size,
        guide=guide,
        progress=progress,
    )
