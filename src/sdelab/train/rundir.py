"""The run folder: its config files, metrics/eval logs, checkpoints of a :class:`Run`, and the
rules of ``--resume``.

A run folder holds ``config.yaml`` / ``config.json`` (the resolved config), ``metrics.jsonl``
and ``eval.jsonl`` (one JSON object per line), ``checkpoints/`` (:mod:`sdelab.train.checkpoint`)
and ``loss.png``; while a command writes it, ``.lock`` names the writing process
(:class:`RunLock`).
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import socket
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sdelab.train.build import Run, load_state
from sdelab.train.checkpoint import (
    BEST_FILE,
    CKPT_DIR,
    Checkpoint,
    CheckpointError,
    best_step,
    list_checkpoints,
    load_checkpoint,
    optimizer_state_from_flat,
    optimizer_state_to_flat,
    prefixed,
    save_checkpoint,
)
from sdelab.train.config import ConfigError, RunConfig, apply_overrides
from sdelab.train.periodic import SAMPLES_DIR
from sdelab.utils import atomic_write

__all__ = [
    "EVAL_FILE",
    "LOCK_FILE",
    "METRICS_FILE",
    "RESUMABLE_KEYS",
    "MetricsLog",
    "RunLock",
    "RunLockedError",
    "StopOnSignal",
    "TrainState",
    "check_run_dir",
    "config_changes",
    "flat_config",
    "is_run_file",
    "merge_for_resume",
    "require_tensorboard",
    "restore",
    "restore_state",
    "resume_config",
    "run_state",
    "save",
    "save_state",
    "saved_config",
    "truncate_jsonl",
    "update_best",
    "write_config",
]

METRICS_FILE = "metrics.jsonl"
EVAL_FILE = "eval.jsonl"
LOCK_FILE = ".lock"
#: Keys that may differ between a run's saved config and the one given with ``--resume``:
#: the loop's cadence and length, where it runs, evaluation, and the two optimiser settings that
#: a non-finite loss asks to change (the optimiser state is kept; the next step uses them).
RESUMABLE_KEYS = (
    "optim.lr",
    "optim.grad_clip",
    "train.steps",
    "train.log_every",
    "train.ckpt_every",
    "train.keep_last",
    "train.eval_every",
    "train.device",
    "train.tensorboard",
    "train.mixed_precision",
    "train.grad_accum",
    "train.sample_every",
    "train.ckpt_every_epochs",
    "train.memory_check",
    "train.memory_limit_mb",
    "train.channels_last",
    "train.compile",
    "eval",
)


class MetricsLog:
    """Appends one JSON object per line to ``metrics.jsonl`` / ``eval.jsonl`` (flushed each
    line) and mirrors scalars to TensorBoard when asked."""

    def __init__(self, run_dir: Path, tensorboard: bool = False, enabled: bool = True) -> None:
        self.run_dir = run_dir
        self.enabled = enabled  # False on ranks other than 0: writes nothing
        self._files: dict[str, Any] = {}
        self._tb = _summary_writer(run_dir / "tensorboard") if tensorboard and enabled else None

    def write(self, name: str, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        if name not in self._files:
            self._files[name] = open(self.run_dir / name, "a", encoding="utf-8")
        f = self._files[name]
        f.write(json.dumps(record) + "\n")
        f.flush()
        if self._tb is not None:
            prefix = "eval/" if name == EVAL_FILE else "train/"
            for key, value in record.items():
                if key != "step" and isinstance(value, int | float):
                    self._tb.add_scalar(prefix + key, value, record["step"])

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()
        if self._tb is not None:
            self._tb.close()


def require_tensorboard():
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError(
            "train.tensorboard=true needs the tensorboard package: "
            "pip install 'sdelab[tensorboard]', or set train.tensorboard=false"
        ) from None
    return SummaryWriter


def _summary_writer(log_dir: Path):
    return require_tensorboard()(log_dir=str(log_dir))


def truncate_jsonl(path: Path, step: int) -> None:
    """Keep only records with ``step <= step`` (a resumed run rewrites what follows; a line
    cut by a kill is dropped)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and record.get("step", math.inf) <= step:
            kept.append(line + "\n")
    atomic_write(path, "".join(kept))


@dataclass(frozen=True)
class TrainState:
    """What a training checkpoint holds besides its step, config and metrics: modules by name
    (tensors ``NAME.<key>``), one optimizer (tensors ``optim.*``, hyper-parameters in the JSON)
    and random generators by name (``rng.NAME``). Restoring all of them makes a loop continue
    exactly as if it had not stopped (bit for bit on CPU)."""

    modules: Mapping[str, torch.nn.Module]
    optimizer: torch.optim.Optimizer
    generators: Mapping[str, torch.Generator]


def run_state(run: Run) -> TrainState:
    """A score-model run's :class:`TrainState`: ``model``, ``ema``, the optimizer, ``rng.data``
    and ``rng.loss``."""
    return TrainState(
        {"model": run.model, "ema": run.ema},
        run.optimizer,
        {"data": run.data_gen, "loss": run.loss_gen},
    )


def save_state(
    folder: Path,
    step: int,
    state: TrainState,
    *,
    config: RunConfig | Mapping[str, Any],
    keep_last: int | None,
    metrics: Mapping[str, float] | None = None,
) -> Path:
    """Checkpoint ``state`` at ``step`` in ``folder/checkpoints`` (atomically; the newest
    ``keep_last`` are kept, and the best one of ``eval.select_best`` if there is one).

    Args:
        folder: the run (or classifier / dequantizer) folder.
        step: completed optimizer steps.
        state: what to save.
        config: the resolved config, or a JSON-able record for folders that are not
            score-model runs; stored in the checkpoint.
        keep_last: how many checkpoints to keep (``None``: all).
        metrics: scalars recorded in the checkpoint's JSON.

    Returns:
        The checkpoint's JSON path.
    """
    opt_tensors, opt_meta = optimizer_state_to_flat(state.optimizer)
    tensors = {
        **{
            f"{name}.{k}": v
            for name, module in state.modules.items()
            for k, v in module.state_dict().items()
        },
        **opt_tensors,
        **{f"rng.{name}": g.get_state() for name, g in state.generators.items()},
    }
    return save_checkpoint(
        folder,
        step,
        tensors,
        {"optimizer": opt_meta, "metrics": dict(metrics or {})},
        config=config,
        keep_last=keep_last,
        protect=frozenset(s for s in [best_step(folder)] if s is not None),
    )


def restore_state(folder: Path, state: TrainState, step: int | None = None) -> Checkpoint:
    """Load checkpoint ``step`` of ``folder`` (default: the newest) into ``state``; returns the
    checkpoint (its ``step``, ``path`` and JSON ``meta``).

    Raises:
        CheckpointError: no checkpoint, a corrupt one, or tensors that do not fit the modules.
    """
    ckpt = load_checkpoint(folder, step)
    t = ckpt.tensors
    for name, module in state.modules.items():
        load_state(module, prefixed(t, name), ckpt.path)
    try:
        state.optimizer.load_state_dict(optimizer_state_from_flat(t, ckpt.meta["optimizer"]))
        for name, g in state.generators.items():
            g.set_state(t[f"rng.{name}"])
    except (KeyError, ValueError, RuntimeError) as e:
        raise CheckpointError(
            f"checkpoint {ckpt.path} does not fit this training loop ({type(e).__name__}: "
            f"{e}): it belongs to another kind of folder, or its files were changed"
        ) from None
    return ckpt


def save(run: Run, metrics: Mapping[str, float] | None = None) -> Path:
    """Checkpoint the run at its current step (see :func:`save_state`)."""
    return save_state(
        run.run_dir,
        run.step,
        run_state(run),
        config=run.config,
        keep_last=run.config.train.keep_last,
        metrics=metrics,
    )


def update_best(run: Run, metrics: Mapping[str, float]) -> bool:
    """With ``eval.select_best: M``: whether this evaluation's ``metrics[M]`` is the lowest so
    far; if so ``RUN/best.json`` points to this step (whose checkpoint the caller saves)."""
    name = run.config.eval.select_best
    if name is None or name not in metrics or not math.isfinite(metrics[name]):
        return False
    path = run.run_dir / BEST_FILE
    if path.is_file():
        best = json.loads(path.read_text())
        if best["step"] != run.step and best["value"] <= metrics[name]:
            return False
    record = {"metric": name, "value": float(metrics[name]), "step": run.step}
    atomic_write(path, json.dumps(record) + "\n")
    return True


def restore(run: Run, step: int | None = None) -> None:
    """Load weights, EMA, optimizer state, generator states and step from a checkpoint."""
    run.step = restore_state(run.run_dir, run_state(run), step).step


#: What a run started by ``train.init_from`` must share with the run it starts from.
INIT_KEYS = ("model", "sde", "loss.parametrization")


def init_from(run: Run, source: str | Path) -> int:
    """Start ``run`` from the weights and EMA of the newest checkpoint of the run folder
    ``source`` (``train.init_from``: a fine-tuning stage); the optimizer, generators and step
    stay new. Returns the source checkpoint's step.

    Raises:
        ConfigError: ``source`` has no readable checkpoint, or its model, sde or
            parametrization differ from ``run``'s (one line naming the keys).
    """
    source = Path(source)
    try:
        ckpt = load_checkpoint(source)
        saved = ckpt.config
    except (CheckpointError, ConfigError) as e:
        raise ConfigError(f"train.init_from={source}: {e}") from None
    a, b = flat_config(saved.to_dict()), flat_config(run.config.to_dict())
    differ = sorted(
        k
        for k in a.keys() | b.keys()
        if any(k == r or k.startswith(r + ".") for r in INIT_KEYS) and a.get(k) != b.get(k)
    )
    if differ:
        shown = ", ".join(f"{k} (there {a.get(k)!r}, here {b.get(k)!r})" for k in differ[:3])
        raise ConfigError(
            f"train.init_from={source} is a different model: {shown}; its "
            f"{', '.join(INIT_KEYS)} must match this config's"
        )
    load_state(run.model, prefixed(ckpt.tensors, "model"), ckpt.path)
    load_state(run.ema, prefixed(ckpt.tensors, "ema"), ckpt.path)
    return ckpt.step


def flat_config(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        out.update(flat_config(v, key + ".") if isinstance(v, Mapping) and v else {key: v})
    return out


def merge_for_resume(saved: RunConfig, given: RunConfig, run_dir: Path) -> RunConfig:
    """The saved config with the resumable keys taken from ``given``; any other difference is
    an error naming the keys."""
    a, b = flat_config(saved.to_dict()), flat_config(given.to_dict())

    def allowed(key: str) -> bool:  # as_typed: the same file may be typed differently
        keys = (*RESUMABLE_KEYS, "data.as_typed")
        return any(key == r or key.startswith(r + ".") for r in keys)

    differ = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k) and not allowed(k))
    if differ:
        shown = ", ".join(f"{k} (saved {a.get(k)!r}, given {b.get(k)!r})" for k in differ[:3])
        raise ConfigError(
            f"cannot resume {run_dir} with a different config: {shown}; on resume only "
            f"{', '.join(RESUMABLE_KEYS)} may change"
        )
    o = given.optim
    optim = saved.optim.model_copy(update={"lr": o.lr, "grad_clip": o.grad_clip})
    return saved.model_copy(update={"train": given.train, "eval": given.eval, "optim": optim})


def saved_config(run_dir: str | Path) -> RunConfig | None:
    """The config a run folder was trained with: its newest checkpoint's, else its
    ``config.json`` (a run stopped before its first checkpoint), else ``None``."""
    run_dir = Path(run_dir)
    if list_checkpoints(run_dir):
        return load_checkpoint(run_dir).config
    path = run_dir / "config.json"
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON ({e}): delete the run folder") from None
    return RunConfig.from_dict(data, source=str(path))


def config_changes(a: RunConfig, b: RunConfig) -> list[tuple[str, Any, Any]]:
    """``(dotted key, value in a, value in b)`` for every key where the two configs differ."""
    fa, fb = flat_config(a.to_dict()), flat_config(b.to_dict())
    keys = sorted(fa.keys() | fb.keys())
    return [(k, fa.get(k), fb.get(k)) for k in keys if fa.get(k) != fb.get(k)]


def resume_config(
    saved: RunConfig,
    overrides: Sequence[str],
    run_dir: Path,
    given: RunConfig | None = None,
) -> RunConfig:
    """The config ``--resume`` continues with: the run's ``saved`` config with the command
    line's ``overrides`` applied, nothing else. ``given`` (the CONFIG argument with the
    overrides, resolved) is only checked: it must describe the same run (apart from
    :data:`RESUMABLE_KEYS`); its own values of resumable keys are not used.

    Raises :class:`ConfigError` when an override or ``given`` changes a key outside
    :data:`RESUMABLE_KEYS`.
    """
    if given is not None:
        merge_for_resume(saved, given, run_dir)
    data = apply_overrides(saved.to_dict(), list(overrides))
    final = RunConfig.from_dict(data, source=f"{run_dir}/config.json with the overrides")
    merge_for_resume(saved, final, run_dir)
    return final


def check_run_dir(run_dir: Path, resume: bool) -> None:
    """A new run needs an absent or empty folder (a stale lock file alone does not count)."""
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"run folder {run_dir} is a file: choose another --out")
    if resume or not run_dir.is_dir():
        return
    if any(p.name != LOCK_FILE for p in run_dir.iterdir()):
        raise ConfigError(
            f"run folder {run_dir} is not empty: pass --resume to continue it, "
            "or choose a new --out"
        )


#: What training writes in a run folder: files by name, folders by their first part.
_RUN_FILES = frozenset(
    {"config.yaml", "config.json", METRICS_FILE, EVAL_FILE, LOCK_FILE, BEST_FILE, "loss.png"}
)
_RUN_FOLDERS = {
    CKPT_DIR: re.compile(r"^(step_\d{8,}\.(json|safetensors)|\..*\.tmp-\d+)$"),
    SAMPLES_DIR: re.compile(r"^(step_\d{8,}\.(npy|png)|\..*\.tmp-\d+)$"),
    "tensorboard": re.compile(r"^events\.out\.tfevents\..*$"),
}
_TMP = re.compile(r"^\..*\.tmp-\d+$")  # an atomic write cut short by a kill


def is_run_file(relative: str | Path) -> bool:
    """Whether a path relative to a run folder is one training writes there (config, logs,
    lock, loss plot, checkpoints, sample grids, TensorBoard events, their temp files); any
    other file in a run folder was put there by someone else."""
    parts = Path(relative).parts
    if len(parts) == 1:
        return parts[0] in _RUN_FILES or bool(_TMP.match(parts[0]))
    if len(parts) == 3 and parts[:2] == (CKPT_DIR, "diverged"):  # set aside by a divergence
        parts = parts[::2]
    pattern = _RUN_FOLDERS.get(parts[0])
    return len(parts) == 2 and pattern is not None and bool(pattern.match(parts[1]))


def write_config(run_dir: Path, config: RunConfig) -> None:
    atomic_write(run_dir / "config.yaml", config.to_yaml())
    atomic_write(run_dir / "config.json", config.to_json() + "\n")


class StopOnSignal:
    """Context manager turning SIGTERM/SIGINT into a flag the loop checks between steps."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def _handle(self, signum, frame) -> None:
        self.signum = signum

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():  # signals need the main thread
            for s in self.SIGNALS:
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)


# ---- the lock ---------------------------------------------------------------------------------
class RunLockedError(ConfigError):
    """Another live process holds the run folder's lock."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OSError:
        return False
    return True


class RunLock:
    """An exclusive lock on a folder for one writing process: ``FOLDER/.lock`` holds the
    owner's pid, host, command and start time, created atomically (``O_EXCL``).

    A lock whose process is gone (same host, pid not alive) is stale: it is taken over, with a
    note on stderr. A live owner — or one on another host, whose pid cannot be checked — raises
    :class:`RunLockedError` naming it and the file to delete if it is wrong. ``reentrant``: a
    lock naming this very process (left by an earlier call in it that failed) is taken over
    silently. Use as a context manager; the file is removed on exit.
    """

    def __init__(self, folder: str | Path, command: str = "sdelab", *, reentrant: bool = False):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_FILE
        self.command = command
        self.reentrant = reentrant
        self.held = False

    def _owner(self) -> dict[str, Any] | None:
        try:
            owner = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (json.JSONDecodeError, UnicodeDecodeError, OSError):
            return {}  # half-written or foreign: treated as stale
        return owner if isinstance(owner, dict) else {}

    def acquire(self) -> RunLock:
        self.folder.mkdir(parents=True, exist_ok=True)
        record = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "command": self.command,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self._owner()
                if owner is None:  # released meanwhile: try again
                    continue
                pid, host = owner.get("pid"), owner.get("host")
                local = host == socket.gethostname()
                if self.reentrant and local and pid == os.getpid():
                    self.path.unlink(missing_ok=True)
                    continue
                if isinstance(pid, int) and (not local or _pid_alive(pid)):
                    where = "" if local else f" on host {host}"
                    raise RunLockedError(
                        f"{self.folder} is in use by process {pid}{where} "
                        f"({owner.get('command', '?')}, since {owner.get('started', '?')}): wait "
                        f"for it to finish, or delete {self.path} if that process is gone"
                    ) from None
                print(
                    f"sdelab: taking over the stale lock {self.path} (process {pid} is gone)",
                    file=sys.stderr,
                )
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(record, f)
            self.held = True
            return self
        raise RunLockedError(f"could not lock {self.folder}: {self.path} keeps reappearing")

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
