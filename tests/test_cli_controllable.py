"""`sdelab train-classifier | sample --class | inpaint | colorize` on tiny runs, and their
one-line errors (exit 2)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from cli_helpers import run_cli
from sdelab.cli import main
from sdelab.data.png import upscale_factor

TINY = [
    "model.width=32",
    "model.depth=2",
    "model.embedding_dim=16",
    "train.batch_size=128",
    "train.steps=100",
    "train.log_every=50",
    "train.ckpt_every=100",
]


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    path = tmp_path_factory.mktemp("ctl") / "run"
    assert main(["train", "8gaussians", *TINY, "--out", str(path)]) == 0
    return path


@pytest.fixture(scope="module")
def classifier(toy_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("clf") / "clf"
    args = ["train-classifier", str(toy_run), "--steps", "200", "--width", "32", "--out", str(out)]
    assert main(args) == 0
    return out


@pytest.fixture(scope="module")
def image_run(tmp_path_factory):
    """A run on flattened 3×4×4 'images' (dim 48) through the array dataset."""
    root = tmp_path_factory.mktemp("img")
    rng = np.random.default_rng(0)
    np.save(root / "imgs.npy", rng.uniform(-1, 1, size=(256, 48)).astype(np.float32))
    path = root / "run"
    args = ["train", "checkerboard", "data.name=array", f"data.path={root / 'imgs.npy'}", *TINY]
    assert main([*args, "train.steps=20", "train.ckpt_every=20", "--out", str(path)]) == 0
    return path


def _png(path, shape, mode="RGB"):
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, size=shape, dtype=np.uint8), mode=mode).save(path)
    return str(path)


def test_class_conditional_sample(toy_run, classifier, tmp_path, capsys):
    out = tmp_path / "c.npy"
    code, _, err = run_cli(
        capsys,
        "sample",
        str(toy_run),
        "--class",
        "3",
        "--guidance",
        "2",
        "--classifier",
        str(classifier),
        "--steps",
        "20",
        "--n",
        "50",
        "--out",
        str(out),
    )
    assert code == 0, err
    assert np.load(out).shape == (50, 2)


def test_class_out_of_range_is_one_line_exit_2(toy_run, classifier, tmp_path, capsys):
    code, _, err = run_cli(
        capsys,
        "sample",
        str(toy_run),
        "--class",
        "8",
        "--classifier",
        str(classifier),
        "--out",
        str(tmp_path / "x.npy"),
    )
    assert code == 2 and "class index 8 out of range" in err and err.count("\n") == 1
    code, _, err = run_cli(
        capsys, "sample", str(toy_run), "--class", "1", "--out", str(tmp_path / "x.npy")
    )
    assert code == 2 and "--classifier" in err


def test_inpaint_known_coordinate(toy_run, tmp_path, capsys):
    out = tmp_path / "inp.npy"
    code, _, err = run_cli(
        capsys,
        "inpaint",
        str(toy_run),
        "--known",
        "0=2.0",
        "--steps",
        "20",
        "--n",
        "40",
        "--out",
        str(out),
    )
    assert code == 0, err
    x = np.load(out)
    assert x.shape == (40, 2) and np.all(x[:, 0] == 2.0)
    assert out.with_suffix(".png").exists()
    code, _, err = run_cli(
        capsys, "inpaint", str(toy_run), "--known", "5=1", "--out", str(tmp_path / "bad.npy")
    )
    assert code == 2 and "coordinate must be in 0..1" in err


def test_train_classifier_rejects_unlabeled_data(tmp_path, capsys):
    code, _, err = run_cli(capsys, "train-classifier", "swissroll", "--out", str(tmp_path / "c"))
    assert code == 2 and "no class labels" in err


def test_image_inpaint_and_colorize_write_png_grids(image_run, tmp_path, capsys):
    img = _png(tmp_path / "obs.png", (4, 4, 3))
    mask = np.zeros((4, 4), dtype=np.uint8)
    mask[:2] = 255
    Image.fromarray(mask, mode="L").save(tmp_path / "mask.png")
    out = tmp_path / "grid.png"
    code, _, err = run_cli(
        capsys,
        "inpaint",
        str(image_run),
        "--image",
        img,
        "--mask",
        str(tmp_path / "mask.png"),
        "--steps",
        "5",
        "--n",
        "3",
        "--out",
        str(out),
    )
    assert code == 0, err
    side = 4 * upscale_factor(4, 4) + 1  # 4×4 tiles upscaled by nearest neighbour, 1-px borders
    assert Image.open(out).size == (3 * side + 1, 3 * side + 1)  # rows: observation, mask, samples
    out = tmp_path / "color.png"
    code, _, err = run_cli(
        capsys,
        "colorize",
        str(image_run),
        "--image",
        img,
        "--steps",
        "5",
        "--n",
        "2",
        "--out",
        str(out),
    )
    assert code == 0, err
    assert out.exists()


def test_mask_of_wrong_shape_is_one_line_exit_2(image_run, tmp_path, capsys):
    img = _png(tmp_path / "obs.png", (4, 4, 3))
    bad = _png(tmp_path / "mask.png", (3, 3), mode="L")
    code, _, err = run_cli(
        capsys,
        "inpaint",
        str(image_run),
        "--image",
        img,
        "--mask",
        bad,
        "--out",
        str(tmp_path / "g.png"),
    )
    assert code == 2 and "mask has shape 3×3" in err and err.count("\n") == 1
    code, _, err = run_cli(
        capsys,
        "inpaint",
        str(image_run),
        "--image",
        _png(tmp_path / "big.png", (5, 5, 3)),
        "--mask",
        bad,
        "--out",
        str(tmp_path / "g.png"),
    )
    assert code == 2 and "does not fit" in err
