"""Any N×D array from a ``.npy`` or ``.csv`` file as a dataset (tabular data, saved samples)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from sdelab import streams
from sdelab.data.base import VectorData
from sdelab.data.toys import no_labels_error
from sdelab.utils import derive_seed

__all__ = ["ArrayDataset", "load_array"]


def _read_csv(path: Path) -> np.ndarray:
    with path.open() as f:
        first = f.readline()
    try:  # a header is a first line that is not all numbers
        [float(tok) for tok in first.strip().split(",")]
        skip = 0
    except ValueError:
        skip = 1
    try:
        return np.loadtxt(path, delimiter=",", skiprows=skip, dtype=np.float64, ndmin=2)
    except ValueError as e:
        raise ValueError(
            f"cannot read {path} as numbers ({e}): write a comma-separated file of N rows and "
            "D numeric columns, with at most one header line"
        ) from None


def load_array(path: str | Path) -> np.ndarray:
    """Load an N×D float array from ``.npy`` (no pickles) or ``.csv`` (optional header line).

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: unknown extension, not 2-D, fewer than 2 rows, or NaN/inf entries; each
            message says how to fix the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"array file {path} not found: pass an existing .npy or .csv path")
    suffix = path.suffix.lower()
    if suffix == ".npy":
        try:
            arr = np.load(path, allow_pickle=False)
        except ValueError as e:
            raise ValueError(
                f"cannot read {path} as a numeric .npy array ({e}): save it with np.save(path, "
                "array.astype(np.float32))"
            ) from None
    elif suffix == ".csv":
        arr = _read_csv(path)
    else:
        raise ValueError(f"unsupported array file {path}: use a .npy or .csv file")
    if arr.ndim != 2:
        raise ValueError(
            f"{path} holds an array of shape {arr.shape}: need a 2-D N×D array "
            "(reshape it to (N, D) before saving)"
        )
    if not np.issubdtype(arr.dtype, np.number):
        raise ValueError(f"{path} holds {arr.dtype} data: need a numeric N×D array")
    if arr.shape[0] < 2 or arr.shape[1] < 1:
        raise ValueError(f"{path} has shape {arr.shape}: need at least 2 rows and 1 column")
    bad = ~np.isfinite(arr)
    if bad.any():
        row = int(np.argwhere(bad)[0, 0])
        raise ValueError(
            f"{path} contains {int(bad.sum())} NaN/inf values (first in row {row}): "
            "drop or impute those rows"
        )
    return arr.astype(np.float32)


class ArrayDataset(VectorData):
    """An N×D array as a dataset: rows shuffled once by the seed, the last ``test_fraction`` held
    out as the test set, training batches drawn with replacement from the rest.

    Args:
        path: ``.npy`` or ``.csv`` file, see :func:`load_array`.
        seed: the run seed (fixes the split).
        test_fraction: share of rows held out, in (0, 1).
    """

    def __init__(self, path: str, seed: int = 0, test_fraction: float = 0.1) -> None:
        if not 0 < test_fraction < 1:
            raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction}")
        arr = torch.from_numpy(load_array(path))
        g = torch.Generator().manual_seed(derive_seed(seed, streams.ARRAY_SPLIT))
        perm = torch.randperm(len(arr), generator=g)
        n_test = max(1, round(test_fraction * len(arr)))
        if n_test >= len(arr):
            raise ValueError(f"{path} has {len(arr)} rows: too few to hold out a test set")
        self.name = "array"
        self.path = str(path)
        self.seed = int(seed)
        self.train = arr[perm[n_test:]]  # (N − n_test, D)
        self.test = arr[perm[:n_test]]  # (n_test, D)
        self.dim = arr.shape[1]
        self.num_classes = 0  # arrays carry no labels

    @property
    def train_size(self) -> int:
        """Number of training rows (one epoch of ``train.ckpt_every_epochs``)."""
        return len(self.train)

    def sample(self, n: int, generator: torch.Generator) -> Tensor:
        """``n`` training rows drawn with replacement, ``(n, D)`` float32."""
        return self.train[torch.randint(len(self.train), (n,), generator=generator)]

    def sample_labeled(self, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """Arrays have no labels: always raises ``ValueError``."""
        raise no_labels_error(self.name)

    def test_set(self, n: int) -> Tensor:
        """Up to ``n`` held-out rows (all of them if fewer), always the same for the seed."""
        return self.test[:n]

    def entropy(self) -> float | None:
        """Unknown for empirical data: ``None``."""
        return None
