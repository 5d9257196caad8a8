r"""The training loop, as a few small functions.

:func:`~sdelab.train.build.build_run` makes everything a run holds
(:class:`~sdelab.train.build.Run`), :func:`train_step` does one optimizer step of the run's
objective (:mod:`sdelab.train.objectives`), :func:`update_ema` the moving average,
:func:`evaluate` calls the optional evaluation hook, :mod:`sdelab.train.rundir` writes the logs
and checkpoints and applies the rules of ``--resume``, and :func:`train` strings them together.

Randomness: three independent streams derived from ``train.seed`` — model initialisation, data
batches (a CPU generator) and loss times/noise (a generator on the training device); each
evaluation gets its own generator seeded by (seed, step), so evaluating never changes
training. With the generators' states in the checkpoint, a resumed run repeats an
uninterrupted one exactly (bit for bit on CPU).

Signals: SIGTERM and SIGINT finish the current step, save a checkpoint and raise
:class:`TrainingInterrupted`. A non-finite loss or gradient stops the run before the bad update
with :class:`TrainingError`; a checkpoint of the weights that gave it is moved to
``checkpoints/diverged/``, so ``--resume`` continues from one from before the divergence.

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
import signal
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from sdelab import distributed, streams
from sdelab.data import Dataset
from sdelab.parametrization import ScoreModel
from sdelab.plots import plot_loss
from sdelab.progress import Progress
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
from sdelab.train.checkpoint import CKPT_DIR, list_checkpoints, load_checkpoint
from sdelab.train.config import OptimConfig, RunConfig
from sdelab.train.memory import check_memory
from sdelab.train.objectives import OBJECTIVES
from sdelab.train.periodic import epoch_steps, write_samples
from sdelab.train.rundir import (
    EVAL_FILE,
    METRICS_FILE,
    MetricsLog,
    RunLock,
    RunLockedError,
    StopOnSignal,
    check_run_dir,
    init_from,
    merge_for_resume,
    require_tensorboard,
    restore,
    save,
    truncate_jsonl,
    update_best,
    write_config,
)
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


class TrainingInterrupted(Exception):
    """SIGTERM/SIGINT: a checkpoint was saved at ``step``; resume with ``--resume``."""

    def __init__(self, signum: int, step: int, checkpoint: Path) -> None:
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        name = signal.Signals(signum).name
        super().__init__(
            f"stopped by {name} after step {step}; checkpoint saved to {checkpoint}; "
            "continue with --resume"
        )


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


def ema_decay_at(decay: float, step: int) -> float:
    """EMA decay after update number ``step`` (1-based): min(decay, (1 + step)/(10 + step)),
    the usual warm-up, so a short run's EMA is not dominated by the random initial weights."""
    return min(decay, (1 + step) / (10 + step))


def update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """ema ← decay·ema + (1 − decay)·model for parameters; buffers are copied."""
    with torch.no_grad():
        for e, p in zip(ema.parameters(), model.parameters()):
            if decay == 0:
                e.copy_(p)
            else:
                e.lerp_(p, 1.0 - decay)
        for e, b in zip(ema.buffers(), model.buffers()):
            e.copy_(b)


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
    created = not run_dir.exists()
    lock = _lock_main(run_dir, info)
    try:
        check_run_dir(run_dir, resume)  # again, holding the lock: a run that started first
        has_ckpt = resume and bool(list_checkpoints(run_dir))
        if has_ckpt:
            config = merge_for_resume(load_checkpoint(run_dir).config, config, run_dir)
        run = build_resolved_run(config, run_dir, info, dataset, device)
        if has_ckpt:
            restore(run)
        elif config.train.init_from:
            init_from(run, config.train.init_from)
        if info.is_main:
            write_config(run_dir, run.config)
            for name in (METRICS_FILE, EVAL_FILE):
                truncate_jsonl(run_dir / name, run.step)
        if run.config.train.memory_check:
            try:
                check_memory(run, train_step)  # parameter count and one trial step's peak memory
            except TrainingError:
                pass  # a non-finite first step: the loop meets it again and says what to do
        log = MetricsLog(run_dir, run.config.train.tensorboard, enabled=info.is_main)
        try:
            last_loss, ckpt = _loop(run, log, eval_hook, progress)
        finally:
            log.close()
        if info.is_main:
            _plot(run_dir)
    finally:
        if lock is not None:
            lock.release()
        if created and info.is_main and run_dir.is_dir() and not any(run_dir.iterdir()):
            run_dir.rmdir()  # failed before writing anything: leave no empty folder behind
    return TrainResult(run_dir=run_dir, step=run.step, last_loss=last_loss, checkpoint=ckpt)


def _lock_main(run_dir: Path, info: distributed.DistInfo) -> RunLock | None:
    """Rank 0 locks the run folder; every rank fails together if it cannot."""
    lock, error = None, None
    if info.is_main:
        try:
            lock = RunLock(run_dir, "sdelab train").acquire()
        except RunLockedError as e:
            error = e
    if distributed.any_rank(error is not None, info):
        raise error or RunLockedError(f"rank 0 could not lock {run_dir}")
    return lock


def _loop(
    run: Run, log: MetricsLog, eval_hook: EvalHook | None, progress: bool = True
) -> tuple[float | None, Path | None]:
    tc = run.config.train
    ckpts = list_checkpoints(run.run_dir)
    ckpt: Path | None = ckpts[-1][1] if ckpts else None
    stats: StepStats | None = None
    info = run.dist
    bar = Progress(tc.steps, "train", "steps", initial=run.step, enabled=progress and info.is_main)
    t_last, step_last = time.perf_counter(), run.step
    every_epochs = epoch_steps(run)  # train.ckpt_every_epochs in steps (0: off)
    with StopOnSignal() as stop, bar:
        while run.step < tc.steps:
            try:
                stats = train_step(run)
            except TrainingError as e:
                raise TrainingError(_diverged_advice(e, run)) from None
            last = run.step == tc.steps
            logged = run.step % tc.log_every == 0 or last
            if logged:
                now = time.perf_counter()
                rate = (run.step - step_last) / max(now - t_last, 1e-9)
                t_last, step_last = now, run.step
                log.write(METRICS_FILE, {"step": run.step, **vars(stats), "steps_per_s": rate})
            bar.update(1, loss=stats.loss)
            due = tc.eval_every and (run.step % tc.eval_every == 0 or last)
            best = False
            if eval_hook is not None and due and info.is_main:
                metrics = evaluate(run, eval_hook)
                log.write(EVAL_FILE, {"step": run.step, **metrics})
                best = update_best(run, metrics)  # eval.select_best: keep this checkpoint
            if due and eval_hook is not None:  # the same steps on every rank: one collective
                best = distributed.any_rank(best, info)
            if tc.sample_every and (run.step % tc.sample_every == 0 or last) and info.is_main:
                write_samples(run)
            # every rank stops after the same step, whichever rank saw the signal
            signalled = distributed.any_rank(stop.signum is not None, info)
            stopping = signalled and not last
            epoch_due = every_epochs and run.step % every_epochs == 0
            if run.step % tc.ckpt_every == 0 or epoch_due or last or stopping or best:
                ckpt = _save_main(run, {"loss": stats.loss})
            if stopping:
                raise TrainingInterrupted(stop.signum or signal.SIGTERM, run.step, ckpt)
    return (stats.loss if stats else None), ckpt


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


def _save_main(run: Run, metrics: Mapping[str, float]) -> Path:
    """Rank 0 saves; the others wait for it (a rank exiting early must not cut the save)."""
    path = save(run, metrics) if run.dist.is_main else None
    distributed.barrier(run.dist)
    return path or run.run_dir / CKPT_DIR / f"step_{run.step:08d}.json"


def _plot(run_dir: Path) -> None:
    if (run_dir / METRICS_FILE).exists():
        plot_loss(run_dir / METRICS_FILE, run_dir / "loss.png")
