"""Models trained elsewhere (diffusers, via :func:`sdelab.interop.load_diffusers`): bits/dim on
a data set and samples, through the same sharded loops as a run."""

from __future__ import annotations

from typing import Any

from sdelab.data import Dataset
from sdelab.interop import DiffusersModel
from sdelab.likelihood.bpd import EvaluationResult, evaluate_sharded
from sdelab.runs.core import METHODS
from sdelab.runs.sampling import sample_chunks
from sdelab.samplers import SampleResult


# ---- models trained elsewhere ----------------------------------------------------------------
def foreign_likelihood(
    model: DiffusersModel,
    dataset: Dataset,
    *,
    method: str = "ode",
    n: int = 2000,
    batch_size: int = 500,
    exact_trace: bool = False,
    probes: int = 1,
    seed: int = 0,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    dequantization: str = "uniform",
    progress: bool = True,
) -> EvaluationResult:
    """Test-set bits/dim of a model trained elsewhere (:func:`sdelab.interop.load_diffusers`)
    on ``dataset``'s integer test levels, dequantized and mapped to the model's space [−1, 1].

    Batches are split over launched processes and seeded per batch exactly as for a run
    (:func:`sdelab.likelihood.bpd.evaluate_sharded`).

    Raises:
        ValueError: continuous data, an image shape other than the model's, or a data range
            other than the model's.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}: choose one of {', '.join(METHODS)}")
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
    kwargs: dict[str, Any] = {}
    if method == "ode":
        kwargs = dict(rtol=rtol, atol=atol)
        kwargs.update(
            divergence="exact" if exact_trace else "hutchinson",
            **({} if exact_trace else {"n_probes": probes}),
        )
    device = next(iter(model.unet.parameters())).device
    return evaluate_sharded(
        model.score_fn,
        model.schedule,
        dataset.test_set(n),
        estimator=method,
        batch_size=batch_size,
        seed=seed,
        device=device,
        progress=progress,
        levels=dataset.num_levels,
        scale=model.scale,
        shift=model.shift,
        dequantization=dequantization,
        **kwargs,
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
