"""A trained run opened once (:class:`LoadedRun`, :func:`open_run`), the data splits the run
operations read, and their files (samples, JSON records)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sdelab import distributed, streams
from sdelab.data import Dataset
from sdelab.parametrization import ScoreModel
from sdelab.sde import Schedule
from sdelab.train.build import load_run, make_run_dataset, resolve_device
from sdelab.train.checkpoint import best_step, list_checkpoints
from sdelab.train.config import RunConfig
from sdelab.utils import atomic_open, atomic_write

#: Likelihood estimators by CLI name.
METHODS = ("ode", "elbo", "scoreflow")
# The seed streams of runs/likelihood.py under the names it imports (see sdelab.streams).
VLB_STREAM, LOSS_STREAM = streams.RUN_VLB, streams.RUN_LOSS


def eval_device(info: distributed.DistInfo) -> torch.device:
    """CPU with one process (as always); ``cuda:LOCAL_RANK`` for each of many when CUDA is
    available."""
    return resolve_device("auto" if info.enabled else "cpu", info)


@dataclass(frozen=True)
class LoadedRun:
    """A trained run read once (checkpoint loaded and hash-checked a single time): its folder,
    config, model (EMA or raw weights, on this process's evaluation device), schedule and the
    step of the checkpoint read."""

    run_dir: Path
    config: RunConfig
    model: ScoreModel
    schedule: Schedule
    step: int | None = None

    @property
    def dataset(self) -> Dataset:
        """The run's dataset (its test set is fixed by the run's seed)."""
        return make_run_dataset(self.config)


def open_run(
    run: str | Path | LoadedRun, which: str = "ema", step: int | str | None = None
) -> LoadedRun:
    """Load a run folder for evaluation (a :class:`LoadedRun` passes through unchanged, so one
    load can serve several operations): checkpoint ``step`` (default the newest, ``"best"`` the
    one ``eval.select_best`` kept). Raises ValueError when the weights are not finite (a
    diverged run: nothing computed from it would be)."""
    if isinstance(run, LoadedRun):
        return run
    device = eval_device(distributed.get_info())
    config, model, schedule = load_run(run, which, step=step, device=device)
    bad = sum(int((~torch.isfinite(p)).sum()) for p in model.parameters())
    if bad:
        raise ValueError(
            f"{bad} of the {which} weights are not finite in {run}: the run diverged; retrain "
            "with a lower optim.lr (or resume an earlier checkpoint with sdelab train --resume "
            "... optim.lr=...)"
        )
    resolved = best_step(run) if step == "best" else step
    if resolved is None:
        resolved = list_checkpoints(run)[-1][0]
    return LoadedRun(Path(run), config, model, schedule, int(resolved))


def check_finite_samples(samples: torch.Tensor, source: str) -> None:
    """Refuse samples that are not finite with a one-line ``ValueError`` naming how many."""
    bad = int((~torch.isfinite(samples.reshape(len(samples), -1))).any(dim=1).sum())
    if bad:
        raise ValueError(
            f"{bad} of {len(samples)} samples are not finite (NaN/inf), nothing was written: "
            f"{source} may have diverged (see its loss.png), or the sampler is unstable "
            "at these settings (try more --steps or another --sampler)"
        )


def split_levels(dataset: Dataset, split: str, n: int, seed: int = 0) -> torch.Tensor:
    """The first ``n`` points of a data split as the likelihood takes them: integer levels for
    images (``test``: the fixed test split, ``train``: the training split), model-space points
    for vector data (``test``: the fixed test set, ``train``: ``n`` draws seeded by ``seed``)."""
    if split not in ("train", "test"):
        raise ValueError(f"unknown split {split!r}: choose train or test")
    if split == "test":
        return dataset.test_set(n)
    if dataset.num_levels is not None:
        return dataset.load("train").levels[:n].to(torch.int64)
    return dataset.sample(n, torch.Generator().manual_seed(seed))


def save_samples(samples: torch.Tensor, path: str | Path) -> Path:
    """Save samples as ``.npy`` (or ``.csv`` by suffix), atomically (temp file + rename);
    refuses to overwrite an existing file."""
    path = Path(path)
    if path.exists():
        raise FileExistsError(f"{path} exists: choose another --out or delete it first")
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix not in (".csv", ".npy"):
        raise ValueError(f"unknown sample file type {path.suffix!r}: use .npy or .csv")
    arr = samples.detach().cpu().numpy()
    with atomic_open(path) as f:  # a full disk leaves no truncated file
        if path.suffix == ".csv":
            np.savetxt(f, arr.reshape(len(arr), -1), delimiter=",")
        else:
            np.save(f, arr)
    return path


def write_json(path: str | Path, record: dict[str, Any], *, overwrite: bool = True) -> Path:
    """Write a small JSON record (NaN-free) next to a run, atomically; ``overwrite=False``
    refuses an existing file (``FileExistsError``)."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists: pass --force to replace it")
    clean = {
        k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()
    }
    atomic_write(path, json.dumps(clean, indent=2) + "\n")
    return path
