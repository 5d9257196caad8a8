"""`sdelab likelihood --diffusers` and `sdelab sample --diffusers` on a tiny UNet2DModel
saved with save_pretrained (no download)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cli_helpers import run_cli
from sdelab.data import make_dataset
from sdelab.interop import load_diffusers
from sdelab.likelihood.bpd import LIKELIHOOD_STREAM, evaluate_likelihood
from sdelab.utils import chunk_generator

diffusers = pytest.importorskip("diffusers")
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel  # noqa: E402


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        layers_per_block=1,
        norm_num_groups=4,
    ).eval()
    path = tmp_path_factory.mktemp("diffusers") / "pipe"
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=50)).save_pretrained(path)
    return path


def test_likelihood_cli_equals_the_python_evaluation(pipe, tmp_path, capsys):
    """The CLI's bits/dim of 8 test digits is evaluate_likelihood of the loaded model with the
    first batch's generator (seed 0): the command adds no arithmetic of its own."""
    out = tmp_path / "r.json"
    args = ["--diffusers", str(pipe), "--data", "digits", "--n", "8", "--probes", "1"]
    code, text, err = run_cli(capsys, "likelihood", *args, "--rtol", "1e-3", "--out", str(out))
    assert code == 0, err
    record = json.loads(out.read_text())
    model = load_diffusers(pipe)
    data = make_dataset("digits")
    k = data.test_set(8)
    ref = evaluate_likelihood(
        model.score_fn, model.schedule, [k], levels=17, scale=2.0, shift=-1.0,
        divergence="hutchinson", n_probes=1, rtol=1e-3, atol=1e-3, progress=False,
        generator=chunk_generator(0, LIKELIHOOD_STREAM, 0, "cpu"),
    )  # fmt: skip
    assert record["bpd_mean"] == pytest.approx(ref.bpd_mean, rel=1e-6)
    assert record["dequantization"] == "uniform" and "diffusers" in text


def test_sample_cli_writes_images(pipe, tmp_path, capsys):
    out = tmp_path / "s.npy"
    code, _, err = run_cli(capsys, "sample", "--diffusers", str(pipe), "--sampler", "dpm_solver",
                           "--steps", "5", "--n", "6", "--out", str(out))  # fmt: skip
    assert code == 0, err
    x = np.load(out)
    assert x.shape == (6, 1, 8, 8) and np.isfinite(x).all()
    assert out.with_suffix(".png").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["likelihood", "--diffusers", "PIPE"], "--data NAME"),
        (["likelihood", "--diffusers", "PIPE", "--data", "moons"], "continuous"),
        (["likelihood", "--diffusers", "PIPE", "--data", "digits", "--method", "vlb"], "vlb"),
        (["likelihood"], "RUN folder"),
        (["likelihood", "--diffusers", "NOWHERE", "--data", "digits"], "NOWHERE"),
    ],
)
def test_bad_input_is_one_line(pipe, capsys, args, message):
    args = [str(pipe) if a == "PIPE" else a for a in args]
    code, _, err = run_cli(capsys, *args, "--n", "4")
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("damage", ["truncated", "nan"])
def test_damaged_diffusers_weights_are_one_line(pipe, tmp_path, capsys, damage):
    """A truncated weights file, or one holding NaN, is named in one line (exit 2), not a
    traceback or a complaint about the time grid."""
    import shutil

    from safetensors.torch import load_file, save_file

    bad = tmp_path / "pipe"
    shutil.copytree(pipe, bad)
    (weights,) = (bad / "unet").glob("*.safetensors")
    if damage == "truncated":
        blob = weights.read_bytes()
        weights.write_bytes(blob[: len(blob) // 2])
    else:
        state = load_file(weights)
        name = sorted(state)[0]
        state[name] = torch.full_like(state[name], float("nan"))
        save_file(state, weights)
    out = tmp_path / "s.npy"
    code, _, err = run_cli(capsys, "sample", "--diffusers", str(bad), "--n", "2", "--steps", "2",
                           "--out", str(out))  # fmt: skip
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert ("truncated or damaged" if damage == "truncated" else "NaN or inf") in lines[0]
    assert "time contains" not in err and not out.exists()
