"""Noise-conditional classifiers p_t(y | x_t) for classifier guidance: training on a run's
data and schedule, their files (``classifier.safetensors`` + ``classifier.json``), loading.

Vector data get a :class:`~sdelab.nets.classifier.TimeClassifier` MLP, image data a
:class:`~sdelab.nets.classifier.ConvClassifier`. :func:`train_classifier` trains in the shared
:class:`~sdelab.train.skeleton.TrainSkeleton` (the folder's lock, ``metrics.jsonl``,
checkpoints and ``--resume``, progress on stderr, SIGTERM/SIGINT saving a checkpoint);
:func:`fit_classifier` is the same step in a plain in-memory loop. The guidance itself is maths
(:func:`sdelab.controllable.guided_score_fn`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

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
from sdelab.train.rundir import TrainState
from sdelab.train.skeleton import TrainSkeleton
from sdelab.utils import atomic_write, randn_like

__all__ = ["classifier_step", "fit_classifier", "load_classifier", "train_classifier"]


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


def classifier_step(
    net: nn.Module,
    optimizer: torch.optim.Optimizer,
    sample_fn: Callable[[int, torch.Generator], tuple[Tensor, Tensor]],
    schedule: Schedule,
    generator: torch.Generator,
    batch_size: int,
    *,
    clean: bool = False,
) -> float:
    """One optimizer step of a time-dependent classifier: the cross-entropy of
    ``net(x_t, t)`` on a labeled batch ``sample_fn(batch_size, generator)`` noised by
    :func:`noised_batch` (all randomness from ``generator``). Returns the loss."""
    x0, labels = sample_fn(batch_size, generator)
    xt, t = noised_batch(x0, schedule, generator, clean=clean)
    loss = nn.functional.cross_entropy(net(xt, t), labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return float(loss.detach())


def fit_classifier(
    net: nn.Module,
    sample_fn: Callable[[int, torch.Generator], tuple[Tensor, Tensor]],
    schedule: Schedule,
    *,
    steps: int = 2000,
    batch_size: int = 256,
    lr: float = 1e-3,
    seed: int = 0,
    clean: bool = False,
) -> list[float]:
    """Train a time-dependent classifier on noised data in memory: minimise
    E_t CE(net(x_t, t), y) with Adam (:func:`classifier_step`).

    Times are uniform in [t_min, T], as for the score model (``clean``: t = t_min only, a
    classifier of clean data). Returns the loss per step; ``net`` ends in eval mode.
    """
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    net.train()
    losses = [
        classifier_step(net, opt, sample_fn, schedule, gen, batch_size, clean=clean)
        for _ in range(steps)
    ]
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
    clean: bool = False,
    log_every: int = 50,
    ckpt_every: int = 500,
    resume: bool = False,
    progress: bool = True,
) -> Path:
    """Train a noise-conditional classifier for a run's data and schedule and save it to ``out``.

    Vector data (toys) get a :class:`~sdelab.nets.classifier.TimeClassifier` MLP, image data a
    :class:`~sdelab.nets.classifier.ConvClassifier`; both are trained on the run's training
    data with its labels (``dataset.sample_labeled``: uniformly dequantized images).

    Args:
        run_or_config: a run folder written by ``sdelab train`` (its checkpoint's config is
            used), a YAML config path / built-in name, or a config dict.
        out: the classifier folder (absent or empty, unless ``resume``).
        steps, batch_size, lr: Adam on the cross-entropy of noised labeled data.
        width, depth: the MLP's hidden units and layers; for images ``width`` is the conv
            net's base channels (``depth`` unused).
        seed: data, times and initialisation.
        clean: train at t = t_min only: a classifier of clean data (e.g. to score samples),
            not one for guidance.
        log_every, ckpt_every: ``metrics.jsonl`` (step, loss, steps_per_s) and checkpoint
            cadence, in steps.
        resume: continue from the newest checkpoint in ``out`` (the same source and options;
            only ``steps`` may change), exactly as if it had not stopped.
        progress: show progress with an ETA and the loss on stderr.

    Returns:
        The path of ``classifier.json`` (written with ``classifier.safetensors`` when the
        training ends): the net's architecture, the options, the last step's loss and the
        accuracy on held-out data (the test split for images, fresh points for toys) at a few
        noise levels. ``out`` also holds ``metrics.jsonl`` and ``checkpoints/``.

    Raises:
        ValueError: a dataset without labels, a bad size, a non-empty ``out`` without
            ``resume``, resuming with other options, ``out`` locked by another live process
            (:class:`~sdelab.train.rundir.RunLockedError`).
        TrainingInterrupted: SIGTERM/SIGINT, after saving a checkpoint
            (:class:`~sdelab.train.skeleton.TrainingInterrupted`).
    """
    sizes = (steps, batch_size, width, depth, log_every, ckpt_every)
    if min(sizes) < 1 or not lr > 0:
        raise ValueError(
            "need positive --steps, --batch-size, --width, --depth, --log-every, --ckpt-every "
            f"and --lr, got {', '.join(str(v) for v in sizes)}, {lr}"
        )
    src = Path(run_or_config) if isinstance(run_or_config, (str, Path)) else None
    if src is not None and src.is_dir() and list_checkpoints(src):
        config = load_checkpoint(src).config
    else:
        config = load_config(run_or_config)
    dataset = make_run_dataset(config)
    if not dataset.num_classes:
        raise no_labels_error(config.data.name)
    skeleton = TrainSkeleton(
        out,
        "sdelab train-classifier",
        steps=steps,
        ckpt_every=ckpt_every,
        log_every=log_every,
        keep_last=2,
        resume=resume,
        progress=progress,
    )
    with skeleton:
        schedule = schedule_from(config)
        arch = _arch(dataset, width, depth)
        with torch.random.fork_rng(devices=[]):  # initialise from the seed, leave global RNG be
            torch.manual_seed(seed)
            net = _build_classifier(arch, dataset.dim)
        optimizer = torch.optim.Adam(net.parameters(), lr=lr)
        gen = torch.Generator().manual_seed(seed)
        state = TrainState({"net": net}, optimizer, {"data": gen})
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
        }
        if skeleton.resuming:
            skeleton.check_options(record)  # the same source and options; only steps may change
            skeleton.restore(state)
        start = time.time()
        net.train()

        def step() -> dict[str, float]:
            loss = classifier_step(
                net, optimizer, dataset.sample_labeled, schedule, gen, batch_size, clean=clean
            )
            return {"loss": loss}

        metrics = skeleton.run(state, step, config=record)
        net.eval()
        if metrics is None:  # resumed at its last step already: the loss of that checkpoint
            metrics = load_checkpoint(out).meta["metrics"]
        times = (0.0,) if clean else (0.0, 0.1, 0.3, 0.5)
        accuracy = classifier_accuracy(net, _held_out(dataset, seed + 1), schedule, times=times)
        tensors = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
        atomic_write(Path(out) / "classifier.safetensors", save_safetensors(tensors))
        record.update(
            final_loss=float(metrics["loss"]),
            accuracy=accuracy,
            seconds=round(time.time() - start, 1),
        )
        json_path = Path(out) / "classifier.json"
        atomic_write(json_path, json.dumps(record, indent=1))
    return json_path


def _arch(dataset: Dataset, width: int, depth: int) -> dict[str, Any]:
    """The classifier's architecture record: a conv net for images, an MLP otherwise."""
    shape = dataset.image_shape
    if shape is not None:
        return {
            "arch": "conv",
            "image_shape": list(shape),
            "num_classes": dataset.num_classes,
            "channels": width,
        }
    return {"arch": "mlp", "num_classes": dataset.num_classes, "width": width, "depth": depth}


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
