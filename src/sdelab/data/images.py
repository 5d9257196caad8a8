r"""Image datasets as integer pixel levels, the transforms to model space, and a minibatch helper.

Every loader returns an :class:`ImageDataset`: integer levels ``k ∈ {0, …, L−1}`` of shape
``(N, C, H, W)`` (``uint8``), optional labels ``(N,)`` (``int64``) and the number of levels
``L``. Dequantization belongs to the likelihood code; the transforms here make its
accounting explicit:

    x = (k + u) / L ∈ [0, 1)            u ∈ [0, 1): uniform noise, or ½ for bin centres
    y = a·x + b                         (a, b) = DATA_RANGES[name]; "[-1,1]" is (2, −1)
    y = logit(λ + (1 − 2λ) x)           optional, with log|dy/dx| returned per example

so that −log p_x(x) = −log p_y(y) − log|dy/dx| (= −log p_y(y) − D log a for the affine map).

Datasets (by name in :data:`IMAGE_DATASETS`, or through :func:`load_image_dataset`):

- ``digits``: scikit-learn's 8×8 digits, 17 levels, split by seed;
- ``mnist`` / ``fashion-mnist``: IDX files, gzipped or not;
- ``cifar10``: the "python version" pickled batches, read with a restricted unpickler;
- ``imagenet32`` / ``imagenet64``: downsampled ImageNet (Chrabaszcz et al. 2017), the
  ``train_data_batch_1`` … ``_10`` and ``val_data`` batches (npz or pickle);
- ``folder``: PNG/JPEG files, optional class sub-folders.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from sdelab.data.image_formats import (
    IMAGE_EXTENSIONS,
    read_cifar_pickle,
    read_idx,
    read_image_file,
    read_imagenet_batch,
    resize_center_crop,
)
from sdelab.likelihood.dequantization import to_model_space
from sdelab.utils import make_generator, sum_except_batch

__all__ = [
    "DATA_RANGES",
    "FASHION_MNIST_ROOT",
    "IMAGE_DATASETS",
    "ImageDataset",
    "inverse_logit_transform",
    "levels_to_model",
    "levels_to_unit",
    "load_cifar10",
    "load_digits",
    "load_fashion_mnist",
    "load_image_dataset",
    "load_image_folder",
    "load_imagenet",
    "load_imagenet32",
    "load_imagenet64",
    "load_mnist",
    "logit_transform",
    "minibatches",
    "model_to_levels",
    "random_hflip",
    "requantize",
    "unit_to_levels",
]

SPLITS: tuple[str, ...] = ("train", "test")

#: Where Debian's ``dataset-fashion-mnist`` package installs the IDX files.
FASHION_MNIST_ROOT = Path("/usr/share/datasets/fashion-mnist")

FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
CIFAR10_CLASSES: tuple[str, ...] = (
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip


@dataclass(frozen=True)
class ImageDataset:
    """Integer pixel levels with optional labels.

    Attributes:
        levels: ``(N, C, H, W)`` ``uint8`` tensor with values in ``0 … num_levels − 1``.
        num_levels: L, the number of pixel levels (256 for 8-bit images, 17 for digits).
        labels: ``(N,)`` ``int64`` class indices, or ``None``.
        classes: class names indexed by label, or ``None``.
        name: the dataset's name and split, for logs.
    """

    levels: Tensor
    num_levels: int
    labels: Tensor | None = None
    classes: tuple[str, ...] | None = None
    name: str = ""

    def __post_init__(self) -> None:
        if self.levels.ndim != 4:
            raise ValueError(f"levels must be (N, C, H, W), got shape {tuple(self.levels.shape)}")
        if self.levels.dtype.is_floating_point or self.levels.dtype == torch.bool:
            raise ValueError(f"levels must be an integer tensor, got {self.levels.dtype}")
        if self.labels is not None and self.labels.shape != (self.levels.shape[0],):
            raise ValueError(
                f"labels have shape {tuple(self.labels.shape)} for {self.levels.shape[0]} images"
            )

    def __len__(self) -> int:
        return self.levels.shape[0]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)``."""
        return tuple(self.levels.shape[1:])  # type: ignore[return-value]

    @property
    def num_dims(self) -> int:
        """D = C·H·W, the dimension that bits/dim divides by."""
        return int(np.prod(self.image_shape))


# ----------------------------------------------------------------------------------------------
# Shared post-processing: split check, resize + centre crop, channel conversion


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}: choose one of {', '.join(SPLITS)}")


def _convert_channels(levels: np.ndarray, channels: int | None) -> np.ndarray:
    """(N, C, H, W) → (N, channels, H, W): grey → RGB by copying, RGB → grey by ITU-R 601 luma."""
    if channels is None or channels == levels.shape[1]:
        return levels
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    if channels == 3:
        if levels.shape[1] != 1:
            raise ValueError(f"cannot convert {levels.shape[1]} channels to 3")
        return np.repeat(levels, 3, axis=1)
    if levels.shape[1] != 3:
        raise ValueError(f"cannot convert {levels.shape[1]} channels to 1")
    r, g, b = (levels[:, i].astype(np.int32) for i in range(3))
    # Pillow's "L" conversion, in integers: L = (299 R + 587 G + 114 B) / 1000, rounded.
    return ((299 * r + 587 * g + 114 * b + 500) // 1000).astype(levels.dtype)[:, None]


def _resize(levels: np.ndarray, size: int | None, num_levels: int) -> np.ndarray:
    """Resize the shorter side to ``size`` and centre-crop each (C, H, W) image."""
    from PIL import Image

    n, c, h, w = levels.shape
    if size is None or (h, w) == (size, size):
        return levels
    out = np.empty((n, c, size, size), dtype=np.uint8)
    for i in range(n):
        for j in range(c):
            img = resize_center_crop(Image.fromarray(levels[i, j].astype(np.uint8)), size)
            out[i, j] = np.asarray(img)
    # Bicubic can overshoot the top level of data with fewer than 256 levels.
    return np.minimum(out, num_levels - 1)


def requantize(k: Tensor, from_levels: int, to_levels: int, size: int | None = None) -> Tensor:
    """Integer levels of one count as levels of another (and optionally another size).

    Each level k becomes round(k·(to − 1)/(from − 1)), so black stays black and white white;
    with ``size``, images are then resized (bicubic, shorter side, centre crop) at the new
    levels. For scoring a data set with a model of another (e.g. 8×8 digits, 17 levels, by a
    28×28 Fashion-MNIST model, 256 levels).

    Args:
        k: ``(N, C, H, W)`` integer levels in ``0 … from_levels − 1``.
        from_levels, to_levels: level counts (2 … 256 for ``to_levels`` with ``size``).
        size: the new side length, or ``None`` to keep the size.

    Returns:
        ``(N, C, size, size)`` ``int64`` levels in ``0 … to_levels − 1``.

    Raises:
        ValueError: levels outside ``0 … from_levels − 1`` or a level count below 2.
    """
    if from_levels < 2 or to_levels < 2:
        raise ValueError(f"level counts must be ≥ 2, got {from_levels} and {to_levels}")
    k = torch.as_tensor(k).to(torch.int64)
    if k.ndim != 4:
        raise ValueError(f"k must be (N, C, H, W), got shape {tuple(k.shape)}")
    if bool((k < 0).any()) or bool((k >= from_levels).any()):
        raise ValueError(f"k holds levels outside 0 … {from_levels - 1}")
    out = torch.div(
        k * (to_levels - 1) * 2 + (from_levels - 1), 2 * (from_levels - 1), rounding_mode="floor"
    )
    if size is not None:
        if to_levels > 256:
            raise ValueError(f"resizing works on 8-bit images: to_levels ≤ 256, got {to_levels}")
        out = torch.from_numpy(_resize(out.numpy().astype(np.uint8), size, to_levels)).to(
            torch.int64
        )
    return out


def _finish(
    levels: np.ndarray,
    labels: np.ndarray | None,
    *,
    num_levels: int,
    size: int | None,
    channels: int | None,
    classes: tuple[str, ...] | None,
    name: str,
) -> ImageDataset:
    levels = _resize(_convert_channels(levels, channels), size, num_levels)
    return ImageDataset(
        levels=torch.from_numpy(np.ascontiguousarray(levels, dtype=np.uint8)),
        num_levels=num_levels,
        labels=None if labels is None else torch.from_numpy(labels.astype(np.int64)),
        classes=classes,
        name=name,
    )


# ----------------------------------------------------------------------------------------------
# scikit-learn digits


def load_digits(
    root: str | Path | None = None,
    split: str = "train",
    *,
    size: int | None = None,
    channels: int | None = None,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> ImageDataset:
    """scikit-learn's 8×8 handwritten digits (1797 images, 17 levels 0…16, labels 0…9).

    The data ship with scikit-learn (``root`` is ignored). The split is a fixed random
    permutation drawn from ``seed``: the first ``round(1797 · test_fraction)`` images are the
    test split, the rest the training split; the same seed gives the same split everywhere.

    Example: ``load_digits(split="test")`` → 359 images of shape ``(1, 8, 8)``.
    """
    from sklearn.datasets import load_digits as sk_load_digits

    _check_split(split)
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    bunch = sk_load_digits()
    images = np.asarray(bunch.images).round().astype(np.uint8)[:, None]  # (1797, 1, 8, 8)
    target = np.asarray(bunch.target)
    perm = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed)).numpy()
    n_test = round(len(images) * test_fraction)
    idx = np.sort(perm[:n_test] if split == "test" else perm[n_test:])
    return _finish(
        images[idx],
        target[idx],
        num_levels=17,
        size=size,
        channels=channels,
        classes=tuple(str(d) for d in range(10)),
        name=f"digits/{split}",
    )


# ----------------------------------------------------------------------------------------------
# IDX: MNIST and Fashion-MNIST

_IDX_STEMS: dict[str, tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _find_idx(root: Path, stem: str) -> Path | None:
    # The canonical name, gzipped or not, and the common "train-images.idx3-ubyte" variant.
    variants = (stem, stem.replace("-idx", ".idx"))
    for name in variants:
        for suffix in (".gz", ""):
            if (root / (name + suffix)).is_file():
                return root / (name + suffix)
    return None


def _load_idx_dataset(
    root: str | Path, split: str, *, name: str, how_to_get: str, classes: tuple[str, ...], **kw
) -> ImageDataset:
    _check_split(split)
    root = Path(root)
    stems = _IDX_STEMS[split]
    paths = [_find_idx(root, stem) for stem in stems]
    if None in paths:
        missing = [f"{s}[.gz]" for s, p in zip(stems, paths) if p is None]
        raise FileNotFoundError(f"{name}: {', '.join(missing)} not found in {root}; {how_to_get}")
    images, labels = read_idx(paths[0]), read_idx(paths[1])
    if images.ndim != 3 or images.dtype != np.uint8:
        raise ValueError(
            f"{paths[0]}: expected uint8 images of shape (N, H, W), got {images.dtype} "
            f"{images.shape}"
        )
    if labels.ndim != 1 or len(labels) != len(images):
        raise ValueError(
            f"{paths[1]}: expected {len(images)} labels of shape (N,), got shape {labels.shape}"
        )
    return _finish(
        images[:, None],
        labels,
        num_levels=256,
        classes=classes,
        name=f"{name}/{split}",
        **kw,
    )


def load_mnist(
    root: str | Path | None = None,
    split: str = "train",
    *,
    size: int | None = None,
    channels: int | None = None,
) -> ImageDataset:
    """MNIST from IDX files in ``root`` (28×28, 256 levels, labels 0…9).

    Expected files: ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
    ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``, each optionally ``.gz``
    (gzip is detected from the bytes). sdelab does not download anything.

    Raises:
        FileNotFoundError: ``root`` is ``None`` or lacks a file (the message names it).
        ValueError: a file is truncated or not IDX, or image and label counts differ.
    """
    how = "download the four MNIST IDX files (e.g. from a MNIST mirror) and pass root=their folder"
    if root is None:
        raise FileNotFoundError(f"mnist: no root given; {how}")
    return _load_idx_dataset(
        root,
        split,
        name="mnist",
        how_to_get=how,
        classes=tuple(str(d) for d in range(10)),
        size=size,
        channels=channels,
    )


def load_fashion_mnist(
    root: str | Path | None = None,
    split: str = "train",
    *,
    size: int | None = None,
    channels: int | None = None,
) -> ImageDataset:
    """Fashion-MNIST from IDX files (28×28, 256 levels, 10 clothing classes).

    ``root`` defaults to :data:`FASHION_MNIST_ROOT` = ``/usr/share/datasets/fashion-mnist``,
    where Debian's package puts the files (``apt-get install dataset-fashion-mnist``). File
    names are MNIST's: ``train-images-idx3-ubyte.gz`` … ``t10k-labels-idx1-ubyte.gz``.

    Raises:
        FileNotFoundError: a file is missing (the message names it and the package).
        ValueError: a file is truncated or not IDX, or image and label counts differ.
    """
    return _load_idx_dataset(
        FASHION_MNIST_ROOT if root is None else root,
        split,
        name="fashion-mnist",
        how_to_get="run `apt-get install dataset-fashion-mnist` (installs to "
        f"{FASHION_MNIST_ROOT}) or pass root=a folder with the IDX files",
        classes=FASHION_MNIST_CLASSES,
        size=size,
        channels=channels,
    )


# ----------------------------------------------------------------------------------------------
# CIFAR-10, python version

_CIFAR_FILES: dict[str, tuple[str, ...]] = {
    "train": tuple(f"data_batch_{i}" for i in range(1, 6)),
    "test": ("test_batch",),
}
_CIFAR_DIR = "cifar-10-batches-py"


def _cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    batch = read_cifar_pickle(path)
    data, labels = batch.get("data"), batch.get("labels")
    if not isinstance(data, np.ndarray) or labels is None:
        raise ValueError(f"{path}: not a CIFAR-10 batch (needs keys b'data' and b'labels')")
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise ValueError(
            f"{path}: b'data' must be uint8 of shape (N, 3072), got {data.dtype} {data.shape}"
        )
    labels = np.asarray(labels, dtype=np.int64)
    if labels.shape != (len(data),) or (len(labels) and not 0 <= labels.min() <= labels.max() < 10):
        raise ValueError(f"{path}: b'labels' must be {len(data)} integers in 0…9")
    # Rows are the red, green, then blue 32×32 planes, each row-major.
    return data.reshape(-1, 3, 32, 32), labels


def load_cifar10(
    root: str | Path | None = None,
    split: str = "train",
    *,
    size: int | None = None,
    channels: int | None = None,
) -> ImageDataset:
    """CIFAR-10, "python version" (32×32 RGB, 256 levels, 10 classes).

    ``root`` is the extracted ``cifar-10-batches-py`` folder (or its parent), holding
    ``data_batch_1`` … ``data_batch_5`` (train), ``test_batch`` (test) and ``batches.meta``
    (class names; optional). Get ``cifar-10-python.tar.gz`` from
    https://www.cs.toronto.edu/~kriz/cifar.html and extract it. The pickles are read with
    :class:`~sdelab.data.image_formats.RestrictedUnpickler`, which refuses anything but numpy
    arrays and plain containers, so a tampered file cannot run code.

    Raises:
        FileNotFoundError: ``root`` is ``None`` or a batch file is missing.
        ValueError: a file is truncated, corrupt, unsafe or not a CIFAR-10 batch.
    """
    _check_split(split)
    expected = ", ".join((*_CIFAR_FILES["train"], *_CIFAR_FILES["test"], "batches.meta"))
    how = (
        "download cifar-10-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html, "
        "extract it and pass root=the cifar-10-batches-py folder"
    )
    if root is None:
        raise FileNotFoundError(f"cifar10: no root given (expected {expected}); {how}")
    root = Path(root)
    if not (root / _CIFAR_FILES[split][0]).is_file() and (root / _CIFAR_DIR).is_dir():
        root = root / _CIFAR_DIR
    missing = [f for f in _CIFAR_FILES[split] if not (root / f).is_file()]
    if missing:
        raise FileNotFoundError(
            f"cifar10: {', '.join(missing)} not found in {root} (expected {expected}); {how}"
        )
    parts = [_cifar_batch(root / f) for f in _CIFAR_FILES[split]]
    classes = CIFAR10_CLASSES
    if (root / "batches.meta").is_file():
        names = read_cifar_pickle(root / "batches.meta").get("label_names")
        if names is not None:
            classes = tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names)
    return _finish(
        np.concatenate([p[0] for p in parts]),
        np.concatenate([p[1] for p in parts]),
        num_levels=256,
        size=size,
        channels=channels,
        classes=classes,
        name=f"cifar10/{split}",
    )


# ----------------------------------------------------------------------------------------------
# Downsampled ImageNet 32×32 / 64×64

IMAGENET_RESOLUTIONS: tuple[int, ...] = (32, 64)
_IMAGENET_FILES: dict[str, tuple[str, ...]] = {
    "train": tuple(f"train_data_batch_{i}" for i in range(1, 11)),
    "test": ("val_data",),
}


def _find_imagenet_file(root: Path, stem: str) -> Path | None:
    # root itself, or the folders the official zips extract to (Imagenet32_train_npz/, …)
    for folder in (root, *sorted(p for p in root.iterdir() if p.is_dir())):
        for name in (stem + ".npz", stem):
            if (folder / name).is_file():
                return folder / name
    return None


def load_imagenet(
    root: str | Path | None = None,
    split: str = "train",
    *,
    resolution: int = 32,
    size: int | None = None,
    channels: int | None = None,
) -> ImageDataset:
    """Downsampled ImageNet at ``resolution`` 32 or 64 (Chrabaszcz, Loshchilov & Hutter 2017).

    These are the *new*, box-resized files of https://image-net.org/download-images
    ("Downsampled ImageNet 32x32 / 64x64", npz or pickle), not the older ImageNet 32×32 of
    van den Oord et al. (2016) that earlier likelihood papers used; published bits/dim on the two
    differ by about 0.1 (docs/concepts/bits-per-dim.md). ``root`` holds ``train_data_batch_1`` …
    ``train_data_batch_10`` (train) and ``val_data`` (test), each with or without ``.npz``,
    directly or in the sub-folders the zips extract to. 1 281 167 train and 50 000 test images
    of 256 levels, 1000 classes; labels are stored 1-based and returned 0-based. The train split
    needs 3.9 GB of memory at 32×32 and 15.7 GB at 64×64.

    Raises:
        FileNotFoundError: ``root`` is ``None`` or a batch file is missing (named).
        ValueError: bad resolution or split; a file is truncated, corrupt, or not a batch of
            ``resolution`` × ``resolution`` images (named).
    """
    _check_split(split)
    if resolution not in IMAGENET_RESOLUTIONS:
        raise ValueError(f"ImageNet resolution must be 32 or 64, got {resolution!r}")
    name = f"imagenet{resolution}"
    files = _IMAGENET_FILES[split]
    how = (
        f"download 'Imagenet{resolution}_train_npz.zip' and 'Imagenet{resolution}_val_npz.zip' "
        "(Downsampled ImageNet) from https://image-net.org/download-images, unzip them and "
        "pass root=that folder"
    )
    if root is None:
        raise FileNotFoundError(f"{name}: no root given (expected {files[0]}[.npz] …); {how}")
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"{name}: folder {root} not found; {how}")
    paths = [_find_imagenet_file(root, f) for f in files]
    missing = [f for f, p in zip(files, paths, strict=True) if p is None]
    if missing:
        raise FileNotFoundError(
            f"{name}: {', '.join(m + '[.npz]' for m in missing)} not found in {root}; {how}"
        )
    row = 3 * resolution * resolution
    images, labels = [], []
    for path in paths:
        data, lab = read_imagenet_batch(path)
        if data.shape[1] != row:
            raise ValueError(
                f"{path}: rows of {data.shape[1]} values, but {name} needs 3·{resolution}·"
                f"{resolution} = {row} (a file of the other resolution?)"
            )
        if len(lab) and not 1 <= lab.min() <= lab.max() <= 1000:
            raise ValueError(
                f"{path}: labels span {lab.min()}…{lab.max()}, expected the 1-based classes "
                "1…1000 of the downsampled-ImageNet files"
            )
        images.append(data.reshape(-1, 3, resolution, resolution))
        labels.append(lab - 1)
    return _finish(
        np.concatenate(images),
        np.concatenate(labels),
        num_levels=256,
        size=size,
        channels=channels,
        classes=None,
        name=f"{name}/{split}",
    )


def load_imagenet32(root=None, split="train", *, size=None, channels=None) -> ImageDataset:
    """Downsampled ImageNet 32×32: :func:`load_imagenet` with ``resolution=32``."""
    return load_imagenet(root, split, resolution=32, size=size, channels=channels)


def load_imagenet64(root=None, split="train", *, size=None, channels=None) -> ImageDataset:
    """Downsampled ImageNet 64×64: :func:`load_imagenet` with ``resolution=64``."""
    return load_imagenet(root, split, resolution=64, size=size, channels=channels)


# ----------------------------------------------------------------------------------------------
# Image folder


def _image_files(folder: Path, recursive: bool) -> list[Path]:
    found = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(p for p in found if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def _class_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and _image_files(p, recursive=True))


def load_image_folder(
    root: str | Path | None = None,
    split: str = "train",
    *,
    size: int | None = None,
    channels: int | None = None,
) -> ImageDataset:
    """Images (PNG, JPEG, …; 8-bit) from a folder, with labels from class sub-folders.

    Layouts: ``root/<class>/*.png`` (labels = index of the class name in sorted order) or
    ``root/*.png`` (no labels). If ``root/train`` or ``root/test`` exists, ``split`` selects
    it and the class list is the union over both, so labels agree between splits; otherwise
    ``root`` itself is the training split. Files are read in sorted path order.

    Args:
        size: resize the shorter side to ``size`` (bicubic) and centre-crop ``size × size``;
            required when the images differ in size.
        channels: 1 (luminance) or 3 (RGB, the default).

    Raises:
        FileNotFoundError: no ``root``, no such folder, or no image in it.
        ValueError: an undecodable file, mixed sizes without ``size``, or loose images next
            to class sub-folders.
    """
    _check_split(split)
    if root is None:
        raise FileNotFoundError("folder: no root given; pass root=a folder of PNG/JPEG images")
    root = Path(root)
    split_dirs = [root / s for s in SPLITS if (root / s).is_dir()]
    if split_dirs:
        folder = root / split
        if not folder.is_dir():
            raise FileNotFoundError(f"folder: no {split!r} sub-folder in {root}")
    elif split == "train":
        folder = root
    else:
        raise FileNotFoundError(f"folder: no 'test' sub-folder in {root} for split='test'")
    if not folder.is_dir():
        raise FileNotFoundError(f"folder: {folder} is not a folder")
    loose = _image_files(folder, recursive=False)
    class_names = sorted({d.name for s in (split_dirs or [folder]) for d in _class_dirs(s)})
    if class_names and loose:
        raise ValueError(
            f"{folder}: mixes images ({loose[0].name}, …) with class sub-folders "
            f"({class_names[0]}, …); put every image in a class folder or none"
        )
    if class_names:
        files, labels = [], []
        for label, name in enumerate(class_names):
            if (folder / name).is_dir():
                found = _image_files(folder / name, recursive=True)
                files += found
                labels += [label] * len(found)
        label_arr: np.ndarray | None = np.asarray(labels, dtype=np.int64)
    else:
        files, label_arr = loose, None
    if not files:
        raise FileNotFoundError(f"folder: no images ({', '.join(IMAGE_EXTENSIONS)}) in {folder}")
    channels = 3 if channels is None else channels
    arrays = [read_image_file(f, size=size, channels=channels) for f in files]
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        by_shape = {a.shape: f.name for a, f in zip(arrays, files)}
        examples = ", ".join(f"{n}: {s[1]}×{s[2]}" for s, n in list(by_shape.items())[:2])
        raise ValueError(f"{folder}: images differ in size ({examples}); pass size=")
    return _finish(
        np.stack(arrays),
        label_arr,
        num_levels=256,
        size=None,
        channels=None,
        classes=tuple(class_names) or None,
        name=f"folder:{root.name}/{split}",
    )


# ----------------------------------------------------------------------------------------------
# Registry

#: Dataset loaders by name; each is ``loader(root, split, *, size, channels) -> ImageDataset``.
IMAGE_DATASETS: dict[str, Callable[..., ImageDataset]] = {
    "digits": load_digits,
    "mnist": load_mnist,
    "fashion-mnist": load_fashion_mnist,
    "cifar10": load_cifar10,
    "imagenet32": load_imagenet32,
    "imagenet64": load_imagenet64,
    "folder": load_image_folder,
}


def load_image_dataset(
    name: str,
    root: str | Path | None = None,
    split: str = "train",
    size: int | None = None,
    channels: int | None = None,
) -> ImageDataset:
    """Load an image dataset by name (``digits``, ``mnist``, ``fashion-mnist``, ``cifar10``,
    ``imagenet32``, ``imagenet64``, ``folder``; case, ``-`` and ``_`` are ignored).

    Args:
        name: a key of :data:`IMAGE_DATASETS`.
        root: the folder with the files (see each loader; ``digits`` needs none,
            ``fashion-mnist`` defaults to :data:`FASHION_MNIST_ROOT`).
        split: ``"train"`` or ``"test"``.
        size: resize the shorter side to ``size`` and centre-crop to ``size × size``
            (``None``: native size).
        channels: 1 or 3 to convert (``None``: native; RGB for folders).

    Returns:
        An :class:`ImageDataset` of ``uint8`` levels ``(N, C, H, W)``, labels and ``L``.

    Raises:
        ValueError: unknown name or split; a file that is corrupt or in the wrong format.
        FileNotFoundError: a file is missing; the message names it and how to get it.
    """
    key = name.lower().replace("-", "").replace("_", "")
    for reg_name, loader in IMAGE_DATASETS.items():
        if reg_name.replace("-", "") == key:
            return loader(root, split, size=size, channels=channels)
    raise ValueError(f"unknown image dataset {name!r}: choose one of {', '.join(IMAGE_DATASETS)}")


# ----------------------------------------------------------------------------------------------
# Transforms (pure functions)

#: Model-space ranges as the affine map y = a·x + b from x ∈ [0, 1): name → (a, b).
DATA_RANGES: dict[str, tuple[float, float]] = {"[-1,1]": (2.0, -1.0), "[0,1]": (1.0, 0.0)}


def _affine(data_range: str) -> tuple[float, float]:
    if data_range not in DATA_RANGES:
        raise ValueError(
            f"unknown data range {data_range!r}: choose one of {', '.join(DATA_RANGES)}"
        )
    return DATA_RANGES[data_range]


def levels_to_unit(levels: Tensor, num_levels: int, u: Tensor | float = 0.5) -> Tensor:
    """x = (k + u) / L ∈ [0, 1): levels to the unit interval.

    ``u`` is the dequantization offset in [0, 1): a tensor of uniform noise (drawn by the
    likelihood code) or a constant; the default ½ puts each level at its bin centre.
    Returns a float tensor (default dtype) shaped like ``levels``.
    """
    return to_model_space(levels, num_levels, 1.0, 0.0, u)


def unit_to_levels(x: Tensor, num_levels: int) -> Tensor:
    """Inverse of :func:`levels_to_unit` (up to rounding at bin edges): k = ⌊L·x⌋ in 0…L−1."""
    return torch.floor(x * num_levels).clamp(0, num_levels - 1).to(torch.int64)


def levels_to_model(
    levels: Tensor, num_levels: int, *, data_range: str = "[-1,1]", u: Tensor | float = 0.5
) -> Tensor:
    """y = a·(k + u)/L + b with (a, b) = ``DATA_RANGES[data_range]``.

    For bits/dim the affine map contributes log|dy/dx| = D·log a per example (D = C·H·W),
    so −log p_x = −log p_y − D log a; with ``"[-1,1]"``, a = 2.
    """
    a, b = _affine(data_range)
    return to_model_space(levels, num_levels, a, b, u)


def model_to_levels(y: Tensor, num_levels: int, *, data_range: str = "[-1,1]") -> Tensor:
    """Quantize model-space values back to levels (int64), clamping to 0…L−1 (for samples).

    The inverse of :func:`levels_to_model` for any u ∈ [0, 1) up to floating-point rounding:
    a u within rounding error of a bin edge may land in the neighbouring level.
    """
    a, b = _affine(data_range)
    return unit_to_levels((y - b) / a, num_levels)


def random_hflip(x: Tensor, *, p: float = 0.5, generator: torch.Generator | None = None) -> Tensor:
    """Flip each example of ``(B, …, W)`` left–right with probability ``p`` (a new tensor).

    Works on levels or floats; volume-preserving, so it needs no likelihood correction.
    """
    flip = torch.rand(x.shape[0], generator=generator, device=x.device) < p
    out = x.clone()
    out[flip] = x[flip].flip(-1)
    return out


def logit_transform(x: Tensor, lam: float = 1e-6) -> tuple[Tensor, Tensor]:
    r"""sdeflow-light's logit transform y = logit(λ + (1 − 2λ) x) of x ∈ [0, 1].

    Returns ``(y, log_det)`` with ``log_det`` the per-example ``(B,)`` sum of

        log|dy/dx| = log(1 − 2λ) − log s − log(1 − s),   s = λ + (1 − 2λ) x
                   = log(1 − 2λ) + softplus(y) + softplus(−y),

    so that −log p_x(x) = −log p_y(y) − log_det. λ keeps y finite at x ∈ {0, 1}.
    """
    if not 0.0 <= lam < 0.5:
        raise ValueError(f"lam must be in [0, 0.5), got {lam}")
    s = lam + (1 - 2 * lam) * x
    y = torch.log(s) - torch.log1p(-s)
    log_det = torch.nn.functional.softplus(y) + torch.nn.functional.softplus(-y)
    return y, sum_except_batch(log_det + np.log1p(-2 * lam))


def inverse_logit_transform(y: Tensor, lam: float = 1e-6) -> Tensor:
    """x = (sigmoid(y) − λ) / (1 − 2λ): the inverse of :func:`logit_transform`."""
    return (torch.sigmoid(y) - lam) / (1 - 2 * lam)


# ----------------------------------------------------------------------------------------------
# Minibatches


def minibatches(
    data: ImageDataset | Tensor,
    labels: Tensor | None = None,
    *,
    batch_size: int,
    shuffle: bool = True,
    drop_last: bool = False,
    generator: torch.Generator | int | None = None,
    epochs: int | None = 1,
) -> Iterator[tuple[Tensor, Tensor | None]]:
    """Yield ``(levels, labels)`` minibatches, reshuffled each epoch.

    Args:
        data: an :class:`ImageDataset` (its labels are used) or a tensor ``(N, …)``.
        labels: ``(N,)`` labels for a tensor ``data``, or ``None``.
        batch_size: examples per batch; the last batch of an epoch may be smaller unless
            ``drop_last``.
        shuffle: draw a new permutation per epoch from ``generator`` (a generator or seed;
            ``None`` uses torch's global RNG).
        epochs: passes over the data; ``None`` loops forever.

    Yields:
        ``(levels[idx], labels[idx] or None)``, in the dtype stored (convert with
        :func:`levels_to_model` on the training device).
    """
    if isinstance(data, ImageDataset):
        if labels is not None:
            raise ValueError("pass labels only with a tensor; an ImageDataset carries its own")
        data, labels = data.levels, data.labels
    n = data.shape[0]
    if n == 0:
        raise ValueError("cannot draw minibatches from an empty dataset")
    if labels is not None and labels.shape[0] != n:
        raise ValueError(f"{labels.shape[0]} labels for {n} examples")
    if batch_size < 1:
        raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
    gen = make_generator(generator)
    epoch = 0
    while epochs is None or epoch < epochs:
        order = torch.randperm(n, generator=gen) if shuffle else torch.arange(n)
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            if drop_last and len(idx) < batch_size:
                break
            yield data[idx], None if labels is None else labels[idx]
        epoch += 1
