"""The skeleton every training command runs in: ``sdelab train`` (:mod:`sdelab.train.loop`),
``sdelab train-classifier`` (:mod:`sdelab.train.classifier`) and ``sdelab train-dequantizer``
(:mod:`sdelab.train.dequantizer`). The command supplies one optimizer step; a
:class:`TrainSkeleton` does the rest, the same way for all three:

- the output folder: a new run needs an absent or empty one (``--resume`` otherwise), it is
  locked while the command writes it (:class:`~sdelab.train.rundir.RunLock`: the owner's pid,
  a stale lock taken over), and a folder the command created is removed again if it fails
  before writing anything there;
- resuming: the newest checkpoint is restored into a :class:`~sdelab.train.rundir.TrainState`
  (modules, optimizer, generators), so the loop continues as if it had not stopped (bit for
  bit on CPU), and ``metrics.jsonl`` / ``eval.jsonl`` are cut back to its step;
- the loop: ``metrics.jsonl`` every ``log_every`` steps and at the end (the step's metrics and
  ``steps_per_s``), progress with an ETA on stderr (:class:`~sdelab.progress.Progress`), a
  checkpoint every ``ckpt_every`` steps and after the last (atomic, the newest ``keep_last``
  kept);
- SIGTERM / SIGINT: the current step finishes, a checkpoint is saved, and
  :class:`TrainingInterrupted` names it (the CLI prints that one line and exits 143 / 130).

The moving average of the weights that the loops keep is :func:`update_ema` with the warm-up
:func:`ema_decay_at`.

With a process group (:mod:`sdelab.distributed`) rank 0 locks, logs, shows progress and saves
while the others wait for it; a signal seen by any rank stops every rank after the same step.
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from sdelab import distributed
from sdelab.distributed import DistInfo
from sdelab.progress import Progress
from sdelab.train.checkpoint import CKPT_DIR, list_checkpoints, load_checkpoint
from sdelab.train.config import ConfigError, RunConfig
from sdelab.train.rundir import (
    EVAL_FILE,
    METRICS_FILE,
    MetricsLog,
    RunLock,
    RunLockedError,
    StopOnSignal,
    TrainState,
    check_run_dir,
    flat_config,
    restore_state,
    save_state,
    truncate_jsonl,
)

__all__ = [
    "TrainSkeleton",
    "TrainingInterrupted",
    "ema_decay_at",
    "update_ema",
]


class TrainingInterrupted(Exception):
    """SIGTERM/SIGINT: a checkpoint was saved at ``step``; resume with ``--resume``."""

    def __init__(self, signum: int, step: int, checkpoint: Path) -> None:
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        name = signal.Signals(signum).name
        super().__init__(
            f"stopped by {name} after step {step}; checkpoint saved to {checkpoint}; "
            "continue with --resume"
        )


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


#: ``step_fn() -> {name: value}``: one optimizer step (update number ``skeleton.step + 1``);
#: the metrics are logged to metrics.jsonl.
StepFn = Callable[[], Mapping[str, float]]
#: ``after_step(step, last) -> bool``: called after each step has been logged (evaluation,
#: samples); ``True`` asks for a checkpoint of this step.
AfterStep = Callable[[int, bool], bool]


class TrainSkeleton:
    """The run layer of a training loop (module docstring): a context manager that holds the
    folder's lock, and :meth:`run`, which drives the steps.

    Args:
        folder: the output folder (created if absent).
        command: the command's name (``sdelab train``), recorded in the lock; without its
            ``sdelab`` prefix it labels the progress lines.
        steps: the total number of steps (a resumed loop does the rest).
        ckpt_every, log_every: checkpoint and metrics cadence, in steps (>= 1).
        keep_last: checkpoints kept (``None``: all).
        resume: continue from the folder's newest checkpoint (:attr:`resuming`); without it the
            folder must be absent or empty.
        progress: show progress on stderr.
        tensorboard: mirror the metrics to TensorBoard (``FOLDER/tensorboard``).
        dist: this process's rank (default: a single process).

    ``with TrainSkeleton(...) as skel:`` checks the folder, takes the lock (raising
    :class:`~sdelab.train.rundir.RunLockedError`, a :class:`ConfigError`, when a live process
    holds it) and checks the folder again; leaving releases the lock and removes a folder it
    created that is still empty.

    Raises:
        ConfigError: ``folder`` is a file, or is not empty without ``resume``.
    """

    def __init__(
        self,
        folder: str | Path,
        command: str,
        *,
        steps: int,
        ckpt_every: int,
        log_every: int,
        keep_last: int | None = None,
        resume: bool = False,
        progress: bool = True,
        tensorboard: bool = False,
        dist: DistInfo | None = None,
    ) -> None:
        self.folder = Path(folder)
        self.command = command
        self.steps, self.ckpt_every, self.log_every = steps, ckpt_every, log_every
        self.keep_last = keep_last
        self.resume = resume
        self.progress = progress
        self.tensorboard = tensorboard
        self.dist = dist if dist is not None else DistInfo()
        #: completed steps: 0, the restored checkpoint's, then counted by :meth:`run`.
        self.step = 0
        #: the newest checkpoint of the folder (JSON path), if any.
        self.checkpoint: Path | None = None
        #: the metrics log while :meth:`run` runs (``eval.jsonl`` is written through it too).
        self.log: MetricsLog | None = None
        self._lock: RunLock | None = None
        self._created = False

    # ---- the folder and its lock ----------------------------------------------------------
    def __enter__(self) -> TrainSkeleton:
        check_run_dir(self.folder, self.resume)
        self._created = not self.folder.exists()
        self._lock = self._lock_main()
        try:
            check_run_dir(self.folder, self.resume)  # again, holding the lock
        except BaseException:
            self._release()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._release()

    def _lock_main(self) -> RunLock | None:
        """Rank 0 locks the folder; every rank fails together if it cannot."""
        lock, error = None, None
        if self.dist.is_main:
            try:
                lock = RunLock(self.folder, self.command).acquire()
            except RunLockedError as e:
                error = e
        if distributed.any_rank(error is not None, self.dist):
            raise error or RunLockedError(f"rank 0 could not lock {self.folder}")
        return lock

    def _release(self) -> None:
        if self.log is not None:
            self.log.close()
            self.log = None
        if self._lock is not None:
            self._lock.release()
            self._lock = None
        folder = self.folder
        if self._created and self.dist.is_main and folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()  # failed before writing anything: leave no empty folder behind

    # ---- resuming -----------------------------------------------------------------------------
    @property
    def resuming(self) -> bool:
        """``resume`` was asked and the folder holds a checkpoint to continue from."""
        return self.resume and bool(list_checkpoints(self.folder))

    def saved_config(self) -> dict[str, Any]:
        """The config (or record) stored in the folder's newest checkpoint."""
        return load_checkpoint(self.folder).meta["config"]

    def check_options(
        self, given: Mapping[str, Any], may_change: Sequence[str] = ("steps",)
    ) -> None:
        """Refuse to resume with options other than the newest checkpoint's: ``given`` is the
        record this call would save (JSON-able), compared key by key with the saved one, apart
        from the keys named in ``may_change``.

        Raises:
            ConfigError: one line naming the keys that differ.
        """
        saved = flat_config(self.saved_config())
        now = flat_config(json.loads(json.dumps(given)))  # tuples as lists, as saved

        def name(key: str) -> str:
            return key.rsplit(".", 1)[-1]

        differ = sorted(
            {name(k) for k in saved.keys() | now.keys() if saved.get(k) != now.get(k)}
            - set(may_change)
        )
        if differ:
            allowed = ", ".join("--" + k.replace("_", "-") for k in may_change)
            raise ConfigError(
                f"cannot resume {self.folder} with other options ({', '.join(differ)}): only "
                f"{allowed} may change"
            )

    def restore(self, state: TrainState) -> int:
        """Load the newest checkpoint into ``state``; returns (and sets) :attr:`step`.

        Raises:
            CheckpointError: a corrupt checkpoint or one that does not fit ``state``.
        """
        ckpt = restore_state(self.folder, state)
        self.step, self.checkpoint = ckpt.step, ckpt.path
        return self.step

    # ---- the loop -------------------------------------------------------------------------
    def run(
        self,
        state: TrainState,
        step_fn: StepFn,
        *,
        config: RunConfig | Mapping[str, Any],
        show: Sequence[str] = ("loss",),
        after_step: AfterStep | None = None,
    ) -> dict[str, float] | None:
        """Call ``step_fn`` from :attr:`step` up to ``steps``, logging, showing progress,
        checkpointing ``state`` (with ``config``) and stopping on a signal (module docstring).

        Args:
            state: what checkpoints hold.
            step_fn: one optimizer step; returns its metrics (``{"loss": 0.8, ...}``).
            config: stored in each checkpoint: the run's config, or a JSON-able record.
            show: the metrics shown with the progress and recorded in checkpoints.
            after_step: called after every step (see :data:`AfterStep`).

        Returns:
            The last step's metrics (``None`` when no step was left to do).

        Raises:
            TrainingInterrupted: SIGTERM/SIGINT, after saving a checkpoint.
        """
        dist = self.dist
        found = list_checkpoints(self.folder)
        if self.checkpoint is None and found:
            self.checkpoint = found[-1][1]
        if dist.is_main:  # a resumed loop rewrites what follows its step
            for name in (METRICS_FILE, EVAL_FILE):
                truncate_jsonl(self.folder / name, self.step)
        self.log = MetricsLog(self.folder, self.tensorboard, enabled=dist.is_main)
        desc = self.command.removeprefix("sdelab ")
        bar = Progress(
            self.steps, desc, "steps", initial=self.step, enabled=self.progress and dist.is_main
        )
        metrics: dict[str, float] | None = None
        t_last, step_last = time.perf_counter(), self.step
        try:
            with StopOnSignal() as stop, bar:
                while self.step < self.steps:
                    metrics = dict(step_fn())
                    self.step += 1
                    last = self.step == self.steps
                    if self.step % self.log_every == 0 or last:
                        now = time.perf_counter()
                        rate = (self.step - step_last) / max(now - t_last, 1e-9)
                        t_last, step_last = now, self.step
                        record = {"step": self.step, **metrics, "steps_per_s": rate}
                        self.log.write(METRICS_FILE, record)
                    shown = {k: metrics[k] for k in show if k in metrics}
                    bar.update(1, **shown)
                    wanted = after_step(self.step, last) if after_step is not None else False
                    # every rank stops after the same step, whichever rank saw the signal
                    signalled = distributed.any_rank(stop.signum is not None, dist)
                    stopping = signalled and not last
                    if self.step % self.ckpt_every == 0 or last or stopping or wanted:
                        self.checkpoint = self._save(state, config, shown)
                    if stopping:
                        signum = stop.signum or signal.SIGTERM
                        raise TrainingInterrupted(signum, self.step, self.checkpoint)
        finally:
            self.log.close()
            self.log = None
        return metrics

    def _save(
        self, state: TrainState, config: RunConfig | Mapping[str, Any], metrics: Mapping
    ) -> Path:
        """Rank 0 saves; the others wait for it (a rank exiting early must not cut the save)."""
        path = None
        if self.dist.is_main:
            path = save_state(
                self.folder,
                self.step,
                state,
                config=config,
                keep_last=self.keep_last,
                metrics=metrics,
            )
        distributed.barrier(self.dist)
        return path or self.folder / CKPT_DIR / f"step_{self.step:08d}.json"
