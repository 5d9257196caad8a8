"""Datasets: 2-D toys, the Gaussian oracle, N×D arrays and images (loaders in
:mod:`sdelab.data.images`, the training adapter :class:`~sdelab.data.image_data.ImageData`).

A dataset follows the :class:`~sdelab.data.base.Dataset` protocol: ``name``, ``dim``,
``sample(n, generator) -> (n, D)`` (fresh training points), ``test_set(n) -> (n, D)`` (fixed for
its seed), ``entropy() -> float | None`` (nats), ``num_classes`` (0: no labels),
``sample_labeled(n, generator) -> (points, labels)`` (the points ``sample`` draws, with their
class labels; raises ``ValueError`` without labels), and the capabilities of image data
(``num_levels``, ``image_shape``, ``scale``/``shift``, ``data_range``, ``test_labels``,
``load``), which vector data leave at ``None`` (:class:`~sdelab.data.base.VectorData`).
:data:`DATASETS` maps names to factories ``factory(seed=..., **options)``; :func:`make_dataset`
builds one and validates the options.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from functools import partial
from typing import Any

from sdelab.data.arrays import ArrayDataset, load_array
from sdelab.data.base import Dataset, VectorData
from sdelab.data.image_data import IMAGE_DATA_NAMES, ImageData
from sdelab.data.toys import (
    TOYS,
    OracleDataset,
    ToyDataset,
    sample_toy,
    toy_entropy,
    toy_log_prob,
)

__all__ = [
    "DATASETS",
    "TOYS",
    "ArrayDataset",
    "Dataset",
    "ImageData",
    "OracleDataset",
    "ToyDataset",
    "VectorData",
    "dataset_options",
    "load_array",
    "make_dataset",
    "sample_toy",
    "toy_entropy",
    "toy_log_prob",
]


#: Datasets by name: ``factory(seed=0, **options) -> Dataset``. The eight toys take no options;
#: ``oracle`` takes ``mean``, ``cov``; ``array`` takes ``path`` and ``test_fraction``; the image
#: datasets (digits, fashion_mnist, mnist, cifar10, imagenet32, imagenet64, folder) take
#: ``root``, ``size``, ``channels``, ``data_range``, ``hflip``, ``test_split``, ``classes``
#: (:class:`ImageData`).
DATASETS: dict[str, Callable[..., Dataset]] = {
    **{name: partial(ToyDataset, name) for name in TOYS},
    "oracle": OracleDataset,
    "array": ArrayDataset,
    **{name: partial(ImageData, name) for name in IMAGE_DATA_NAMES},
}


def dataset_options(name: str) -> list[str]:
    """The option names dataset ``name`` accepts (besides ``seed``)."""
    factory = DATASETS[name]
    fn = factory.func if isinstance(factory, partial) else factory
    skip = {"self", "seed", "name"}
    return [p for p in inspect.signature(fn).parameters if p not in skip]


def make_dataset(name: str, seed: int = 0, **options: Any) -> Dataset:
    """Build dataset ``name`` (a key of :data:`DATASETS`) for run seed ``seed``.

    Raises ``ValueError`` naming the valid choices for an unknown name or option.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}: choose one of {', '.join(DATASETS)}")
    valid = dataset_options(name)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(
            f"unknown option(s) {', '.join(unknown)} for dataset {name!r}: "
            f"valid are {', '.join(valid) or 'none'}"
        )
    return DATASETS[name](seed=seed, **options)
