"""The run folder: its config files, metrics/eval logs, checkpoints of a :class:`Run`, and the
rules of ``--resume``.

A run folder holds ``config.yaml`` / ``config.json`` (the resolved config), ``metrics.jsonl``
and ``eval.jsonl`` (one JSON object per line), ``checkpoints/`` (:mod:`sdelab.train.checkpoint`)
and ``loss.png``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sdelab.train.build import Run
from sdelab.train.checkpoint import (
    load_checkpoint,
    optimizer_state_from_flat,
    optimizer_state_to_flat,
    prefixed,
    save_checkpoint,
)
from sdelab.train.config import ConfigError, RunConfig
from sdelab.utils import atomic_write

__all__ = [
    "EVAL_FILE",
    "METRICS_FILE",
    "RESUMABLE_KEYS",
    "MetricsLog",
    "check_run_dir",
    "flat_config",
    "merge_for_resume",
    "require_tensorboard",
    "restore",
    "save",
    "truncate_jsonl",
    "write_config",
]

METRICS_FILE = "metrics.jsonl"
EVAL_FILE = "eval.jsonl"
#: Keys that may differ between a run's saved config and the one given with ``--resume``.
RESUMABLE_KEYS = (
    "train.steps",
    "train.log_every",
    "train.ckpt_every",
    "train.keep_last",
    "train.eval_every",
    "train.device",
    "train.tensorboard",
    "train.mixed_precision",
    "train.grad_accum",
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


def save(run: Run, metrics: Mapping[str, float] | None = None) -> Path:
    """Checkpoint the run at its current step (see :mod:`sdelab.train.checkpoint`)."""
    opt_tensors, opt_meta = optimizer_state_to_flat(run.optimizer)
    tensors = {
        **{f"model.{k}": v for k, v in run.model.state_dict().items()},
        **{f"ema.{k}": v for k, v in run.ema.state_dict().items()},
        **opt_tensors,
        "rng.data": run.data_gen.get_state(),
        "rng.loss": run.loss_gen.get_state(),
    }
    meta = {"optimizer": opt_meta, "metrics": dict(metrics or {})}
    return save_checkpoint(
        run.run_dir,
        run.step,
        tensors,
        meta,
        config=run.config,
        keep_last=run.config.train.keep_last,
    )


def restore(run: Run, step: int | None = None) -> None:
    """Load weights, EMA, optimizer state, generator states and step from a checkpoint."""
    ckpt = load_checkpoint(run.run_dir, step)
    t = ckpt.tensors
    run.model.load_state_dict(prefixed(t, "model"))
    run.ema.load_state_dict(prefixed(t, "ema"))
    run.optimizer.load_state_dict(optimizer_state_from_flat(t, ckpt.meta["optimizer"]))
    run.data_gen.set_state(t["rng.data"])
    run.loss_gen.set_state(t["rng.loss"])
    run.step = ckpt.step


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

    def allowed(key: str) -> bool:
        return any(key == r or key.startswith(r + ".") for r in RESUMABLE_KEYS)

    differ = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k) and not allowed(k))
    if differ:
        shown = ", ".join(f"{k} (saved {a.get(k)!r}, given {b.get(k)!r})" for k in differ[:3])
        raise ConfigError(
            f"cannot resume {run_dir} with a different config: {shown}; on resume only "
            f"{', '.join(RESUMABLE_KEYS)} may change"
        )
    return saved.model_copy(update={"train": given.train, "eval": given.eval})


def check_run_dir(run_dir: Path, resume: bool) -> None:
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"run folder {run_dir} is a file: choose another --out")
    if not resume and run_dir.is_dir() and any(run_dir.iterdir()):
        raise ConfigError(
            f"run folder {run_dir} is not empty: pass --resume to continue it, "
            "or choose a new --out"
        )


def write_config(run_dir: Path, config: RunConfig) -> None:
    atomic_write(run_dir / "config.yaml", config.to_yaml())
    atomic_write(run_dir / "config.json", config.to_json() + "\n")
