r"""Image datasets for the training loop: the :class:`~sdelab.data.Dataset` protocol over
:mod:`sdelab.data.images`.

:class:`ImageData` is what ``data: {name: digits | fashion_mnist | mnist | cifar10 | imagenet32 |
imagenet64 | folder}`` builds. It keeps the integer levels k ∈ {0, …, L−1} and hands out

- ``sample(n, generator)``: a training minibatch drawn uniformly with replacement, optionally
  flipped left–right, **uniformly dequantized** and mapped to model space,

      x = (k + u) / L,  u ~ U[0, 1)^D,        y = a·x + b,   (a, b) = DATA_RANGES[data_range]

  as a float tensor ``(n, C, H, W)``;
- ``test_set(n)``: the first ``n`` test images as **integer levels** ``(n, C, H, W)``
  (``int64``), not model-space values. The likelihood code does the dequantization and the
  accounting: ``evaluate_likelihood(model, schedule, batches, levels=data.num_levels,
  scale=data.scale, shift=data.shift)`` draws u, maps to y and reports

      bpd = (E_u[−log p_y(y)] − D log a + D log L) / (D log 2)

  (DESIGN.md, "Bits per dimension"), so every bpd says which dequantization it used and the
  map to model space is written in one place.

The files are read lazily (on the first ``sample``/``test_set``/``labels``) and cached per
process, so building the dataset to resolve a config (``--dry-run``) needs no data files: the
image shape of ``digits``/``mnist``/``fashion_mnist``/``cifar10`` is known in advance
(:func:`image_shape_for`). :meth:`ImageData.load` reads (and checks) the training files now.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
from torch import Tensor

from sdelab.data.images import (
    DATA_RANGES,
    IMAGE_DATASETS,
    ImageDataset,
    load_digits,
    random_hflip,
)
from sdelab.data.toys import no_labels_error
from sdelab.likelihood.dequantization import to_model_space

__all__ = ["IMAGE_DATA_NAMES", "ImageData", "image_shape_for"]

#: Native (C, H, W) and number of levels of the built-in image datasets (``folder``: unknown).
NATIVE_SHAPES: dict[str, tuple[tuple[int, int, int], int]] = {
    "digits": ((1, 8, 8), 17),
    "mnist": ((1, 28, 28), 256),
    "fashion_mnist": ((1, 28, 28), 256),
    "cifar10": ((3, 32, 32), 256),
    "imagenet32": ((3, 32, 32), 256),
    "imagenet64": ((3, 64, 64), 256),
}
#: Number of classes of the built-in sets (known without reading files).
NUM_CLASSES: dict[str, int] = {
    "digits": 10, "mnist": 10, "fashion_mnist": 10, "cifar10": 10,
    "imagenet32": 1000, "imagenet64": 1000,
}  # fmt: skip
#: Dataset names (keys of ``sdelab.data.DATASETS``) served by :class:`ImageData`.
IMAGE_DATA_NAMES: tuple[str, ...] = (
    "digits", "fashion_mnist", "mnist", "cifar10", "imagenet32", "imagenet64", "folder",
)  # fmt: skip
_LOADER = {"fashion_mnist": "fashion-mnist"}
_SPLITS = ("train", "test")


def image_shape_for(name: str, options: dict | None = None) -> tuple[int, int, int] | None:
    """(C, H, W) of image dataset ``name`` with ``options`` (size, channels), without I/O.

    ``None`` for a ``folder`` without ``size`` (its images decide). Raises ``ValueError`` for
    a name that is not an image dataset.
    """
    options = options or {}
    size, channels = options.get("size"), options.get("channels")
    if name == "folder":
        c = 3 if channels is None else int(channels)
        return None if size is None else (c, int(size), int(size))
    if name not in NATIVE_SHAPES:
        raise ValueError(
            f"{name!r} is not an image dataset: choose one of {', '.join(IMAGE_DATA_NAMES)}"
        )
    (c, h, w), _ = NATIVE_SHAPES[name]
    if channels is not None:
        c = int(channels)
    if size is not None:
        h = w = int(size)
    return (c, h, w)


#: Decoded splits shared by every :class:`ImageData` of this process (decoding takes seconds):
#: ``(name, root, split, size, channels) -> (signature of the files, split)``, at most
#: :data:`CACHE_SIZE` entries. An entry is used only while its files are unchanged (the
#: signature: size and mtime of ``root`` and of every file in it); :func:`clear_cache` empties it.
_CACHE: dict[tuple, tuple[tuple, ImageDataset]] = {}
CACHE_SIZE = 4


def clear_cache() -> None:
    """Forget every decoded split: the next read decodes the files again."""
    _CACHE.clear()


def _signature(root: str | None) -> tuple:
    """What identifies the files under ``root`` as they are now (``()`` for bundled data)."""
    if root is None or not os.path.exists(root):
        return ()
    entries = []
    for folder, _, files in os.walk(root):
        for name in files:
            try:
                st = os.stat(os.path.join(folder, name))
            except OSError:
                continue
            entries.append((folder, name, st.st_size, st.st_mtime_ns))
    return tuple(sorted(entries))


def _cached_load(
    name: str, root: str | None, split: str, size: int | None, channels: int | None
) -> ImageDataset:
    """:func:`_load` through the process cache (see :data:`_CACHE`)."""
    key = (name, root, split, size, channels)
    signature = _signature(root)
    hit = _CACHE.get(key)
    if hit is not None and hit[0] == signature:
        return hit[1]
    data = _load(name, root, split, size, channels)
    _CACHE.pop(key, None)
    _CACHE[key] = (signature, data)
    while len(_CACHE) > CACHE_SIZE:  # the oldest entry goes
        del _CACHE[next(iter(_CACHE))]
    return data


def _load(
    name: str, root: str | None, split: str, size: int | None, channels: int | None
) -> ImageDataset:
    if name == "mnist" and root is None:
        raise FileNotFoundError(
            "mnist: no data.options.root given; expected train-images-idx3-ubyte, "
            "train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte "
            "(each optionally .gz) in it (sdelab downloads nothing)"
        )
    if name == "digits":  # a fixed split (seed 0) so test bits/dim compare across run seeds
        return load_digits(root, split, size=size, channels=channels, seed=0)
    return IMAGE_DATASETS[_LOADER.get(name, name)](root, split, size=size, channels=channels)


def _check_classes(classes, num_classes: int | None) -> tuple[int, ...]:
    """``classes`` as a sorted tuple of distinct labels; ``ValueError`` naming the bad one."""
    if isinstance(classes, (str, int)) or not hasattr(classes, "__iter__"):
        raise ValueError(
            f"data.options.classes must be a list of labels such as [0, 1, 2], got {classes!r}"
        )
    out = []
    for c in classes:
        if isinstance(c, bool) or not isinstance(c, int) or c < 0:
            raise ValueError(f"data.options.classes: {c!r} is not a label (a whole number ≥ 0)")
        if num_classes is not None and c >= num_classes:
            raise ValueError(
                f"data.options.classes: label {c} does not exist (this dataset has labels "
                f"0…{num_classes - 1})"
            )
        out.append(c)
    if not out:
        raise ValueError("data.options.classes is empty: name at least one label, or drop it")
    return tuple(sorted(set(out)))


def _keep_classes(data: ImageDataset, classes: tuple[int, ...]) -> ImageDataset:
    """The images of ``data`` whose label is in ``classes`` (order kept)."""
    if data.labels is None:
        raise ValueError(
            f"data.options.classes: {data.name} has no labels to select by; drop the option"
        )
    keep = torch.isin(data.labels, torch.tensor(classes, dtype=data.labels.dtype))
    return ImageDataset(
        data.levels[keep], data.num_levels, data.labels[keep], data.classes,
        f"{data.name} (classes {', '.join(map(str, classes))})",
    )  # fmt: skip


class ImageData:
    """An image dataset as the training loop sees it (see the module docstring).

    Args:
        name: ``digits``, ``fashion_mnist``, ``mnist``, ``cifar10``, ``imagenet32``,
            ``imagenet64`` or ``folder``.
        seed: the run seed (unused: minibatches come from the loop's generator; the digits
            split is fixed).
        root: folder with the files (``digits`` needs none; ``fashion_mnist`` defaults to
            Debian's ``/usr/share/datasets/fashion-mnist``).
        size: resize the shorter side and centre-crop to ``size × size`` (``None``: native).
        channels: 1 or 3 (``None``: native; RGB for folders).
        data_range: ``"[-1,1]"`` (a = 2, b = −1) or ``"[0,1]"`` (a = 1, b = 0).
        hflip: flip training images left–right with probability ½ (volume-preserving).
        test_split: ``"test"`` (default) or ``"train"``: the split ``test_set`` reads.
        classes: keep only images whose label is in this list, in both splits (labels keep
            their original values; e.g. ``[0, 1, 2, 3, 4]`` for an out-of-distribution
            experiment). ``None``: every image.

    Attributes:
        dim: D = C·H·W. image_shape: (C, H, W). num_levels: L. scale, shift: a and b.
    """

    def __init__(
        self,
        name: str,
        seed: int = 0,
        *,
        root: str | None = None,
        size: int | None = None,
        channels: int | None = None,
        data_range: str = "[-1,1]",
        hflip: bool = False,
        test_split: str = "test",
        classes: list[int] | tuple[int, ...] | None = None,
    ) -> None:
        if name not in IMAGE_DATA_NAMES:
            raise ValueError(
                f"unknown image dataset {name!r}: choose one of {', '.join(IMAGE_DATA_NAMES)}"
            )
        if data_range not in DATA_RANGES:
            raise ValueError(
                f"unknown data_range {data_range!r}: choose one of {', '.join(DATA_RANGES)}"
            )
        if test_split not in _SPLITS:
            raise ValueError(f"unknown test_split {test_split!r}: choose one of train, test")
        if size is not None and int(size) < 1:
            raise ValueError(f"size must be a positive number of pixels, got {size}")
        if channels is not None and channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        if classes is not None:
            classes = _check_classes(classes, NUM_CLASSES.get(name))
        self.classes_kept: tuple[int, ...] | None = classes
        self.name = name
        self.seed = seed
        self.root = None if root is None else str(Path(root).expanduser())
        self.size = None if size is None else int(size)
        self.channels = channels
        self.data_range = data_range
        self.hflip = bool(hflip)
        self.test_split = test_split
        self.scale, self.shift = DATA_RANGES[data_range]
        self._read: dict[str, ImageDataset] = {}
        shape = image_shape_for(name, {"size": size, "channels": channels})
        if shape is None:  # a folder without size: its images decide
            shape = self.load().image_shape
        self.image_shape: tuple[int, int, int] = tuple(shape)  # type: ignore[assignment]
        self.num_levels = NATIVE_SHAPES[name][1] if name in NATIVE_SHAPES else 256
        self.dim = math.prod(self.image_shape)

    # ---- data ---------------------------------------------------------------------------------
    def _split(self, split: str) -> ImageDataset:
        data = self._read.get(split)
        if data is None:  # read once per object: a run trains on the files as they were
            data = _cached_load(self.name, self.root, split, self.size, self.channels)
            if self.classes_kept is not None:
                data = _keep_classes(data, self.classes_kept)
            self._read[split] = data
        if hasattr(self, "image_shape") and data.image_shape != self.image_shape:
            raise ValueError(
                f"{self.name}/{split}: images are {data.image_shape}, expected {self.image_shape}"
            )
        return data

    def load(self, split: str = "train") -> ImageDataset:
        """Read ``split`` now (cached); raises ``FileNotFoundError`` naming missing files."""
        return self._split(split)

    @property
    def labels(self) -> Tensor | None:
        """Training labels ``(N,)`` (``int64``), or ``None``."""
        return self._split("train").labels

    @property
    def test_labels(self) -> Tensor | None:
        """Labels of :meth:`test_set`'s images, in order, or ``None``."""
        return self._split(self.test_split).labels

    @property
    def classes(self) -> tuple[str, ...] | None:
        return self._split("train").classes

    @property
    def num_classes(self) -> int:
        """Number of classes: :data:`NUM_CLASSES` for the built-in sets (known without reading
        files: 10, or 1000 for ImageNet); for a
        folder, its class sub-folders (0 without labels)."""
        if self.name in NUM_CLASSES:
            return NUM_CLASSES[self.name]
        data = self._split("train")
        return 0 if data.labels is None else len(data.classes or ()) or int(data.labels.max()) + 1

    def _draw(self, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """Indices ``(n,)`` of training images drawn with replacement, and their levels (flipped
        if ``hflip``)."""
        levels = self._split("train").levels
        idx = torch.randint(len(levels), (n,), generator=generator)
        k = levels[idx].to(torch.int64)
        if self.hflip:
            k = random_hflip(k, generator=generator)
        return idx, k

    @property
    def train_size(self) -> int:
        """Number of training images (one epoch of ``train.ckpt_every_epochs``)."""
        return len(self._split("train").levels)

    def to_model(self, levels: Tensor, u: Tensor | float = 0.5) -> Tensor:
        """y = a·(k + u)/L + b (``u = ½``: bin centres)."""
        return to_model_space(levels, self.num_levels, self.scale, self.shift, u)

    def to_levels(self, y: Tensor) -> Tensor:
        """Model space back to levels k = ⌊L·(y − b)/a⌋, clamped to 0…L−1 (``int64``)."""
        x = (y - self.shift) / self.scale
        return torch.floor(x * self.num_levels).clamp(0, self.num_levels - 1).to(torch.int64)

    def sample_levels(self, n: int, generator: torch.Generator) -> Tensor:
        """``n`` training images as levels, drawn with replacement (and flipped if ``hflip``)."""
        return self._draw(n, generator)[1]

    def sample(self, n: int, generator: torch.Generator) -> Tensor:
        """A training minibatch in model space, uniformly dequantized: ``(n, C, H, W)``."""
        return self.sample_labeled(n, generator, labeled=False)[0]

    def sample_labeled(
        self, n: int, generator: torch.Generator, *, labeled: bool = True
    ) -> tuple[Tensor, Tensor | None]:
        """:meth:`sample` with the images' labels ``(n,)`` (the same images for the same
        generator state). Raises ``ValueError`` for a folder without class sub-folders."""
        idx, k = self._draw(n, generator)
        u = torch.rand(k.shape, generator=generator, dtype=torch.get_default_dtype())
        if not labeled:
            return self.to_model(k, u), None
        labels = self._split("train").labels
        if labels is None:
            raise no_labels_error(self.name)
        return self.to_model(k, u), labels[idx]

    def test_set(self, n: int) -> Tensor:
        """The first ``n`` images of the test split as integer levels ``(n, C, H, W)``
        (``int64``); pass ``levels=num_levels, scale=scale, shift=shift`` to
        :func:`~sdelab.likelihood.evaluate_likelihood`."""
        return self._split(self.test_split).levels[:n].to(torch.int64)

    def entropy(self) -> float | None:
        return None

    def __repr__(self) -> str:
        kept = "" if self.classes_kept is None else f", classes={list(self.classes_kept)}"
        return (
            f"ImageData({self.name!r}, shape={self.image_shape}, levels={self.num_levels}, "
            f"range={self.data_range}{kept})"
        )
