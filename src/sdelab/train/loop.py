r"""The training loop, as a few small functions.

:func:`~sdelab.train.build.build_run` makes everything a run holds
(:class:`~sdelab.train.build.Run`), :func:`train_step` does one optimizer step of the run's
objective (:mod:`sdelab.train.objectives`), :func:`update_ema` the moving average,
:func:`evaluate` calls the optional evaluation hook, :mod:`sdelab.train.rundir` applies the
rules of ``--resume``, and :func:`train` strings them together in the shared
:class:`~sdelab.train.skeleton.TrainSkeleton`.

Randomness: three independent streams derived from ``train.seed`` — model initialisation, data
batches (a CPU generator) and loss times/noise (a generator on the training device); each
evaluation gets its own generator seeded by (seed, step), so evaluating never changes
training. With the generators' states in the checkpoint, a resumed run repeats an
uninterrupted one exactly (bit for bit on CPU).

The folder's lock, checkpoints, logs, progress and signals are those of the shared
:class:`~sdelab.train.skeleton.TrainSkeleton`: SIGTERM and SIGINT finish the current step, save
a checkpoint and raise :class:`~sdelab.train.skeleton.TrainingInterrupted`. A non-finite loss or
gradient stops the run before the bad update with :class:`TrainingError`; a checkpoint of the
weights that gave it is moved to ``checkpoints/diverged/``, so ``--resume`` continues from one
from before the divergence.

Many processes (``torchrun`` / ``accelerate launch``, see :mod:`sdelab.distributed`): every
rank draws the same global batch, times and noise from the same generators and keeps its
slice (rows ``rank·B/N …``), split further into ``train.grad_accum`` micro-batches; gradients
are averaged by ``DistributedDataParallel``. So N processes take the same optimizer steps as
one (up to float rounding), every rank's generator state is the same, and a checkpoint of an
N-process run resumes in any number of processes. EMA, logs, evaluation and checkpoints happen
on rank 0 only; a signal seen by any rank stops all of them after the same step. One process
takes the same code path, with one micro-batch.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from sdelab import distributed, streams
from sdelab.data import Dataset
from sdelab.parametrization import ScoreModel
from sdelab.plots import plot_loss
from sdelab.sde import Schedule
from sdelab.train.build import (
    Run,
    build_resolved_run,
    check_world,
    local_device,
    make_run_dataset,
    resolve_config,
    resolve_device,
)
from sdelab.train.checkpoint import list_checkpoints, load_checkpoint
from sdelab.train.config import OptimConfig, RunConfig
from sdelab.train.memory import check_memory
from sdelab.train.objectives import OBJECTIVES
from sdelab.train.periodic import epoch_steps, write_samples
from sdelab.train.rundir import (
    EVAL_FILE,
    METRICS_FILE,
    check_run_dir,
    init_from,
    merge_for_resume,
    require_tensorboard,
    run_state,
    update_best,
    write_config,
)
from sdelab.train.skeleton import TrainingInterrupted, TrainSkeleton, ema_decay_at, update_ema
from sdelab.utils import derive_seed

__all__ = [
    "EvalContext",
    "EvalHook",
    "StepStats",
    "TrainResult",
    "TrainingError",
    "TrainingInterrupted",
    "ema_decay_at",
    "evaluate",
    "lr_at",
    "train",
    "train_step",
    "update_ema",
]


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. a non-finite loss); the message says what to change."""


@dataclass(frozen=True)
class StepStats:
    """What one optimizer step reports."""

    loss: float
    grad_norm: float
    lr: float


@dataclass(frozen=True)
class EvalContext:
    """What an evaluation hook receives.

    ``model`` is the EMA :class:`ScoreModel` (eval mode; gradients enabled, so divergence
    estimators work), ``raw_model`` the trained weights, ``test_data`` the run's fixed held-out
    set ``(eval.n_test, D)`` on the device, ``generator`` a fresh generator seeded by
    (seed, step) — use it for all randomness so evaluating never changes training —, and
    ``dataset`` the run's dataset (its levels and map to model space, for bits/dim).
    """

    step: int
    model: ScoreModel
    raw_model: ScoreModel
    schedule: Schedule
    test_data: Tensor
    config: RunConfig
    generator: torch.Generator
    run_dir: Path
    dataset: Dataset


#: ``hook(ctx) -> {"name": value}``: metrics logged to eval.jsonl (numbers also to TensorBoard).
EvalHook = Callable[[EvalContext], Mapping[str, float | str]]


@dataclass(frozen=True)
class TrainResult:
    """What :func:`train` returns."""

    run_dir: Path
    step: int
    last_loss: float | None
    checkpoint: Path | None


# ---- one step --------------------------------------------------------------------------------
def train_step(run: Run) -> StepStats:
    """One optimizer step on a fresh batch of the run's objective; raises
    :class:`TrainingError` (without updating the weights) if the loss or the gradient norm is
    not finite."""
    cfg = run.config
    objective = OBJECTIVES[cfg.loss.objective]
    x0, labels = objective.batch(run)
    lr = lr_at(cfg.optim, run.step, cfg.train.steps)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    run.optimizer.zero_grad(set_to_none=True)
    loss = objective.backward(run, x0, labels)  # the global batch mean, the same on every rank
    if not torch.isfinite(loss):
        raise TrainingError(f"loss is {float(loss)} at step {run.step + 1}")
    if run.scaler is not None:
        run.scaler.unscale_(run.optimizer)
    max_norm = cfg.optim.grad_clip if cfg.optim.grad_clip is not None else math.inf
    grad_norm = torch.nn.utils.clip_grad_norm_(run.model.parameters(), max_norm)
    if run.scaler is not None:  # fp16: an overflowing step is skipped and the scale lowered
        run.scaler.step(run.optimizer)
        run.scaler.update()
    else:
        if not torch.isfinite(grad_norm):
            raise TrainingError(f"gradient norm is {float(grad_norm)} at step {run.step + 1}")
        run.optimizer.step()
    run.step += 1
    if run.dist.is_main:  # the other ranks never read their EMA
        update_ema(run.ema, run.model, ema_decay_at(cfg.train.ema_decay, run.step))
    return StepStats(loss=float(loss.detach()), grad_norm=float(grad_norm), lr=lr)


def lr_at(optim: OptimConfig, step: int, total_steps: int | None = None) -> float:
    """Learning rate of update number ``step + 1``: linear warm-up over ``warmup_steps``
    (lr·1/W, lr·2/W, …, lr), then constant (``optim.schedule: constant``) or a cosine decay
    from lr at the end of the warm-up to ``optim.min_lr_ratio``·lr at update ``total_steps``
    (``optim.schedule: cosine``; ``total_steps`` is ``train.steps``)."""
    n = step + 1
    if optim.warmup_steps and n < optim.warmup_steps:
        return optim.lr * n / optim.warmup_steps
    if optim.schedule == "constant":
        return optim.lr
    if total_steps is None:
        raise ValueError("optim.schedule=cosine needs the run's total number of steps")
    peak = max(optim.warmup_steps, 1)  # the update at which the decay starts from lr
    progress = min(1.0, max(0.0, (n - peak) / max(1, total_steps - peak)))
    low = optim.min_lr_ratio * optim.lr
    return low + (optim.lr - low) * 0.5 * (1.0 + math.cos(math.pi * progress))


# ---- evaluation, logging ---------------------------------------------------------------------
def evaluate(run: Run, hook: EvalHook) -> dict[str, float | str]:
    """Call ``hook`` on the EMA model with the fixed test set; returns its metrics as floats
    (strings, e.g. the likelihood policy's tag, pass through)."""
    test = run.dataset.test_set(run.config.eval.n_test).to(run.device)
    gen = torch.Generator(device=run.device).manual_seed(
        derive_seed(run.config.train.seed, streams.TRAIN_EVAL, run.step)
    )
    ctx = EvalContext(
        step=run.step,
        model=run.ema.eval(),
        raw_model=run.model,
        schedule=run.ema.schedule,  # a learned schedule is averaged with the weights
        test_data=test,
        config=run.config,
        generator=gen,
        run_dir=run.run_dir,
        dataset=run.dataset,
    )
    try:
        return {str(k): v if isinstance(v, str) else float(v) for k, v in hook(ctx).items()}
    finally:
        run.ema.train()


# ---- the loop --------------------------------------------------------------------------------
def train(
    config: RunConfig,
    run_dir: str | Path,
    *,
    resume: bool = False,
    eval_hook: EvalHook | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train ``config`` in ``run_dir``, checkpointing as configured.

    Args:
        config: the run config (``model.dim`` is filled in from the data).
        run_dir: the run folder; it must be empty or absent unless ``resume``.
        resume: continue from the newest checkpoint in ``run_dir`` (from step 0 if there is
            none). Only :data:`RESUMABLE_KEYS` may differ from the saved config.
        eval_hook: ``hook(EvalContext) -> {name: value}``, called every ``train.eval_every``
            steps and after the last one (when ``eval_every > 0``).
        progress: show progress with an ETA and the loss on stderr
            (:class:`~sdelab.progress.Progress`: a bar on a terminal, plain lines otherwise).

    The folder is locked (``.lock``, :class:`~sdelab.train.rundir.RunLock`) while training;
    a folder this call created is removed again if it fails before writing anything.

    Writes ``config.yaml``, ``config.json``, ``metrics.jsonl`` (step, loss, grad_norm, lr,
    steps_per_s, every ``log_every`` steps and at the end), ``eval.jsonl``,
    ``checkpoints/`` and ``loss.png``.

    Raises:
        ConfigError: non-empty run folder without ``resume``, incompatible config, missing
            TensorBoard or device, a model too large to allocate, a folder locked by another
            live process (:class:`~sdelab.train.rundir.RunLockedError`).
        TrainingError: non-finite loss or gradient (a checkpoint of the weights that gave it
            is moved to ``checkpoints/diverged/``; the message says what to resume).
        TrainingInterrupted: SIGTERM/SIGINT, after saving a checkpoint.
    """
    run_dir = Path(run_dir)
    device = resolve_device(config.train.device)  # resolved once, for the group and the run
    info = distributed.init(device)
    device = local_device(device, info)  # cuda:LOCAL_RANK under a launcher
    check_run_dir(run_dir, resume)
    distributed.barrier(info)  # every rank has checked the folder before rank 0 writes to it
    if config.train.tensorboard:
        require_tensorboard()  # fail before any work
    dataset = make_run_dataset(config)  # built once: resolving, checking and training use it
    config = resolve_config(config, dataset)
    check_world(config, info)
    tc = config.train  # the loop's keys are the given config's, on resume too
    skeleton = TrainSkeleton(
        run_dir,
        "sdelab train",
        steps=tc.steps,
        ckpt_every=tc.ckpt_every,
        log_every=tc.log_every,
        keep_last=tc.keep_last,
        resume=resume,
        progress=progress,
        tensorboard=tc.tensorboard,
        dist=info,
    )
    with skeleton:
        resuming = skeleton.resuming
        if resuming:
            config = merge_for_resume(load_checkpoint(run_dir).config, config, run_dir)
        run = build_resolved_run(config, run_dir, info, dataset, device)
        if resuming:
            run.step = skeleton.restore(run_state(run))
        elif config.train.init_from:
            init_from(run, config.train.init_from)
        if info.is_main:
            write_config(run_dir, run.config)
        if run.config.train.memory_check:
            try:
                check_memory(run, train_step)  # parameter count and one trial step's peak memory
            except TrainingError:
                pass  # a non-finite first step: the loop meets it again and says what to do
        metrics = skeleton.run(
            run_state(run),
            lambda: _step(run),
            config=run.config,
            after_step=_after_step(run, skeleton, eval_hook),
        )
        if info.is_main:
            _plot(run_dir)
    last_loss = None if metrics is None else metrics["loss"]
    return TrainResult(
        run_dir=run_dir, step=run.step, last_loss=last_loss, checkpoint=skeleton.checkpoint
    )


def _step(run: Run) -> dict[str, float]:
    """:func:`train_step`, with what to do after a non-finite loss in its error."""
    try:
        return vars(train_step(run))
    except TrainingError as e:
        raise TrainingError(_diverged_advice(e, run)) from None


def _after_step(
    run: Run, skeleton: TrainSkeleton, eval_hook: EvalHook | None
) -> Callable[[int, bool], bool]:
    """What ``sdelab train`` does after each step: evaluation (``eval.jsonl``, the best
    checkpoint), sample grids; it asks for a checkpoint after a new best and at each
    ``train.ckpt_every_epochs``."""
    tc, info = run.config.train, run.dist
    every_epochs = epoch_steps(run)  # train.ckpt_every_epochs in steps (0: off)

    def after(step: int, last: bool) -> bool:
        due = tc.eval_every and (step % tc.eval_every == 0 or last)
        best = False
        if eval_hook is not None and due and info.is_main:
            metrics = evaluate(run, eval_hook)
            assert skeleton.log is not None  # open while the skeleton runs
            skeleton.log.write(EVAL_FILE, {"step": step, **metrics})
            best = update_best(run, metrics)  # eval.select_best: keep this checkpoint
        if due and eval_hook is not None:  # the same steps on every rank: one collective
            best = distributed.any_rank(best, info)
        if tc.sample_every and (step % tc.sample_every == 0 or last) and info.is_main:
            write_samples(run)
        return bool(best or (every_epochs and step % every_epochs == 0))

    return after


def _diverged_advice(error: TrainingError, run: Run) -> str:
    """What to do after a non-finite loss at step ``run.step + 1``: resume from a checkpoint
    from before the divergence with a lower learning rate or a tighter gradient clip (both may
    change on ``--resume``).

    The loss of step n is computed with the weights of step n - 1, so a checkpoint of step
    ``run.step`` holds exactly the weights that gave the non-finite loss: resuming from it
    would diverge again whatever the learning rate. Rank 0 moves it aside
    (``checkpoints/diverged/``, kept) so that ``--resume`` takes the one before; with
    none before, ``--resume`` starts the run afresh from step 0 with its saved config.
    """
    o = run.config.optim
    clip = 1.0 if o.grad_clip is None else o.grad_clip / 10
    fix = f"optim.lr={o.lr / 10:g} or optim.grad_clip={clip:g}"
    moved = _set_aside(run.run_dir, run.step) if run.dist.is_main else None
    gave = f"step {run.step}'s weights gave it" + (
        f" (their checkpoint moved to {moved})" if moved is not None else ""
    )
    good = [(s, p) for s, p in list_checkpoints(run.run_dir) if s < run.step]
    if good:
        kept = f"{gave}; the checkpoint from before the divergence {good[-1][1]} is kept"
        how = "continue from it with a lower learning rate or a tighter clip"
    else:
        kept = f"{gave}; no checkpoint from before the divergence is usable"
        how = (
            "a fresh run is needed, from step 0 with the saved config and a lower learning "
            "rate or a tighter clip"
        )
    return (
        f"{error}: training stopped, {kept}; {how}: sdelab train --resume --out {run.run_dir} {fix}"
    )


def _set_aside(run_dir: Path, step: int) -> Path | None:
    """Move the checkpoint of ``step`` into ``checkpoints/diverged/`` (kept, but no longer a
    checkpoint that ``--resume`` or ``keep_last`` sees); returns its new JSON path, or ``None``
    if there is none."""
    found = dict(list_checkpoints(run_dir))
    if step not in found:
        return None
    json_path = found[step]
    dest = json_path.parent / "diverged" / json_path.name
    dest.parent.mkdir(exist_ok=True)
    os.replace(json_path, dest)  # first: without its JSON the tensors are no checkpoint
    tensors = json_path.with_suffix(".safetensors")
    if tensors.exists():
        os.replace(tensors, dest.with_suffix(".safetensors"))
    return dest


def _plot(run_dir: Path) -> None:
    if (run_dir / METRICS_FILE).exists():
        plot_loss(run_dir / METRICS_FILE, run_dir / "loss.png")
