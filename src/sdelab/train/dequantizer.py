"""Variational dequantizer runs: train a flow q(u | k) against a frozen trained run, in a
folder of its own with the conventions of ``sdelab train``.

A dequantizer folder holds ``dequantizer.json`` (format, the score run it belongs to, the data's
levels / image shape / map to model space, the flow's size and the training options),
``metrics.jsonl`` (step, loss in bits/dim, steps/s) and ``checkpoints/`` (safetensors + JSON,
written atomically: ``flow.*``, ``ema.*``, ``optim.*`` and the generator states), so a run
killed at any moment resumes exactly with ``--resume``. The loop runs in the shared
:class:`~sdelab.train.skeleton.TrainSkeleton`: the folder is locked while it is written,
progress with an ETA goes to stderr, and SIGTERM/SIGINT save a checkpoint and stop
(:class:`~sdelab.train.skeleton.TrainingInterrupted`).

The score model stays frozen (ScoreFlow's ``--mode=train_deq``): the flow minimises the
ScoreFlow bound of −log p_model(a(k+u)/L + b) + log q(u | k)
(:func:`sdelab.likelihood.dequantizer.dequantizer_step`); evaluation uses the exact ODE
likelihood (``sdelab likelihood RUN --dequantizer DIR``).
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from sdelab import streams
from sdelab.likelihood.dequantizer import dequantizer_step
from sdelab.nets.dequantizer import DEQUANTIZER_PRESETS, Dequantizer, DequantizerConfig
from sdelab.train.build import load_run, make_run_dataset
from sdelab.train.checkpoint import load_checkpoint, prefixed
from sdelab.train.rundir import TrainState
from sdelab.train.skeleton import TrainSkeleton, ema_decay_at, update_ema
from sdelab.utils import atomic_write, check_int, derive_seed

__all__ = [
    "check_dequantizer_fits",
    "load_dequantizer",
    "train_dequantizer_run",
]

DEQUANTIZER_FORMAT = "sdelab-dequantizer"
DEQUANTIZER_FILE = "dequantizer.json"


def _record(run_dir: Path, dataset: Any, flow: Dequantizer, options: dict[str, Any]) -> dict:
    return {
        "format": DEQUANTIZER_FORMAT,
        "run": str(run_dir.resolve()),
        "levels": flow.levels,
        "image_shape": list(flow.image_shape),
        "scale": float(dataset.scale),
        "shift": float(dataset.shift),
        "data_range": dataset.data_range,
        "flow": asdict(flow.config),
        "training": options,
    }


def train_dequantizer_run(
    run_dir: str | Path,
    out: str | Path,
    *,
    steps: int = 2000,
    batch_size: int = 64,
    lr: float = 1e-3,
    preset: str = "small",
    ema_decay: float = 0.999,
    n_samples: int = 2,
    ckpt_every: int = 500,
    log_every: int = 50,
    seed: int = 0,
    resume: bool = False,
    progress: bool = True,
) -> Path:
    """Train a variational dequantizer for a trained image run and save it in ``out``.

    Args:
        run_dir: a run folder of ``sdelab train`` on image data (integer levels); its EMA
            score model is used, frozen.
        out: the dequantizer folder (new or empty, unless ``resume``).
        steps, batch_size, lr: Adam on the ScoreFlow bound of training images (levels drawn
            from the run's training split).
        preset: the flow's size (:data:`~sdelab.nets.dequantizer.DEQUANTIZER_PRESETS`:
            ``small`` for CPUs, ``flowpp`` the seed's Flow++ size).
        ema_decay: the exponential moving average of the flow's weights (evaluation uses it).
        n_samples: Monte-Carlo draws of the bound per image and step.
        ckpt_every, log_every: checkpoint and log cadence (steps).
        seed: the flow's initialisation, the batches and the bound's noise.
        resume: continue from the newest checkpoint in ``out`` (options must match).
        progress: show progress with an ETA and the loss on stderr.

    Returns:
        The folder's ``dequantizer.json``.

    Raises:
        ValueError: a run without integer levels, an unknown preset, bad sizes, a non-empty
            ``out`` without ``resume``, resuming with other options, or ``out`` locked by
            another live process (:class:`~sdelab.train.rundir.RunLockedError`).
        TrainingInterrupted: SIGTERM/SIGINT, after saving a checkpoint.
    """
    for name, value, low in (
        ("steps", steps, 1),
        ("batch_size", batch_size, 1),
        ("ckpt_every", ckpt_every, 1),
        ("log_every", log_every, 1),
        ("n_samples", n_samples, 2),
    ):
        check_int(name, value, low)
    if not lr > 0 or not 0 <= ema_decay < 1:
        raise ValueError(f"need lr > 0 and 0 <= ema_decay < 1, got lr={lr}, ema_decay={ema_decay}")
    if preset not in DEQUANTIZER_PRESETS:
        raise ValueError(
            f"unknown preset {preset!r}: choose one of {', '.join(DEQUANTIZER_PRESETS)}"
        )
    run_dir, out = Path(run_dir), Path(out)
    skeleton = TrainSkeleton(
        out,
        "sdelab train-dequantizer",
        steps=steps,
        ckpt_every=ckpt_every,
        log_every=log_every,
        keep_last=2,
        resume=resume,
        progress=progress,
    )
    with skeleton:
        config, model, schedule = load_run(run_dir)
        dataset = make_run_dataset(config)
        if dataset.num_levels is None:
            raise ValueError(
                f"run {run_dir} trains on continuous data: a dequantizer needs image data with "
                "integer levels"
            )
        dataset.load()
        options = dict(
            steps=steps,
            batch_size=batch_size,
            lr=lr,
            preset=preset,
            ema_decay=ema_decay,
            n_samples=n_samples,
            seed=seed,
        )
        flow = Dequantizer(dataset.image_shape, dataset.num_levels, preset, seed=seed)
        ema = copy.deepcopy(flow).requires_grad_(False)
        optimizer = torch.optim.Adam(flow.parameters(), lr=lr)
        data_gen = torch.Generator().manual_seed(derive_seed(seed, streams.DEQUANTIZER_DATA))
        loss_gen = torch.Generator().manual_seed(derive_seed(seed, streams.DEQUANTIZER_LOSS))
        state = TrainState(
            {"flow": flow, "ema": ema}, optimizer, {"data": data_gen, "loss": loss_gen}
        )
        record = _record(run_dir, dataset, flow, options)
        if skeleton.resuming:
            skeleton.check_options(record)  # the same run and options; only steps may change
            skeleton.restore(state)
        atomic_write(out / DEQUANTIZER_FILE, json.dumps(record, indent=1) + "\n")

        def step() -> dict[str, float]:
            k = dataset.sample_levels(batch_size, data_gen)
            loss = dequantizer_step(
                model,
                schedule,
                k,
                flow,
                optimizer,
                levels=dataset.num_levels,
                scale=dataset.scale,
                shift=dataset.shift,
                n_samples=n_samples,
                generator=loss_gen,
            )
            update_ema(ema, flow, ema_decay_at(ema_decay, skeleton.step + 1))
            return {"loss_bpd": loss}

        skeleton.run(state, step, config=record, show=("loss_bpd",))
    return out / DEQUANTIZER_FILE


def load_dequantizer(folder: str | Path, which: str = "ema") -> tuple[Dequantizer, dict]:
    """A trained dequantizer (EMA weights by default, ``"raw"`` for the trained ones) from
    its newest checkpoint, in eval mode and frozen, with its ``dequantizer.json`` record.

    Raises:
        FileNotFoundError: no dequantizer in ``folder``. ValueError: a foreign file, ``which``,
            a ``dequantizer.json`` that does not match the checkpoint's tensors.
    """
    if which not in ("ema", "raw"):
        raise ValueError(f"unknown weights {which!r}: choose one of ema, raw")
    folder = Path(folder)
    path = folder / DEQUANTIZER_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"no dequantizer in {folder}: run sdelab train-dequantizer RUN --out {folder} first"
        )
    try:
        record = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}): train the dequantizer again") from None
    if not isinstance(record, dict) or record.get("format") != DEQUANTIZER_FORMAT:
        raise ValueError(f"{path} is not an sdelab dequantizer")
    ckpt = load_checkpoint(folder)
    try:
        flow = Dequantizer(
            tuple(record["image_shape"]), record["levels"], DequantizerConfig(**record["flow"])
        )
        flow.load_state_dict(prefixed(ckpt.tensors, "ema" if which == "ema" else "flow"))
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        first = (str(e).strip().splitlines() or [""])[0][:160]
        raise ValueError(
            f"{path} does not match the tensors of {ckpt.path} ({type(e).__name__}: {first}): "
            "the record was edited or belongs to another dequantizer; train it again (sdelab "
            "train-dequantizer)"
        ) from None
    return flow.requires_grad_(False).eval(), record


def check_dequantizer_fits(record: dict, dataset: Any, source: str | Path) -> None:
    """Refuse a dequantizer made for other data (levels, image shape, map to model space) with
    a one-line ``ValueError`` naming the mismatch."""
    have = {
        "levels": dataset.num_levels,
        "image_shape": None if dataset.image_shape is None else list(dataset.image_shape),
        "scale": float(dataset.scale),
        "shift": float(dataset.shift),
    }
    for key, value in have.items():
        if record[key] != value:
            raise ValueError(
                f"dequantizer {source} was made for {key}={record[key]}, but this run's data "
                f"have {key}={value}: train a dequantizer for this run (sdelab "
                "train-dequantizer)"
            )
