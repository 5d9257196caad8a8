"""Image training (issue 7): the ImageData adapter, model.arch=unet, image likelihood and
sample grids through the CLI, and the built-in image configs."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from cli_helpers import recorded
from sdelab.cli import main
from sdelab.data import DATASETS, make_dataset
from sdelab.data.image_data import IMAGE_DATA_NAMES, ImageData, image_shape_for
from sdelab.likelihood.options import default_policy
from sdelab.train.config import ConfigError, builtin_configs, load_config

TINY = [
    "model.base_channels=8",
    "model.channel_mults=[1,2]",
    "model.num_groups=4",
    "model.mid_attention=false",
    "loss.weighting=score-matching",
    "loss.time_sampling=uniform",
    "optim.warmup_steps=0",
    "optim.lr=3e-3",
    "train.steps=60",
    "train.batch_size=32",
    "train.log_every=10",
    "train.ckpt_every=60",
]
IMAGE_CONFIGS = [c for c in builtin_configs() if c.startswith("images/")]


# ---- the adapter -------------------------------------------------------------------------------
def test_registered():
    for name in IMAGE_DATA_NAMES:
        assert name in DATASETS


@pytest.mark.parametrize("data_range", ["[-1,1]", "[0,1]"])
def test_digits_sample_shapes_range_dequantization(data_range):
    ds = make_dataset("digits", data_range=data_range)
    a, b = ds.scale, ds.shift
    assert (a, b) == ((2.0, -1.0) if data_range == "[-1,1]" else (1.0, 0.0))
    assert ds.image_shape == (1, 8, 8) and ds.dim == 64 and ds.num_levels == 17
    assert ds.entropy() is None
    y = ds.sample(256, torch.Generator().manual_seed(0))
    assert y.shape == (256, 1, 8, 8) and y.dtype == torch.get_default_dtype()
    x = (y - b) / a  # back to [0, 1)
    assert float(x.min()) >= 0 and float(x.max()) < 1
    k = torch.floor(x * 17)
    u = x * 17 - k  # the dequantization noise: uniform on [0, 1), not bin centres
    assert 0.4 < float(u.mean()) < 0.6 and float(u.std()) > 0.25
    levels = set(ds.load().levels.unique().tolist())
    assert set(k.unique().long().tolist()) <= levels
    assert torch.equal(ds.to_levels(y), k.long())


def test_digits_determinism_and_test_set():
    ds = make_dataset("digits")
    y1 = ds.sample(64, torch.Generator().manual_seed(3))
    y2 = make_dataset("digits", seed=5).sample(64, torch.Generator().manual_seed(3))
    assert torch.equal(y1, y2)
    assert not torch.equal(y1, ds.sample(64, torch.Generator().manual_seed(4)))
    test = ds.test_set(100)
    assert test.shape == (100, 1, 8, 8) and test.dtype == torch.int64  # integer levels
    assert int(test.min()) >= 0 and int(test.max()) <= 16
    assert torch.equal(test, make_dataset("digits", seed=9).test_set(100))  # fixed split
    assert len(ds.test_set(10_000)) == 359 and ds.test_labels.shape == (359,)
    assert ds.labels.shape == (1438,)


def test_hflip_flips_some_images():
    ds = make_dataset("digits", hflip=True)
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    k = ds.sample_levels(200, g1)
    plain = ImageData("digits").sample_levels(200, g2)
    flipped = (k != plain).flatten(1).any(1)
    assert 0 < int(flipped.sum()) < 200
    assert torch.equal(k[flipped], plain[flipped].flip(-1))


def test_shapes_without_files_and_options():
    assert image_shape_for("cifar10", {"channels": 1, "size": 16}) == (1, 16, 16)
    assert image_shape_for("mnist") == (1, 28, 28)
    assert image_shape_for("folder", {}) is None
    assert ImageData("cifar10", root="/nonexistent").dim == 3072  # lazy: no files read yet
    with pytest.raises(ValueError, match="data_range"):
        make_dataset("digits", data_range="[0,255]")
    with pytest.raises(ValueError, match="valid are"):
        make_dataset("digits", colour=True)


def test_folder(tmp_path):
    from PIL import Image

    for split in ("train", "test"):
        for cls in ("a", "b"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(3):
                arr = np.full((6, 6, 3), 40 * i + (100 if cls == "b" else 0), np.uint8)
                Image.fromarray(arr).save(tmp_path / split / cls / f"{i}.png")
    ds = make_dataset("folder", root=str(tmp_path), size=4)
    assert ds.image_shape == (3, 4, 4) and ds.num_levels == 256
    assert ds.sample(5, torch.Generator().manual_seed(0)).shape == (5, 3, 4, 4)
    assert ds.test_set(4).shape == (4, 3, 4, 4) and ds.labels.tolist() == [0, 0, 0, 1, 1, 1]


# ---- config --------------------------------------------------------------------------------------
def test_unet_config_validation():
    cfg = load_config("images/digits")
    assert cfg.model.arch == "unet" and cfg.model.image_shape == [1, 8, 8]
    with pytest.raises(ConfigError, match="needs image data"):
        load_config("toy/checkerboard", ["model.arch=unet"])
    with pytest.raises(ConfigError, match="divisible"):
        load_config("images/digits", ["model.channel_mults=[1,2,2,2,2]"])
    with pytest.raises(ConfigError, match="attn_resolutions"):
        load_config("images/digits", ["model.attn_resolutions=[5]"])
    with pytest.raises(ConfigError, match="image_shape"):
        load_config("images/digits", ["model.image_shape=[3,8,8]"])
    assert load_config("images/digits", ["data.options.size=16"]).model.image_shape == [1, 16, 16]


@pytest.mark.parametrize("name", IMAGE_CONFIGS)
def test_image_configs_dry_run(name, capsys, tmp_path):
    # a folder's images decide its data set, so a folder config needs a folder (any, here)
    root = [f"data.options.root={tmp_path}"] if load_config(name).data.name == "folder" else []
    if root:
        from PIL import Image

        Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    assert main(["train", name, *root, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "arch: unet" in out and "image_shape" in out


def test_image_configs_exist():
    want = {"digits", "fashion_mnist_small", "sdeflow_mnist", "sdeflow_cifar10"}
    assert want <= {c.split("/")[1] for c in IMAGE_CONFIGS}


# ---- errors --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["images/digits", "data.name=digitz"], "unknown dataset 'digitz'"),
        (["images/sdeflow_mnist"], "train-images-idx3-ubyte"),
        (["images/sdeflow_mnist", "data.options.root=MISSING"], "train-images-idx3-ubyte"),
        (["images/sdeflow_cifar10", "data.options.root=MISSING"], "data_batch_1"),
        (["images/digits", "data.name=folder", "data.options.root=MISSING"], "folder"),
    ],
)
def test_missing_data_one_line_error(args, needle, tmp_path, capsys):
    args = [a.replace("MISSING", str(tmp_path / "nope")) for a in args]
    assert main(["train", *args, "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err, err
    assert not (tmp_path / "run").exists()  # failed before creating the run folder


# ---- end to end ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("img") / "run"
    assert main(["train", "images/digits", *TINY, "--out", str(run)]) == 0
    return run


def test_train_reduces_loss(digits_run):
    losses = [json.loads(line)["loss"] for line in (digits_run / "metrics.jsonl").open()]
    assert len(losses) == 6 and np.isfinite(losses).all()
    assert np.mean(losses[-2:]) < 0.6 * np.mean(losses[:2])


def test_checkpoint_rebuilds_unet(digits_run):
    from sdelab.nets.unet import ImageUNet
    from sdelab.train.build import load_run

    config, model, _ = load_run(digits_run)
    assert isinstance(model.net, ImageUNet) and config.model.image_shape == [1, 8, 8]
    x, t = torch.randn(3, 1, 8, 8), torch.full((3,), 0.5)
    out = model(x, t)
    assert out.shape == x.shape
    torch.testing.assert_close(model(x.flatten(1), t), out.flatten(1))  # flat input works too


@pytest.mark.parametrize(
    ("method", "extra", "divergence"),
    [("ode", ["--probes", "1"], "hutchinson1"), ("ode", ["--probes", "2"], "hutchinson2"),
     ("elbo", [], "hutchinson1")],
)  # fmt: skip
def test_likelihood_bits_per_dim(digits_run, method, extra, divergence, capsys):
    args = ["likelihood", str(digits_run), "--method", method, "--n", "16", "--force"]
    assert main([*args, *extra]) == 0
    out = capsys.readouterr().out
    assert "bits/dim" in out and "dequantization: uniform" in out
    rec = recorded(out)
    assert rec["dequantization"] == "uniform" and rec["n"] == 16
    assert np.isfinite(rec["bpd_mean"]) and 0 < rec["bpd_mean"] < 20
    assert rec["divergence"] == divergence


def test_image_likelihood_integrators_agree(digits_run, capsys):
    """The randomized rule (32 nodes) on DPM-Solver++(3M) with 64 steps, the same rule on the
    adaptive dopri5, and the classic augmented solve estimate the same test-set bits/dim: their
    differences are within 4 standard errors plus their solver-bias bounds. Unset options are
    the one default policy's (digits: D = 64)."""
    from sdelab.likelihood.options import Hutchinson, default_policy

    base = ["likelihood", str(digits_run), "--n", "32", "--seed", "3", "--probes", "1"]
    assert main([*base, "--integrator", "randomized"]) == 0
    rnd = recorded(capsys.readouterr().out)
    assert rnd["tag"] == "ode_randomized32_dpm3m64_hutchinson1" and rnd["tol"] is None
    assert list(digits_run.glob("likelihood_ode_randomized32_dpm3m64_hutchinson1_*.json"))
    assert main([*base, "--integrator", "randomized", "--solver", "dopri5"]) == 0
    adaptive = recorded(capsys.readouterr().out)
    assert adaptive["integrator"] == "randomized32_dopri5" and adaptive["tol"] == 0.01
    assert main([*base, "--integrator", "augmented"]) == 0
    aug = recorded(capsys.readouterr().out)
    assert aug["tag"] == f"ode_{default_policy(64, divergence=Hutchinson(1)).tag}"
    for other in (adaptive, aug):
        se = math.hypot(rnd["bpd_se"], other["bpd_se"])  # a conservative SE of the difference
        bias = rnd["bias_bound_bpd"] + other["bias_bound_bpd"]
        assert abs(rnd["bpd_mean"] - other["bpd_mean"]) < 4 * se + bias, (rnd, other)
    assert main([*base, "--integrator", "augmented", "--solver", "dpm3m"]) != 0
    assert "augmented solve" in capsys.readouterr().err
    assert main([*base, "--integrator", "randomized", "--nodes", "3"]) != 0  # odd: refused
    assert "even" in capsys.readouterr().err


def test_likelihood_matches_evaluate_likelihood(digits_run):
    from sdelab.likelihood.bpd import ELBO, Levels, evaluate_likelihood
    from sdelab.runs import run_likelihood
    from sdelab.train.build import load_run

    res = run_likelihood(digits_run, estimator=ELBO(), n=8, seed=1, progress=False)
    _, model, schedule = load_run(digits_run)
    test = make_dataset("digits").test_set(8)
    ref = evaluate_likelihood(
        model,
        schedule,
        [test],
        estimator=ELBO(),
        levels=Levels(17, 2.0, -1.0),
        generator=torch.Generator().manual_seed(1),
        progress=False,
    )
    assert res.dequantization == "uniform"
    torch.testing.assert_close(res.bpd, ref.bpd)


def test_sample_writes_grid(digits_run, tmp_path, capsys):
    from PIL import Image

    out = tmp_path / "s" / "grid.png"
    args = ["sample", str(digits_run), "--sampler", "ode", "--steps", "10", "--n", "9"]
    assert main([*args, "--out", str(out)]) == 0
    samples = np.load(out.with_suffix(".npy"))
    assert samples.shape == (9, 1, 8, 8) and np.isfinite(samples).all()
    img = Image.open(out)
    side = 8 * 8 + 1  # 8×8 tiles upscaled ×8 by nearest neighbour, 1-px borders
    assert img.size == (3 * side + 1, 3 * side + 1) and img.mode == "L"
    assert main([*args, "--out", str(out)]) == 2  # refuses to overwrite


def test_eval_hook_on_images(tmp_path):
    from sdelab.train.hooks import likelihood_hook
    from sdelab.train.loop import train

    over = [*TINY, "train.steps=4", "train.eval_every=4", "eval.n_test=4"]
    over += ["eval.options.tol=0.1"]
    config = load_config("images/digits", over)
    train(config, tmp_path / "run", eval_hook=likelihood_hook)
    rec = json.loads((tmp_path / "run" / "eval.jsonl").read_text().splitlines()[-1])
    assert rec["step"] == 4 and 0 < rec["test_bpd_ode"] < 20 and 0 < rec["test_bpd_elbo"] < 20
    # the hook resolves its estimator as `sdelab likelihood` does: the one default policy
    assert rec["ode_policy"] == default_policy(tuple(config.model.image_shape), tol=0.1).tag
    assert rec["ode_bias_bound"] >= 0 and rec["test_bpd_ode_se"] > 0
