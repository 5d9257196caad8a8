"""Low-level readers for the on-disk image formats: IDX (MNIST), CIFAR-10 pickles, downsampled
ImageNet batches (npz or pickle), image files.

Each reader returns numpy arrays exactly as stored and raises

- ``FileNotFoundError`` (one line) when a file is absent,
- ``ValueError`` naming the file when it is truncated, corrupt or not in the format.

Nothing here executes code from a file: CIFAR-10 batches go through :class:`RestrictedUnpickler`,
which rebuilds numpy arrays and plain containers and refuses every other global.
"""

from __future__ import annotations

import gzip
import io
import pickle
import zlib
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "RestrictedUnpickler",
    "UnsafePickleError",
    "read_cifar_pickle",
    "read_idx",
    "read_image_file",
    "read_imagenet_batch",
]

#: IDX type codes (third byte of the magic number) → big-endian numpy dtype.
IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

_GZIP_MAGIC = b"\x1f\x8b"


def _read_maybe_gzip(path: Path) -> bytes:
    """File bytes, gunzipped when the file starts with the gzip magic (whatever its name)."""
    raw = path.read_bytes()
    if raw[:2] != _GZIP_MAGIC:
        return raw
    try:
        return gzip.decompress(raw)
    except (EOFError, OSError, zlib.error) as e:
        raise ValueError(f"{path}: corrupt or truncated gzip file ({e})") from None


def read_idx(path: str | Path) -> np.ndarray:
    """Read one IDX file (the MNIST / Fashion-MNIST format), gzipped or not.

    Layout: a 4-byte magic ``0x00 0x00 <type code> <ndim>``, then ``ndim`` big-endian uint32
    sizes, then the values, big-endian, row-major. Type codes are in :data:`IDX_DTYPES`
    (``0x08`` = unsigned byte for images and labels).

    Returns:
        An array of shape ``(d_1, ..., d_ndim)`` in native byte order (``uint8`` for MNIST).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: bad magic, unknown type code, or a payload shorter or longer than the
            header declares (a truncated download).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"IDX file not found: {path}")
    data = _read_maybe_gzip(path)
    if len(data) < 4:
        raise ValueError(f"{path}: too short for an IDX header ({len(data)} bytes)")
    zero1, zero2, code, ndim = data[0], data[1], data[2], data[3]
    if zero1 != 0 or zero2 != 0 or code not in IDX_DTYPES or ndim == 0:
        raise ValueError(
            f"{path}: not an IDX file (magic bytes {data[:4].hex()}; expected 0000 followed by "
            f"a type code in {sorted(IDX_DTYPES)} and ndim ≥ 1)"
        )
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{path}: truncated IDX header (needs {header} bytes, has {len(data)})")
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    dtype = IDX_DTYPES[code]
    expected = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) != expected:
        kind = "truncated" if len(data) < expected else "has trailing bytes"
        raise ValueError(
            f"{path}: IDX file {kind}: header declares shape {shape} ({expected} bytes), "
            f"file has {len(data)} bytes"
        )
    arr = np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)
    return arr.astype(dtype.newbyteorder("="))


# ----------------------------------------------------------------------------------------------
# CIFAR-10 "python version": restricted unpickling


class UnsafePickleError(pickle.UnpicklingError):
    """A pickle asked for a global that :class:`RestrictedUnpickler` does not allow."""


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    # Python 3 writes bytes under protocol 2 as _codecs.encode(str, "latin1"); allow only that.
    if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
        raise UnsafePickleError(f"refusing _codecs.encode with encoding {encoding!r}")
    return text.encode("latin1")


def _numpy_reconstruct():
    try:
        from numpy._core.multiarray import _reconstruct  # numpy ≥ 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that rebuilds numpy arrays and plain containers, and nothing else.

    A pickle may name any importable callable (``os.system``, ``subprocess.Popen``, …) and
    the standard unpickler would call it. This one resolves only the globals that a pickled
    ``numpy.ndarray`` needs (``numpy.core.multiarray._reconstruct`` or its numpy-2 spelling
    ``numpy._core.multiarray._reconstruct``, ``numpy.ndarray``, ``numpy.dtype``) and
    ``_codecs.encode`` restricted to latin-1 (how Python 3 writes bytes under protocol 2).
    Every other global raises :class:`UnsafePickleError` before anything is called.
    Dicts, lists, tuples, str, bytes, ints and floats need no globals.
    """

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in (
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "_reconstruct"),
        ):
            return _numpy_reconstruct()
        if (module, name) == ("numpy", "ndarray"):
            return np.ndarray
        if (module, name) == ("numpy", "dtype"):
            return np.dtype
        if (module, name) == ("_codecs", "encode"):
            return _latin1_encode
        raise UnsafePickleError(
            f"refusing to load global {module}.{name}: only numpy arrays and plain containers "
            "are allowed in a dataset file"
        )


def read_cifar_pickle(path: str | Path) -> dict[str, Any]:
    """Unpickle one CIFAR-10 "python version" file with :class:`RestrictedUnpickler`.

    The original files were written by Python 2 (protocol 2); they load as dicts with bytes
    keys (``b"data"``, ``b"labels"``, ``b"label_names"`` …). Keys are returned decoded to
    ``str``; values are untouched.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file is truncated or corrupt, or is not a dict; also (as
            :class:`UnsafePickleError`, a ``pickle.UnpicklingError``) when it names a global
            other than the numpy array ones.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"CIFAR-10 file not found: {path}")
    raw = path.read_bytes()
    try:
        obj = RestrictedUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except UnsafePickleError as e:
        raise UnsafePickleError(f"{path}: {e}") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError) as e:
        raise ValueError(f"{path}: corrupt or truncated pickle ({type(e).__name__}: {e})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a pickled dict, found {type(obj).__name__}")
    return {k.decode("latin1") if isinstance(k, bytes) else str(k): v for k, v in obj.items()}


# ----------------------------------------------------------------------------------------------
# Downsampled ImageNet (Chrabaszcz, Loshchilov & Hutter 2017): npz or pickled batches

_ZIP_MAGIC = b"PK\x03\x04"


def read_imagenet_batch(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Read one downsampled-ImageNet batch file (``train_data_batch_<i>[.npz]``, ``val_data``).

    The files of https://image-net.org/download-images (“Downsampled ImageNet 32×32 / 64×64”)
    come as ``.npz`` archives or as pickles of the same dict; both hold ``data``, ``uint8``
    rows of ``3·R·R`` values (the red, then green, then blue R×R plane, each row-major, as in
    CIFAR-10), and ``labels``, the class indices **1 … 1000** (train batches also hold
    ``mean``, unused here). The format is told from the file's first bytes (zip magic: npz);
    npz is read with ``allow_pickle=False`` and pickles with :class:`RestrictedUnpickler`.

    Returns:
        ``(data, labels)``: ``data`` as stored, ``(N, 3·R·R)`` ``uint8``; ``labels`` ``(N,)``
        ``int64`` as stored (1-based).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file is truncated or corrupt, lacks ``data``/``labels``, or they have
            the wrong dtype or shape (the message names the file).
    """
    import zipfile

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ImageNet batch file not found: {path}")
    with path.open("rb") as f:
        magic = f.read(4)
    if magic == _ZIP_MAGIC:
        try:
            with np.load(path, allow_pickle=False) as npz:
                if "data" not in npz.files or "labels" not in npz.files:
                    raise ValueError(
                        f"{path}: not a downsampled-ImageNet batch (has keys {npz.files}, needs "
                        "'data' and 'labels')"
                    )
                data, labels = npz["data"], npz["labels"]
        except (zipfile.BadZipFile, EOFError, OSError, zlib.error) as e:
            raise ValueError(f"{path}: corrupt or truncated npz file ({e})") from None
        except ValueError as e:
            if str(e).startswith(str(path)):
                raise
            raise ValueError(f"{path}: corrupt or truncated npz file ({e})") from None
    else:
        try:
            obj = RestrictedUnpickler(io.BytesIO(path.read_bytes()), encoding="bytes").load()
        except UnsafePickleError as e:
            raise UnsafePickleError(f"{path}: {e}") from None
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError) as e:
            raise ValueError(
                f"{path}: neither an npz archive nor a readable pickle: corrupt or truncated "
                f"({type(e).__name__}: {e})"
            ) from None
        if not isinstance(obj, dict):
            raise ValueError(f"{path}: expected a pickled dict, found {type(obj).__name__}")
        obj = {k.decode("latin1") if isinstance(k, bytes) else str(k): v for k, v in obj.items()}
        if "data" not in obj or "labels" not in obj:
            raise ValueError(
                f"{path}: not a downsampled-ImageNet batch (has keys {sorted(obj)}, needs "
                "'data' and 'labels')"
            )
        data, labels = obj["data"], obj["labels"]
    data = np.asarray(data)
    if data.dtype != np.uint8 or data.ndim != 2:
        raise ValueError(
            f"{path}: 'data' must be uint8 rows (N, 3·R·R), got {data.dtype} {data.shape}"
        )
    try:
        labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    except (TypeError, ValueError):
        raise ValueError(f"{path}: 'labels' must be integers") from None
    if labels.shape != (data.shape[0],):
        raise ValueError(f"{path}: {len(labels)} labels for {data.shape[0]} images")
    return data, labels


# ----------------------------------------------------------------------------------------------
# Image files (PNG / JPEG / ...) through Pillow

IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")


def read_image_file(path: str | Path, *, size: int | None = None, channels: int = 3) -> np.ndarray:
    """Decode one 8-bit image to a ``uint8`` array of shape ``(channels, H, W)``.

    ``channels=1`` converts to luminance (Pillow mode ``L``: 0.299 R + 0.587 G + 0.114 B),
    ``channels=3`` to RGB (transparency is dropped). With ``size``, the shorter side is
    resized to ``size`` (bicubic with antialiasing) and the centre ``size × size`` square
    is cropped.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: Pillow cannot decode the file (corrupt, truncated, not an image).
    """
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    if not path.is_file():
        raise FileNotFoundError(f"image file not found: {path}")
    try:
        with Image.open(path) as img:
            img = img.convert("L" if channels == 1 else "RGB")  # also forces the full decode
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ValueError(f"{path}: cannot decode image ({e})") from None
    if size is not None:
        img = resize_center_crop(img, size)
    arr = np.asarray(img, dtype=np.uint8)
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def resize_center_crop(img, size: int):
    """Resize a PIL image so its shorter side is ``size``, then crop the centre square."""
    from PIL import Image

    if size < 1:
        raise ValueError(f"size must be a positive integer, got {size}")
    w, h = img.size
    if (w, h) != (size, size):
        scale = size / min(w, h)
        new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
        if (new_w, new_h) != (w, h):
            img = img.resize((new_w, new_h), Image.Resampling.BICUBIC)
        left, top = (new_w - size) // 2, (new_h - size) // 2
        img = img.crop((left, top, left + size, top + size))
    return img
