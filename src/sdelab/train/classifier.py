"""Noise-conditional classifiers p_t(y | x_t) for classifier guidance: training on a run's
data and schedule, their files (``classifier.safetensors`` + ``classifier.json``), loading.

Vector data get a :class:`~sdelab.nets.classifier.TimeClassifier` MLP, image data a
:class:`~sdelab.nets.classifier.ConvClassifier`. The guidance itself is maths
(:func:`sdelab.controllable.guided_score_fn`).
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import Tensor, nn

from sdelab.data import Dataset
from sdelab.data.toys import no_labels_error
from sdelab.losses import sample_time
from sdelab.nets.classifier import ConvClassifier, TimeClassifier
from sdelab.sde import Schedule
from sdelab.train.build import make_run_dataset, schedule_from
from sdelab.train.checkpoint import list_checkpoints, load_checkpoint
from sdelab.train.config import load_config
from sdelab.train.rundir import LOCK_FILE, RunLock
from sdelab.utils import atomic_write, randn_like

__all__ = ["fit_classifier", "load_classifier", "train_classifier"]


def noised_batch(
    x0: Tensor, schedule: Schedule, generator: torch.Generator | None, *, clean: bool = False
) -> tuple[Tensor, Tensor]:
    """(x_t, t) with t drawn uniformly in [t_min, T] (``clean``: t = t_min) and
    x_t = α_t x_0 + σ_t ε."""
    if clean:
        t = torch.full((x0.shape[0],), schedule.t_min, dtype=x0.dtype, device=x0.device)
    else:
        t = sample_time(schedule, x0.shape[0], generator=generator, dtype=x0.dtype).t
    return schedule.perturb(x0, t, randn_like(x0, generator)), t


def fit_classifier(
    net: nn.Module,
    sample_fn: Callable[[int, torch.Generator], tuple[Tensor, Tensor]],
    schedule: Schedule,
    *,
    steps: int = 2000,
    batch_size: int = 256,
    lr: float = 1e-3,
    seed: int = 0,
    log_every: int = 0,
    clean: bool = False,
) -> list[float]:
    """Train a time-dependent classifier on noised data: minimise E_t CE(net(x_t, t), y).

    Times are uniform in [t_min, T], as for the score model (``clean``: t = t_min only, a
    classifier of clean data). Returns the loss per step.
    """
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    net.train()
    losses = []
    for step in range(1, steps + 1):
        x0, labels = sample_fn(batch_size, gen)
        xt, t = noised_batch(x0, schedule, gen, clean=clean)
        loss = nn.functional.cross_entropy(net(xt, t), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        if log_every and step % log_every == 0:
            print(f"step {step}: loss {float(loss):.4f}")
    net.eval()
    return losses


CLASSIFIER_FORMAT = "sdelab-classifier"


def train_classifier(
    run_or_config: str | Path | dict[str, Any],
    out: str | Path,
    *,
    steps: int = 2000,
    batch_size: int = 256,
    lr: float = 1e-3,
    width: int = 128,
    depth: int = 3,
    seed: int = 0,
    log_every: int = 0,
    clean: bool = False,
) -> Path:
    """Train a noise-conditional classifier for a run's data and schedule and save it to ``out``.

    Vector data (toys) get a :class:`~sdelab.nets.classifier.TimeClassifier` MLP, image data a
    :class:`~sdelab.nets.classifier.ConvClassifier`; both are trained on the run's training
    data with its labels (``dataset.sample_labeled``: uniformly dequantized images).

    Args:
        run_or_config: a run folder written by ``sdelab train`` (its checkpoint's config is
            used), a YAML config path / built-in name, or a config dict.
        out: folder for ``classifier.safetensors`` + ``classifier.json`` (must not exist or be
            empty).
        steps, batch_size, lr: Adam on the cross-entropy of noised labeled data.
        width, depth: the MLP's hidden units and layers; for images ``width`` is the conv
            net's base channels (``depth`` unused).
        seed: data, times and initialisation.
        clean: train at t = t_min only: a classifier of clean data (e.g. to score samples),
            not one for guidance.

    Returns:
        The JSON path. ``classifier.json`` records the accuracy on held-out data (the test
        split for images, fresh points for toys) at a few noise levels.

    Raises:
        ValueError: a dataset without labels, a non-empty ``out``, a bad size.
    """
    if steps < 1 or batch_size < 1 or width < 1 or depth < 1 or not lr > 0:
        raise ValueError(
            f"need positive --steps, --batch-size, --width, --depth and --lr, got {steps}, "
            f"{batch_size}, {width}, {depth}, {lr}"
        )
    src = Path(run_or_config) if isinstance(run_or_config, (str, Path)) else None
    if src is not None and src.is_dir() and list_checkpoints(src):
        config = load_checkpoint(src).config
    else:
        config = load_config(run_or_config)
    dataset = make_run_dataset(config)
    num_classes = dataset.num_classes
    if not num_classes:
        raise no_labels_error(config.data.name)
    out = Path(out)
    _check_empty(out)
    created = not out.exists()
    with RunLock(out, "sdelab train-classifier"):
        try:
            _check_empty(out)  # again, holding the lock: another classifier that started first
            return _train_and_save(
                config, dataset, out, steps, batch_size, lr, width, depth, seed, log_every, clean
            )
        finally:
            if created and not any(p.name != LOCK_FILE for p in out.iterdir()):
                shutil.rmtree(out, ignore_errors=True)  # failed before writing: no empty folder


def _check_empty(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} is a file: choose another --out")
    if out.is_dir() and any(p.name != LOCK_FILE for p in out.iterdir()):
        raise ValueError(f"{out} is not empty: choose another --out or delete it first")


def _train_and_save(
    config, dataset, out, steps, batch_size, lr, width, depth, seed, log_every, clean
) -> Path:
    num_classes = dataset.num_classes
    schedule = schedule_from(config)
    shape = dataset.image_shape
    if shape is not None:
        arch: dict[str, Any] = {
            "arch": "conv",
            "image_shape": list(shape),
            "num_classes": num_classes,
            "channels": width,
        }
    else:
        arch = {"arch": "mlp", "num_classes": num_classes, "width": width, "depth": depth}
    with torch.random.fork_rng(devices=[]):  # initialise from the seed, leave global RNG be
        torch.manual_seed(seed)
        net = _build_classifier(arch, dataset.dim)
    start = time.time()
    losses = fit_classifier(
        net,
        dataset.sample_labeled,
        schedule,
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
        log_every=log_every,
        clean=clean,
    )
    times = (0.0,) if clean else (0.0, 0.1, 0.3, 0.5)
    accuracy = classifier_accuracy(net, _held_out(dataset, seed + 1), schedule, times=times)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    atomic_write(out / "classifier.safetensors", save_safetensors(tensors))
    record = {
        "format": CLASSIFIER_FORMAT,
        **arch,
        "dim": dataset.dim,
        "data": config.data.name,
        "data_options": config.data.options,
        "sde": {"name": config.sde.name, "kwargs": config.sde.kwargs},
        "clean": clean,
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "seed": seed,
        "final_loss": float(np.mean(losses[-50:])),
        "accuracy": accuracy,
        "seconds": round(time.time() - start, 1),
    }
    json_path = out / "classifier.json"
    atomic_write(json_path, json.dumps(record, indent=1))
    return json_path


def _build_classifier(meta: dict[str, Any], dim: int) -> nn.Module:
    if meta.get("arch", "mlp") == "conv":
        return ConvClassifier(
            meta["image_shape"][0],
            meta["num_classes"],
            channels=meta["channels"],
            image_shape=tuple(meta["image_shape"]),
        )
    return TimeClassifier(dim, meta["num_classes"], width=meta["width"], depth=meta["depth"])


def _held_out(dataset: Dataset, seed: int, n: int = 2000) -> tuple[Tensor, Tensor]:
    """Labeled held-out data: an image dataset's test split (levels at bin centres, in model
    space), else ``n`` fresh points."""
    labels = dataset.test_labels
    if labels is not None:
        return dataset.to_model(dataset.test_set(n)), labels[:n]
    return dataset.sample_labeled(n, torch.Generator().manual_seed(seed))


def classifier_accuracy(
    net: nn.Module,
    data: tuple[Tensor, Tensor],
    schedule: Schedule,
    *,
    times: tuple[float, ...] = (0.0, 0.1, 0.3, 0.5),
    seed: int = 1,
) -> dict[str, float]:
    """Accuracy of a time-dependent classifier on labeled data ``(x0, labels)`` noised to a
    few fixed times (relative to [t_min, T]: t = t_min + u (T − t_min); u = 0 is t_min)."""
    x0, labels = data
    gen = torch.Generator().manual_seed(seed)
    n = len(labels)
    result = {}
    with torch.no_grad():
        for u in times:
            t = torch.full((n,), schedule.t_min + u * (schedule.T - schedule.t_min))
            xt = schedule.perturb(x0, t, randn_like(x0, gen))
            pred = net(xt, t).argmax(dim=1)
            result[f"{u:g}"] = float((pred == labels).float().mean())
    return result


def load_classifier(folder: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """Load a classifier saved by :func:`train_classifier`: ``(net in eval mode, metadata)``.

    A conv classifier also takes flattened images ``(B, C·H·W)``.
    Raises ValueError / FileNotFoundError for a missing or foreign folder.
    """
    folder = Path(folder)
    json_path = folder / "classifier.json"
    if not json_path.is_file():
        raise FileNotFoundError(f"no classifier in {folder}: run sdelab train-classifier first")
    meta = json.loads(json_path.read_text())
    if meta.get("format") != CLASSIFIER_FORMAT:
        raise ValueError(f"{json_path} is not an sdelab classifier")
    net = _build_classifier(meta, meta["dim"])
    net.load_state_dict(load_safetensors((folder / "classifier.safetensors").read_bytes()))
    net.requires_grad_(False)
    return net.eval(), meta
