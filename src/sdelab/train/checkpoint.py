r"""Checkpoints that never lose work: safetensors for tensors, JSON for everything else.

A checkpoint of step s is a pair in ``RUN/checkpoints/``::

    step_0000000s.safetensors   model.*, ema.*, optim.<param>.<key>, rng.<name> (uint8 states);
                                its header metadata repeats the resolved config as JSON
    step_0000000s.json          format, step, config, optimizer hyper-parameters and scalar
                                state, extra scalars (metrics), sha256 of the tensor file

Each file is written to a hidden temp file, fsync'ed and moved into place with ``os.replace``;
the JSON goes last and is the commit marker, so a checkpoint exists exactly when its JSON does.
A kill at any moment leaves either the previous checkpoints intact or the new one complete:
temp files and tensor files without a JSON are ignored on load and deleted on the next save.
Loading verifies the hash and never unpickles anything.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import Tensor

from sdelab.train.config import RunConfig
from sdelab.utils import atomic_write

__all__ = [
    "BEST_FILE",
    "CKPT_DIR",
    "Checkpoint",
    "CheckpointError",
    "atomic_write",
    "best_step",
    "list_checkpoints",
    "load_checkpoint",
    "optimizer_state_from_flat",
    "optimizer_state_to_flat",
    "prefixed",
    "save_checkpoint",
]

CKPT_DIR = "checkpoints"
FORMAT = "sdelab-checkpoint"
VERSION = 1
_NAME = re.compile(r"^step_(\d{8,})\.json$")
_TMP = re.compile(r"^\..*\.tmp-\d+$")


class CheckpointError(ValueError):
    """A missing or corrupt checkpoint; the message names the file and the fix."""


@dataclass(frozen=True)
class Checkpoint:
    """A loaded checkpoint: its step, tensors and JSON metadata."""

    step: int
    tensors: dict[str, Tensor]
    meta: dict[str, Any]
    path: Path  # the .json file

    @property
    def config(self) -> RunConfig:
        return RunConfig.from_dict(self.meta["config"], source=str(self.path))


def _stem(step: int) -> str:
    return f"step_{step:08d}"


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run as ``(step, json_path)``, oldest first (temp files and
    tensor files without their JSON are not checkpoints)."""
    folder = Path(run_dir) / CKPT_DIR
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    return sorted(found)


def optimizer_state_to_flat(optimizer: torch.optim.Optimizer) -> tuple[dict[str, Tensor], dict]:
    """Split ``optimizer.state_dict()`` into tensors ``optim.<param>.<key>`` and a JSON dict."""
    sd = optimizer.state_dict()
    tensors: dict[str, Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, state in sd["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"optim.{idx}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(idx), {})[key] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_state_from_flat(tensors: dict[str, Tensor], meta: dict) -> dict[str, Any]:
    """Inverse of :func:`optimizer_state_to_flat`: a ``state_dict`` for ``load_state_dict``."""
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith("optim."):
            _, idx, key = name.split(".", 2)
            state.setdefault(int(idx), {})[key] = value
    for idx, scalars in meta["scalars"].items():
        state.setdefault(int(idx), {}).update(scalars)
    groups = [
        {k: tuple(v) if k == "betas" else v for k, v in group.items()}
        for group in meta["param_groups"]
    ]
    return {"state": state, "param_groups": groups}


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    tensors: dict[str, Tensor],
    meta: dict[str, Any],
    *,
    config: RunConfig | dict[str, Any],
    keep_last: int | None = None,
    protect: frozenset[int] = frozenset(),
) -> Path:
    """Write checkpoint ``step`` atomically and keep only the newest ``keep_last``.

    Args:
        run_dir: the run folder (checkpoints go to ``run_dir/checkpoints``).
        step: completed optimizer steps.
        tensors: name -> tensor (moved to CPU; must not share storage).
        meta: JSON-able scalars (optimizer hyper-parameters, metrics, ...).
        config: the resolved config (or a plain JSON-able dict, for folders that are not
            score-model runs, e.g. a dequantizer's), stored in both files.
        keep_last: how many checkpoints to keep (``None``: all).
        protect: steps never pruned (the best checkpoint of ``eval.select_best``).

    Returns:
        The JSON path of the new checkpoint.
    """
    folder = Path(run_dir) / CKPT_DIR
    folder.mkdir(parents=True, exist_ok=True)
    config_dict = config.to_dict() if isinstance(config, RunConfig) else dict(config)
    config_json = json.dumps(config_dict)
    cpu = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    blob = save_safetensors(
        cpu, metadata={"format": FORMAT, "step": str(step), "config": config_json}
    )
    stem = _stem(step)
    atomic_write(folder / f"{stem}.safetensors", blob)
    record = {
        "format": FORMAT,
        "version": VERSION,
        "step": step,
        "tensors": f"{stem}.safetensors",
        "sha256": hashlib.sha256(blob).hexdigest(),
        "config": config_dict,
        **meta,
    }
    json_path = folder / f"{stem}.json"
    atomic_write(json_path, json.dumps(record, indent=1))
    _prune(folder, keep_last, protect)
    return json_path


def _prune(folder: Path, keep_last: int | None, protect: frozenset[int] = frozenset()) -> None:
    """Delete checkpoints beyond the newest ``keep_last`` but the ``protect``ed steps (JSON
    first, so a crash mid-prune never leaves a JSON without its tensors), stray temp files and
    orphan tensor files."""
    complete = [(s, p) for s, p in list_checkpoints(folder.parent) if s not in protect]
    if keep_last is not None:
        for _, json_path in complete[: max(0, len(complete) - keep_last)]:
            json_path.unlink(missing_ok=True)
    kept = {p.stem for _, p in list_checkpoints(folder.parent)}
    for p in folder.iterdir():
        orphan = p.suffix == ".safetensors" and p.stem not in kept
        if orphan or _TMP.match(p.name):
            p.unlink(missing_ok=True)


BEST_FILE = "best.json"


def best_step(run_dir: str | Path) -> int | None:
    """The step of the run's best checkpoint (``eval.select_best``), or ``None``."""
    path = Path(run_dir) / BEST_FILE
    if not path.is_file():
        return None
    return int(json.loads(path.read_text())["step"])


def load_checkpoint(run_dir: str | Path, step: int | str | None = None) -> Checkpoint:
    """Load checkpoint ``step`` of a run (default: the newest complete one; ``"best"``: the
    best by ``eval.select_best``, see ``RUN/best.json``).

    Raises:
        CheckpointError: no checkpoint, or the files are unreadable, truncated or do not match
            their recorded hash (the message names the file and how to recover).
    """
    run_dir = Path(run_dir)
    if step == "best":
        step = best_step(run_dir)
        if step is None:
            raise CheckpointError(
                f"{run_dir} has no best checkpoint ({BEST_FILE}): train it with "
                "eval.select_best=fd and train.eval_every > 0, or use the newest checkpoint"
            )
    found = list_checkpoints(run_dir)
    if not found:
        raise CheckpointError(f"no checkpoint in {run_dir / CKPT_DIR}: train the run first")
    if step is None:
        step, json_path = found[-1]
    else:
        by_step = dict(found)
        if step not in by_step:
            raise CheckpointError(
                f"no checkpoint of step {step} in {run_dir / CKPT_DIR}: "
                f"choose one of {', '.join(str(s) for s in by_step)}"
            )
        json_path = by_step[step]
    fix = f"delete {json_path.with_suffix('.*')} to fall back to the previous checkpoint"
    try:
        meta = json.loads(json_path.read_text())
        if meta.get("format") != FORMAT or meta.get("step") != step:
            raise ValueError("not an sdelab checkpoint of this step")
        blob = (json_path.parent / meta["tensors"]).read_bytes()
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"checkpoint {json_path} is corrupt ({e}): {fix}") from None
    if hashlib.sha256(blob).hexdigest() != meta.get("sha256"):
        raise CheckpointError(
            f"checkpoint {json_path} is corrupt (tensor file does not match its sha256): {fix}"
        )
    try:
        tensors = load_safetensors(blob)
    except Exception as e:  # safetensors raises its own SafetensorError (and others) here
        raise CheckpointError(f"checkpoint {json_path} is corrupt ({e}): {fix}") from None
    return Checkpoint(step=step, tensors=tensors, meta=meta, path=json_path)


def prefixed(tensors: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """The tensors under ``prefix.`` with the prefix removed (a state_dict)."""
    cut = len(prefix) + 1
    return {k[cut:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}
