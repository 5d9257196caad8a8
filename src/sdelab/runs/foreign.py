"""Models trained elsewhere (diffusers, via :func:`sdelab.interop.load_diffusers`) as sources
of the run operations: :class:`ForeignRun` holds ``(score_fn, schedule, dataset)`` for
:func:`~sdelab.runs.likelihood.run_likelihood`, and :func:`foreign_sample` draws samples through
the same sharded loop as a run."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from sdelab.data import Dataset
from sdelab.interop import DiffusersModel
from sdelab.runs.sampling import sample_chunks
from sdelab.samplers import SampleResult
from sdelab.sde import Schedule

__all__ = ["ForeignRun", "foreign_run", "foreign_sample"]


@dataclass(frozen=True)
class ForeignRun:
    """A model trained elsewhere with the data set it is evaluated on: what
    :func:`~sdelab.runs.likelihood.run_likelihood` reads from a run (the same attributes as
    :class:`~sdelab.runs.core.LoadedRun` where they apply).

    Attributes:
        model: the score function ``score_fn(x, t)`` (an ``nn.Module`` on the evaluation device).
        schedule: its continuous-time schedule.
        dataset: the data set whose integer levels are evaluated (mapped to the model's space).
        run_dir: the folder that holds resumable evaluations (``run_dir/eval/likelihood``);
            ``None``: none can be kept (the evaluation is not resumable).
        source: what the model is (one line, for messages and records).
        path: the model's folder.
        step: ``None`` (a foreign model has no checkpoint steps).
    """

    model: nn.Module
    schedule: Schedule
    dataset: Dataset
    run_dir: Path | None
    source: str
    path: Path
    step: int | None = None


def foreign_run(
    model: DiffusersModel, dataset: Dataset, *, run_dir: str | Path | None = None
) -> ForeignRun:
    """A diffusers model (:func:`sdelab.interop.load_diffusers`) with the image data set it is
    evaluated on, as a source for :func:`~sdelab.runs.likelihood.run_likelihood`.

    Raises:
        ValueError: continuous data, an image shape other than the model's, or a map to model
            space other than the model's ([−1, 1]).
    """
    if dataset.num_levels is None:
        raise ValueError(
            f"data set {dataset.name!r} is continuous: --diffusers models are image models, "
            "evaluate them on image data (e.g. --data cifar10)"
        )
    if tuple(dataset.image_shape) != tuple(model.image_shape):
        raise ValueError(
            f"the model takes images of shape {model.image_shape}, data set {dataset.name!r} has "
            f"{tuple(dataset.image_shape)}: pick matching data (--data-option size=/channels=)"
        )
    if (dataset.scale, dataset.shift) != (model.scale, model.shift):
        raise ValueError(
            f"the model works on [-1, 1] but data set {dataset.name!r} is mapped to "
            f"{dataset.data_range}: use --data-option data_range=[-1,1]"
        )
    return ForeignRun(
        model=model.score_fn,
        schedule=model.schedule,
        dataset=dataset,
        run_dir=None if run_dir is None else Path(run_dir),
        source=model.describe(),
        path=Path(model.path).resolve(),
    )


def foreign_sample(
    model: DiffusersModel,
    *,
    n: int,
    sampler: str = "dpm_solver",
    steps: int = 20,
    seed: int = 0,
    options: dict[str, Any] | None = None,
    batch_size: int | None = None,
) -> SampleResult:
    """Samples ``(n, C, H, W)`` in [−1, 1] of a model trained elsewhere with any sdelab sampler,
    chunked, seeded per chunk and split over launched processes like :func:`sample_run`."""
    return sample_chunks(
        model.score_fn,
        model.schedule,
        tuple(model.image_shape),
        n=n,
        sampler=sampler,
        steps=steps,
        seed=seed,
        options=options,
        batch_size=batch_size,
        device=next(iter(model.unet.parameters())).device,
        source=f"the model {model.path}",
    )
