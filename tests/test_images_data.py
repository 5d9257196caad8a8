"""Image datasets: readers on files written here in the real formats, transforms, minibatches."""

from __future__ import annotations

import gzip
import io
import itertools
import os
import pickle
import struct
from typing import ClassVar

import numpy as np
import pytest
import torch
from PIL import Image

from sdelab.data.image_formats import UnsafePickleError, read_cifar_pickle, read_idx
from sdelab.data.images import (
    DATA_RANGES,
    FASHION_MNIST_ROOT,
    IMAGE_DATASETS,
    ImageDataset,
    inverse_logit_transform,
    levels_to_model,
    levels_to_unit,
    load_cifar10,
    load_digits,
    load_fashion_mnist,
    load_image_dataset,
    load_image_folder,
    load_mnist,
    logit_transform,
    minibatches,
    model_to_levels,
    random_hflip,
)

# ---------------------------------------------------------------------------------------------
# Writers of the real on-disk formats

_IDX_CODES = {np.uint8: 0x08, np.int8: 0x09, np.int16: 0x0B, np.int32: 0x0C}
_IDX_CODES |= {np.float32: 0x0D, np.float64: 0x0E}


def idx_bytes(arr: np.ndarray) -> bytes:
    """The IDX encoding: 0x00 0x00 <type> <ndim>, big-endian uint32 dims, big-endian data."""
    header = bytes([0, 0, _IDX_CODES[arr.dtype.type], arr.ndim])
    header += struct.pack(f">{arr.ndim}I", *arr.shape)
    return header + arr.astype(arr.dtype.newbyteorder(">")).tobytes()


def write_idx(path, arr: np.ndarray, gz: bool = True) -> None:
    data = idx_bytes(arr)
    path.write_bytes(gzip.compress(data) if gz else data)


def write_mnist_folder(root, n_train=6, n_test=4, hw=(28, 28), gz=True, seed=0):
    rng = np.random.default_rng(seed)
    out = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, *hw), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n, dtype=np.uint8)
        sfx = ".gz" if gz else ""
        write_idx(root / f"{prefix}-images-idx3-ubyte{sfx}", images, gz)
        write_idx(root / f"{prefix}-labels-idx1-ubyte{sfx}", labels, gz)
        out[prefix] = (images, labels)
    return out


class Py2Pickler(pickle._Pickler):
    """Writes like Python 2's cPickle did for the original CIFAR-10 files: str and bytes as
    byte strings (BINSTRING), numpy under its 1.x module name ``numpy.core.multiarray``."""

    def save_bytes(self, obj):
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    def save_str(self, obj):
        self.save_bytes(obj.encode("latin1"))

    def save_global(self, obj, name=None):
        module = pickle.whichmodule(obj, name or obj.__qualname__)
        module = module.replace("numpy._core", "numpy.core")
        self.write(pickle.GLOBAL + f"{module}\n{name or obj.__qualname__}\n".encode())
        self.memoize(obj)

    dispatch: ClassVar[dict] = dict(pickle._Pickler.dispatch)
    dispatch[bytes] = save_bytes
    dispatch[str] = save_str


def dump_protocol2(obj, path, py2: bool) -> None:
    if py2:
        buf = io.BytesIO()
        Py2Pickler(buf, protocol=2).dump(obj)
        path.write_bytes(buf.getvalue())
    else:
        with open(path, "wb") as f:
            pickle.dump(obj, f, protocol=2)


def write_cifar_folder(root, n_per_batch=3, py2=False, seed=0):
    """data_batch_1..5, test_batch, batches.meta as the CIFAR-10 python version has them."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    images = {"train": [], "test": []}
    for i, name in enumerate([*(f"data_batch_{k}" for k in range(1, 6)), "test_batch"]):
        imgs = rng.integers(0, 256, size=(n_per_batch, 3, 32, 32), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, size=n_per_batch)]
        batch = {
            b"batch_label": f"batch {i}".encode(),
            b"labels": labels,
            b"data": imgs.reshape(n_per_batch, 3072),  # R plane, G plane, B plane
            b"filenames": [f"img_{i}_{j}.png".encode() for j in range(n_per_batch)],
        }
        dump_protocol2(batch, root / name, py2)
        images["test" if name == "test_batch" else "train"].append((imgs, labels))
    meta = {
        b"label_names": [f"class{k}".encode() for k in range(10)],
        b"num_cases_per_batch": n_per_batch,
        b"num_vis": 3072,
    }
    dump_protocol2(meta, root / "batches.meta", py2)
    return {
        s: (np.concatenate([p[0] for p in v]), np.concatenate([p[1] for p in v]))
        for s, v in images.items()
    }


# ---------------------------------------------------------------------------------------------
# IDX


@pytest.mark.parametrize("gz", [True, False])
def test_mnist_reader_round_trip(tmp_path, gz):
    written = write_mnist_folder(tmp_path, gz=gz)
    for split, prefix in (("train", "train"), ("test", "t10k")):
        ds = load_mnist(tmp_path, split)
        images, labels = written[prefix]
        assert ds.levels.dtype == torch.uint8 and ds.levels.shape == (len(images), 1, 28, 28)
        assert torch.equal(ds.levels[:, 0], torch.from_numpy(images))
        assert torch.equal(ds.labels, torch.from_numpy(labels.astype(np.int64)))
        assert ds.num_levels == 256 and ds.num_dims == 784


def test_idx_dtypes_and_dotted_names(tmp_path):
    for dtype in (np.int8, np.int16, np.int32, np.float32, np.float64):
        arr = (np.arange(24).reshape(2, 3, 4) - 7).astype(dtype)
        write_idx(tmp_path / "a.idx", arr, gz=False)
        got = read_idx(tmp_path / "a.idx")
        assert got.dtype == np.dtype(dtype) and np.array_equal(got, arr)
    # The "train-images.idx3-ubyte" spelling (Kaggle/some mirrors) is accepted too.
    write_mnist_folder(tmp_path, gz=False)
    for f in tmp_path.glob("*-ubyte"):
        f.rename(tmp_path / f.name.replace("-idx", ".idx"))
    assert len(load_mnist(tmp_path, "train")) == 6


def test_idx_truncated_and_corrupt(tmp_path):
    arr = np.arange(2 * 5 * 5, dtype=np.uint8).reshape(2, 5, 5)
    data = idx_bytes(arr)
    cases = {
        "truncated": data[:-3],
        "trailing": data + b"\x00",
        "magic": b"\x01\x02" + data[2:],
        "header": data[:6],
    }
    for name, raw in cases.items():
        (tmp_path / name).write_bytes(raw)
        with pytest.raises(ValueError, match="IDX"):
            read_idx(tmp_path / name)
    (tmp_path / "cut.gz").write_bytes(gzip.compress(data)[:-10])
    with pytest.raises(ValueError, match="gzip"):
        read_idx(tmp_path / "cut.gz")
    # A labels file with the wrong count.
    write_mnist_folder(tmp_path)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.zeros(5, np.uint8))
    with pytest.raises(ValueError, match="labels"):
        load_mnist(tmp_path, "train")


def test_idx_missing_files_name_expected(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"train-images-idx3-ubyte\[\.gz\]"):
        load_mnist(tmp_path)
    with pytest.raises(FileNotFoundError, match="root"):
        load_mnist()
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist") as e:
        load_fashion_mnist(tmp_path, "test")
    assert "t10k-images-idx3-ubyte" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.skipif(not FASHION_MNIST_ROOT.is_dir(), reason="dataset-fashion-mnist not installed")
def test_real_fashion_mnist_test_split():
    ds = load_image_dataset("fashion-mnist", split="test")
    assert ds.levels.shape == (10_000, 1, 28, 28) and ds.levels.dtype == torch.uint8
    assert ds.labels.min() == 0 and ds.labels.max() == 9 and len(ds.classes) == 10
    assert torch.bincount(ds.labels).tolist() == [1000] * 10  # balanced test set
    assert ds.levels.max() == 255


# ---------------------------------------------------------------------------------------------
# CIFAR-10


@pytest.mark.parametrize("py2", [False, True], ids=["protocol2", "python2-bytes"])
def test_cifar_reader_round_trip(tmp_path, py2):
    written = write_cifar_folder(tmp_path / "cifar-10-batches-py", py2=py2)
    for split in ("train", "test"):
        # root may be the batch folder or its parent.
        for root in (tmp_path, tmp_path / "cifar-10-batches-py"):
            ds = load_cifar10(root, split)
            images, labels = written[split]
            assert ds.levels.shape == (len(images), 3, 32, 32) and ds.levels.dtype == torch.uint8
            assert torch.equal(ds.levels, torch.from_numpy(images))
            assert ds.labels.tolist() == labels.tolist()
            assert ds.classes == tuple(f"class{k}" for k in range(10))
    assert len(load_image_dataset("CIFAR-10", tmp_path, "train")) == 15


def test_cifar_missing_truncated_corrupt(tmp_path):
    with pytest.raises(FileNotFoundError, match="data_batch_1.*test_batch.*batches.meta"):
        load_cifar10()
    write_cifar_folder(tmp_path)
    (tmp_path / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match="data_batch_3 not found") as e:
        load_cifar10(tmp_path)
    assert "cifar-10-python.tar.gz" in str(e.value) and "\n" not in str(e.value)
    assert len(load_cifar10(tmp_path, "test")) == 3  # the test split needs only test_batch

    raw = (tmp_path / "test_batch").read_bytes()
    (tmp_path / "test_batch").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match="truncated"):
        load_cifar10(tmp_path, "test")
    (tmp_path / "test_batch").write_bytes(b"this is not a pickle")
    with pytest.raises(ValueError, match="corrupt"):
        load_cifar10(tmp_path, "test")
    bad = {b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}
    dump_protocol2(bad, tmp_path / "test_batch", py2=False)
    with pytest.raises(ValueError, match="3072"):
        load_cifar10(tmp_path, "test")
    bad = {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]}
    dump_protocol2(bad, tmp_path / "test_batch", py2=False)
    with pytest.raises(ValueError, match="labels"):
        load_cifar10(tmp_path, "test")


class _Exploit:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


class _EvalExploit:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (eval, (f"open({str(self.target)!r}, 'w').close()",))


@pytest.mark.parametrize("exploit", [_Exploit, _EvalExploit])
def test_restricted_unpickler_refuses_code(tmp_path, exploit):
    marker = tmp_path / "pwned"
    payload = {b"data": np.zeros((1, 3072), np.uint8), b"labels": [exploit(marker)]}
    write_cifar_folder(tmp_path)
    with open(tmp_path / "test_batch", "wb") as f:
        pickle.dump(payload, f, protocol=2)
    with pytest.raises(UnsafePickleError, match="refusing to load global"):
        load_cifar10(tmp_path, "test")
    with pytest.raises(pickle.UnpicklingError):
        read_cifar_pickle(tmp_path / "test_batch")
    assert not marker.exists()
    # The same file through the plain unpickler *would* run the code: the test is meaningful.
    with open(tmp_path / "test_batch", "rb") as f:
        pickle.load(f)
    assert marker.exists()


# ---------------------------------------------------------------------------------------------
# Digits


def test_digits_split_is_deterministic_and_disjoint():
    train, test = load_digits(split="train"), load_digits(split="test")
    assert (len(train), len(test)) == (1438, 359)
    assert train.levels.shape[1:] == (1, 8, 8) and train.levels.dtype == torch.uint8
    assert train.num_levels == 17 and int(train.levels.max()) == 16 and int(train.levels.min()) == 0
    assert torch.equal(load_digits(split="test").levels, test.levels)
    assert not torch.equal(load_digits(split="test", seed=1).levels, test.levels)
    # Together the splits are exactly the 1797 images (compare as multisets of rows).
    from sklearn.datasets import load_digits as sk

    every = np.sort(sk().images.reshape(1797, -1).astype(np.uint8), axis=0)
    both = torch.cat([train.levels, test.levels]).reshape(1797, -1).numpy()
    assert np.array_equal(np.sort(both, axis=0), every)


def test_digits_resize_and_channels():
    ds = load_image_dataset("digits", split="test", size=16, channels=3)
    assert ds.levels.shape == (359, 3, 16, 16) and int(ds.levels.max()) <= 16
    assert torch.equal(ds.levels[:, 0], ds.levels[:, 2])


# ---------------------------------------------------------------------------------------------
# Image folder


def _save(path, arr, fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, format=fmt)


def test_folder_classes_resize_crop(tmp_path):
    rng = np.random.default_rng(0)
    _save(tmp_path / "dog" / "a.png", rng.integers(0, 256, (30, 45, 3), dtype=np.uint8))
    _save(tmp_path / "cat" / "b.jpg", rng.integers(0, 256, (50, 20, 3), dtype=np.uint8))
    _save(tmp_path / "cat" / "nested" / "c.png", np.full((23, 37), 77, np.uint8))
    ds = load_image_dataset("folder", tmp_path, size=16)
    assert ds.levels.shape == (3, 3, 16, 16) and ds.num_levels == 256
    assert ds.classes == ("cat", "dog") and ds.labels.tolist() == [0, 0, 1]
    # A constant grey image stays constant through bicubic resize and crop, in all channels.
    assert torch.all(ds.levels[1] == 77)
    with pytest.raises(ValueError, match="differ in size.*pass size="):
        load_image_folder(tmp_path)


def test_folder_center_crop_exact_and_grey(tmp_path):
    # Shorter side already equals size: no resampling, the crop keeps columns 5..14 of 20.
    ramp = np.tile(np.arange(20, dtype=np.uint8) * 10, (10, 1))  # (H=10, W=20)
    _save(tmp_path / "ramp.png", ramp)
    ds = load_image_folder(tmp_path, size=10, channels=1)
    assert ds.labels is None and ds.classes is None
    assert np.array_equal(ds.levels[0, 0].numpy(), ramp[:, 5:15])
    # PNG is lossless: RGB round-trips exactly, and channels=1 is Pillow's integer luma.
    rgb = np.random.default_rng(1).integers(0, 256, (6, 6, 3), dtype=np.uint8)
    other = tmp_path / "other"
    _save(other / "x.png", rgb)
    assert np.array_equal(load_image_folder(other).levels[0].numpy(), rgb.transpose(2, 0, 1))
    grey = load_image_folder(other, channels=1).levels[0, 0].numpy().astype(int)
    r, g, b = (rgb[..., i].astype(int) for i in range(3))
    assert np.abs(grey - (299 * r + 587 * g + 114 * b) / 1000).max() <= 0.5 + 1e-9


def test_folder_splits_share_class_indices(tmp_path):
    img = np.zeros((8, 8, 3), np.uint8)
    _save(tmp_path / "train" / "a" / "1.png", img)
    _save(tmp_path / "train" / "b" / "2.png", img)
    _save(tmp_path / "test" / "b" / "3.png", img)
    test = load_image_folder(tmp_path, "test")
    assert test.classes == ("a", "b") and test.labels.tolist() == [1]
    assert len(load_image_folder(tmp_path, "train")) == 2


def test_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no images"):
        load_image_folder(tmp_path)
    with pytest.raises(FileNotFoundError, match="test"):
        load_image_folder(tmp_path, "test")
    _save(tmp_path / "ok.png", np.zeros((8, 8), np.uint8))
    (tmp_path / "broken.png").write_bytes(b"not an image at all")
    with pytest.raises(ValueError, match="broken.png.*cannot decode"):
        load_image_folder(tmp_path)
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64), np.uint8)).save(buf, "PNG")
    (tmp_path / "broken.png").write_bytes(buf.getvalue()[:200])  # truncated PNG
    with pytest.raises(ValueError, match="broken.png"):
        load_image_folder(tmp_path)
    (tmp_path / "broken.png").unlink()
    _save(tmp_path / "cls" / "x.png", np.zeros((8, 8), np.uint8))
    with pytest.raises(ValueError, match="mixes images"):
        load_image_folder(tmp_path)


def test_registry_errors():
    assert set(IMAGE_DATASETS) == {
        "digits", "mnist", "fashion-mnist", "cifar10", "imagenet32", "imagenet64", "folder",
    }  # fmt: skip
    with pytest.raises(ValueError, match="choose one of"):
        load_image_dataset("imagenet")
    with pytest.raises(ValueError, match="split"):
        load_image_dataset("digits", split="valid")
    with pytest.raises(ValueError, match="integer"):
        ImageDataset(torch.zeros(2, 1, 4, 4), num_levels=256)


# ---------------------------------------------------------------------------------------------
# Transforms


@pytest.mark.parametrize("num_levels", [17, 256])
@pytest.mark.parametrize("data_range", list(DATA_RANGES))
def test_levels_model_round_trip(num_levels, data_range, gen):
    k = torch.randint(0, num_levels, (64, 1, 4, 4), generator=gen)
    a, b = DATA_RANGES[data_range]
    # u within float32 rounding of a bin edge (0 or 1) may land in the neighbouring bin.
    for u in (1e-3, 0.5, 1 - 1e-3, 1e-3 + 0.998 * torch.rand(k.shape, generator=gen)):
        y = levels_to_model(k, num_levels, data_range=data_range, u=u)
        assert torch.allclose(y, a * (k + u) / num_levels + b)
        assert y.min() >= b and y.max() < a + b  # x ∈ [0, 1) → y ∈ [b, a + b)
        assert torch.equal(model_to_levels(y, num_levels, data_range=data_range), k)
    assert torch.allclose(levels_to_unit(k, num_levels), (k + 0.5) / num_levels)
    # Samples beyond the range quantize to the end levels.
    assert model_to_levels(torch.tensor([-5.0, 5.0]), num_levels).tolist() == [0, num_levels - 1]


def test_logit_log_det_matches_autograd(gen):
    lam = 0.05
    x = torch.rand(3, 2, 2, 2, generator=gen, dtype=torch.float64)
    y, log_det = logit_transform(x, lam)
    assert log_det.shape == (3,)
    assert torch.allclose(inverse_logit_transform(y, lam), x)
    # The full Jacobian of each example (8×8, diagonal here) and its log-determinant.
    for i in range(3):
        jac = torch.autograd.functional.jacobian(lambda v: logit_transform(v, lam)[0], x[i : i + 1])
        jac = jac.reshape(8, 8)
        sign, logabs = torch.linalg.slogdet(jac)
        assert sign > 0 and torch.allclose(logabs, log_det[i])
    # Finite at the end points thanks to λ.
    y, log_det = logit_transform(torch.tensor([[0.0, 1.0]]))
    assert torch.isfinite(y).all() and torch.isfinite(log_det).all()


def test_random_hflip(gen):
    x = torch.arange(2 * 3 * 4).reshape(2, 1, 3, 4).repeat(500, 1, 1, 1)
    assert torch.equal(random_hflip(x, p=1.0), x.flip(-1))
    assert torch.equal(random_hflip(x, p=0.0), x)
    out = random_hflip(x, p=0.3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, random_hflip(x, p=0.3, generator=torch.Generator().manual_seed(0)))
    flipped = (out != x).flatten(1).any(1)
    assert torch.equal(out[flipped], x[flipped].flip(-1))
    n = len(x)
    assert abs(flipped.float().mean() - 0.3) < 4 * (0.3 * 0.7 / n) ** 0.5  # binomial, 4 s.d.


def test_minibatches_cover_each_epoch(gen):
    labels = torch.arange(10)
    levels = labels.reshape(10, 1, 1, 1).to(torch.uint8)
    ds = ImageDataset(levels, num_levels=256, labels=labels)
    batches = list(minibatches(ds, batch_size=4, generator=3, epochs=2))
    assert [len(b[0]) for b in batches] == [4, 4, 2, 4, 4, 2]
    for xb, yb in batches:
        assert torch.equal(xb.flatten().long(), yb)  # labels stay aligned
    for epoch in (batches[:3], batches[3:]):
        assert sorted(torch.cat([yb for _, yb in epoch]).tolist()) == list(range(10))
    again = list(minibatches(ds, batch_size=4, generator=3, epochs=2))
    assert all(torch.equal(a[1], b[1]) for a, b in zip(batches, again))
    assert batches[0][1].tolist() != batches[3][1].tolist()  # reshuffled per epoch
    dropped = list(minibatches(levels, batch_size=4, drop_last=True, shuffle=False))
    assert [b[1] for b in dropped] == [None, None] and dropped[0][0].flatten().tolist() == [
        0,
        1,
        2,
        3,
    ]
    forever = itertools.islice(minibatches(levels, batch_size=3, epochs=None, generator=gen), 50)
    assert len(list(forever)) == 50


def test_the_data_cache_notices_changed_files(tmp_path):
    """The process-wide cache of decoded splits serves a new ImageData of unchanged files, but
    not of files rewritten since (a new MNIST in the same folder is read, not the old one); an
    ImageData keeps the split it first read; clear_cache() forgets everything."""
    import os

    from sdelab.data import make_dataset
    from sdelab.data.image_data import _CACHE, clear_cache

    first = write_mnist_folder(tmp_path, gz=False, seed=0)
    a = make_dataset("mnist", root=str(tmp_path))
    assert torch.equal(a.load().levels[:, 0], torch.from_numpy(first["train"][0]))
    assert make_dataset("mnist", root=str(tmp_path)).load() is a.load()  # cached
    second = write_mnist_folder(tmp_path, gz=False, seed=1)
    for f in tmp_path.iterdir():  # a rewrite within the clock's resolution still counts
        os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 10**9))
    b = make_dataset("mnist", root=str(tmp_path))
    assert torch.equal(b.load().levels[:, 0], torch.from_numpy(second["train"][0]))
    assert torch.equal(a.load().levels[:, 0], torch.from_numpy(first["train"][0]))
    clear_cache()
    assert not _CACHE


def test_classes_option_keeps_only_those_labels():
    """``classes`` selects the same labels in both splits, keeps their values, and refuses
    labels that do not exist."""
    from sdelab.data import make_dataset

    full = make_dataset("digits")
    sub = make_dataset("digits", classes=[3, 1])
    assert sub.classes_kept == (1, 3)
    for labels_sub, labels_full in ((sub.labels, full.labels), (sub.test_labels, full.test_labels)):
        assert set(labels_sub.tolist()) == {1, 3}
        assert len(labels_sub) == int(((labels_full == 1) | (labels_full == 3)).sum())
    keep = (full.test_labels == 1) | (full.test_labels == 3)
    n = len(sub.test_labels)
    assert torch.equal(sub.test_set(n), full.test_set(len(full.test_labels))[keep])
    x = sub.sample(256, torch.Generator().manual_seed(0))
    assert x.shape == (256, 1, 8, 8)
    for bad, msg in (
        ([10], "does not exist"),
        ([], "empty"),
        (3, "list of labels"),
        (["a"], "not a label"),
    ):
        with pytest.raises(ValueError, match=msg):
            make_dataset("digits", classes=bad)
