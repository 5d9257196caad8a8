"""What the loop does every so often besides checkpoints: samples while training
(``train.sample_every``) and the epoch length of ``train.ckpt_every_epochs``.

Samples come from the EMA model with the run's ``eval.sampler`` (default ``euler_maruyama``,
or ``chain``: the exact DDPM/NCSN chain of a discrete objective), ``eval.steps`` and
``eval.sampler_options``, always from the same seed, so the grids of successive steps show
the same noise becoming data. Each call writes ``samples/step_NNNNNNNN.npy`` (model space) and
``samples/step_NNNNNNNN.png``: an image grid for image data, a scatter beside the test data
for 2-D data (no PNG for other vector data).
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from sdelab import streams
from sdelab.data.png import save_level_grid
from sdelab.discrete import DiscreteScoreModel, sample_ddpm, sample_ncsn
from sdelab.parametrization import ScoreModel
from sdelab.plots import plot_samples
from sdelab.samplers import sample
from sdelab.train.build import Run
from sdelab.train.config import ConfigError, RunConfig
from sdelab.utils import atomic_write, derive_seed

__all__ = ["SAMPLES_DIR", "draw_samples", "epoch_steps", "sample_paths", "write_samples"]

SAMPLES_DIR = "samples"


def draw_samples(
    model: ScoreModel, config: RunConfig, n: int, generator: torch.Generator, device
) -> Tensor:
    """``n`` samples ``(n, ...)`` of ``model`` with ``config.eval``'s sampler, steps and
    options (``chain``: :func:`~sdelab.discrete.sample_ddpm` or
    :func:`~sdelab.discrete.sample_ncsn` on the model's chain)."""
    ev = config.eval
    shape = (n, *(config.model.image_shape or [config.model.dim]))
    options = dict(ev.sampler_options)
    if ev.sampler == "chain":
        if not isinstance(model, DiscreteScoreModel):
            raise ConfigError("eval.sampler=chain needs loss.objective ddpm or smld")
        chain = model.chain
        run_chain = sample_ddpm if chain.name == "ddpm" else sample_ncsn
        return run_chain(
            model.eps_at_step, chain, shape, generator=generator, device=device, **options
        )
    res = sample(
        model,
        model.schedule,
        shape,
        sampler=ev.sampler or "euler_maruyama",
        steps=ev.steps,
        generator=generator,
        device=device,
        **options,
    )
    return res.samples


def write_samples(run: Run) -> Path:
    """Draw ``eval.n_samples`` from the EMA model (fixed seed) and write
    ``samples/step_NNNNNNNN.npy`` and ``.png``; returns the ``.npy`` path."""
    cfg = run.config
    out = run.run_dir / SAMPLES_DIR
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"step_{run.step:08d}"
    gen = torch.Generator(device=run.device).manual_seed(
        derive_seed(cfg.train.seed, streams.TRAIN_SAMPLES)
    )
    model = run.ema.eval()
    try:
        with torch.no_grad():
            x = draw_samples(model, cfg, cfg.eval.n_samples, gen, run.device).cpu()
    finally:
        run.ema.train()
    buf = io.BytesIO()
    np.save(buf, x.numpy())
    atomic_write(stem.with_suffix(".npy"), buf.getvalue())
    data = run.dataset
    if data.num_levels is not None and hasattr(data, "to_levels"):
        levels = data.to_levels(x.clamp(-1e6, 1e6))
        save_level_grid(levels, data.num_levels, stem.with_suffix(".png"))
    elif x.ndim == 2 and x.shape[1] == 2:
        test = data.test_set(max(cfg.eval.n_samples, 500))
        plot_samples(
            test, x, stem.with_suffix(".png"), titles=("test data", f"samples, step {run.step}")
        )
    return stem.with_suffix(".npy")


def sample_paths(run_dir: str | Path) -> list[Path]:
    """The sample grids a run wrote while training, in step order."""
    return sorted((Path(run_dir) / SAMPLES_DIR).glob("step_*.png"))


def epoch_steps(run: Run) -> int:
    """Optimizer steps per ``train.ckpt_every_epochs`` (0 when off): ⌈epochs · N / batch⌉ for a
    training set of N examples; a clear error for data without a finite training set."""
    epochs = run.config.train.ckpt_every_epochs
    if not epochs:
        return 0
    size = getattr(run.dataset, "train_size", None)
    if size is None:
        raise ConfigError(
            f"train.ckpt_every_epochs={epochs}: dataset {run.config.data.name!r} draws fresh "
            "points and has no epochs; use train.ckpt_every instead"
        )
    return max(1, math.ceil(epochs * size / run.config.train.batch_size))
