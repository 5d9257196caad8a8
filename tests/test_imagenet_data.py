"""Downsampled ImageNet reader, on small files written in the real format (npz and pickle)."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from sdelab.data import make_dataset
from sdelab.data.image_formats import read_imagenet_batch
from sdelab.data.images import load_image_dataset, load_imagenet

TRAIN = [f"train_data_batch_{i}" for i in range(1, 11)]


def write_imagenet(root, res=32, n=3, fmt="npz", seed=0, subdirs=False):
    """Write the 11 batch files like the official zips: ``data`` (N, 3·res·res) uint8 rows
    (R plane, G plane, B plane, each row-major), 1-based ``labels`` (a list), train ``mean``.
    Returns the images (N, 3, res, res) and 0-based labels per split, as written."""
    rng = np.random.default_rng(seed)
    out = {}
    for split, names in (("train", TRAIN), ("test", ["val_data"])):
        folder = root / f"Imagenet{res}_{'train' if split == 'train' else 'val'}_npz"
        folder = folder if subdirs else root
        folder.mkdir(parents=True, exist_ok=True)
        imgs, labs = [], []
        for name in names:
            img = rng.integers(0, 256, (n, 3, res, res), dtype=np.uint8)
            lab = rng.integers(1, 1001, n).tolist()
            batch = {"data": img.reshape(n, -1), "labels": lab}
            if split == "train":
                batch["mean"] = img.reshape(n, -1).mean(0)
            if fmt == "npz":
                np.savez(folder / f"{name}.npz", **batch)
            else:
                with open(folder / name, "wb") as f:
                    pickle.dump(batch, f, protocol=4)
            imgs.append(img)
            labs.append(np.asarray(lab) - 1)
        out[split] = (np.concatenate(imgs), np.concatenate(labs))
    return out


@pytest.mark.parametrize("fmt", ["npz", "pickle"])
@pytest.mark.parametrize("res", [32, 64])
def test_round_trip_planes_and_labels(tmp_path, fmt, res):
    """Every pixel lands at its (channel, row, column); labels come back 0-based."""
    written = write_imagenet(tmp_path, res=res, fmt=fmt)
    for split in ("train", "test"):
        ds = load_imagenet(tmp_path, split, resolution=res)
        imgs, labs = written[split]
        assert ds.levels.shape == (len(imgs), 3, res, res) and ds.num_levels == 256
        np.testing.assert_array_equal(ds.levels.numpy(), imgs)
        np.testing.assert_array_equal(ds.labels.numpy(), labs)
        assert ds.name == f"imagenet{res}/{split}"
    # the registry and the training-loop dataset reach the same files
    by_name = load_image_dataset(f"imagenet{res}", tmp_path, "test")
    np.testing.assert_array_equal(by_name.levels.numpy(), written["test"][0])
    data = make_dataset(f"imagenet{res}", root=str(tmp_path))
    assert data.image_shape == (3, res, res) and data.num_levels == 256
    assert data.num_classes == 1000 and data.test_set(2).shape == (2, 3, res, res)


def test_a_single_row_decodes_in_chw_order(tmp_path):
    """A row whose first 1024 values are 10, next 1024 are 20, last 1024 are 30 is a red-10,
    green-20, blue-30 image (the planar layout, not interleaved RGB)."""
    row = np.repeat(np.array([10, 20, 30], dtype=np.uint8), 32 * 32)[None]
    np.savez(tmp_path / "val_data.npz", data=row, labels=np.array([7]))
    ds = load_imagenet(tmp_path, "test")
    assert [int(ds.levels[0, c].unique()) for c in range(3)] == [10, 20, 30]
    assert int(ds.labels[0]) == 6


def test_files_in_the_unzipped_subfolders_are_found(tmp_path):
    write_imagenet(tmp_path, subdirs=True)
    assert len(load_imagenet(tmp_path, "train")) == 30


def test_missing_truncated_and_wrong_files_are_one_line_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no root given"):
        load_imagenet(None)
    write_imagenet(tmp_path)
    (tmp_path / "train_data_batch_7.npz").unlink()
    with pytest.raises(FileNotFoundError, match=r"train_data_batch_7\[\.npz\] not found") as e:
        load_imagenet(tmp_path, "train")
    assert "\n" not in str(e.value) and "image-net.org" in str(e.value)
    assert len(load_imagenet(tmp_path, "test")) == 3  # the test split needs only val_data

    path = tmp_path / "val_data.npz"
    raw = path.read_bytes()
    for cut in (len(raw) // 2, len(raw) - 30, 10):
        path.write_bytes(raw[:cut])
        with pytest.raises(ValueError, match="val_data.npz: .*(corrupt|truncated)") as e:
            load_imagenet(tmp_path, "test")
        assert "\n" not in str(e.value)

    np.savez(path, data=np.zeros((2, 3 * 64 * 64), np.uint8), labels=np.array([1, 2]))
    with pytest.raises(ValueError, match="val_data.npz: rows of 12288 values, but imagenet32"):
        load_imagenet(tmp_path, "test")
    np.savez(path, data=np.zeros((2, 3072), np.uint8), labels=np.array([0, 2]))
    with pytest.raises(ValueError, match="1-based classes"):
        load_imagenet(tmp_path, "test")
    np.savez(path, data=np.zeros((2, 3072), np.float32), labels=np.array([1, 2]))
    with pytest.raises(ValueError, match="'data' must be uint8"):
        load_imagenet(tmp_path, "test")
    np.savez(path, images=np.zeros((2, 3072), np.uint8))
    with pytest.raises(ValueError, match="needs 'data' and 'labels'"):
        read_imagenet_batch(path)
    with pytest.raises(ValueError, match="resolution must be 32 or 64"):
        load_imagenet(tmp_path, "test", resolution=16)


def test_pickle_batches_refuse_code(tmp_path):
    class Exploit:
        def __reduce__(self):
            return (print, ("owned",))

    with open(tmp_path / "val_data", "wb") as f:
        pickle.dump({"data": Exploit(), "labels": [1]}, f, protocol=4)
    with pytest.raises(pickle.UnpicklingError, match="refusing to load global builtins.print"):
        load_imagenet(tmp_path, "test")
