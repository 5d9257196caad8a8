"""What every dataset offers: the :class:`Dataset` protocol, and the defaults of continuous
(vector) data in :class:`VectorData`.

Image datasets (:class:`~sdelab.data.image_data.ImageData`) serve integer levels and set the
optional capabilities; vector datasets (toys, the oracle, arrays) leave them at "none".
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

__all__ = ["Dataset", "VectorData"]


@runtime_checkable
class Dataset(Protocol):
    """What the training loop, evaluation and the CLI use of a dataset.

    Attributes:
        name: the dataset's name (a key of :data:`sdelab.data.DATASETS`).
        dim: data dimension D (C·H·W for images).
        num_classes: number of class labels (0: no labels).
        num_levels: L for data of integer levels (images), ``None`` for continuous data.
        image_shape: ``(C, H, W)`` for images, else ``None``.
        scale, shift: the map y = scale·(k + u)/L + shift of levels to model space (images;
            1 and 0 for continuous data, where it is unused).
        data_range: ``"[-1,1]"`` or ``"[0,1]"`` for images, else ``None``.
        test_labels: labels of the test set ``(N,)`` when there is a labeled test split.
    """

    name: str
    dim: int
    num_classes: int
    num_levels: int | None
    image_shape: tuple[int, int, int] | None
    scale: float
    shift: float
    data_range: str | None
    test_labels: Tensor | None

    def sample(self, n: int, generator: torch.Generator) -> Tensor:
        """``n`` fresh training points in model space."""
        ...

    def sample_labeled(self, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """The points ``sample`` draws, with their labels; ``ValueError`` without labels."""
        ...

    def test_set(self, n: int) -> Tensor:
        """The first ``n`` points of the fixed test set (integer levels for images)."""
        ...

    def entropy(self) -> float | None:
        """The data's differential entropy in nats when known, else ``None``."""
        ...

    def load(self) -> object:
        """Read lazily loaded files now (so a missing file fails before any work)."""
        ...


class VectorData:
    """Defaults of continuous vector data: no levels, no image shape, no labeled test split,
    nothing to load."""

    num_levels: int | None = None
    image_shape: tuple[int, int, int] | None = None
    scale: float = 1.0
    shift: float = 0.0
    data_range: str | None = None
    test_labels: Tensor | None = None

    def load(self) -> None:
        """Vector data are in memory: nothing to read."""
        return None
