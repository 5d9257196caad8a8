"""`sdelab likelihood --diffusers` and `sdelab sample --diffusers` on a tiny UNet2DModel
saved with save_pretrained (no download)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from cli_helpers import run_cli
from sdelab.data import make_dataset
from sdelab.interop import load_diffusers
from sdelab.likelihood.bpd import LIKELIHOOD_STREAM, ODE, Levels, evaluate_likelihood
from sdelab.likelihood.options import Hutchinson, Randomized
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


#: a cheap policy for the tests: the randomized rule on a coarse fixed grid, one probe
FAST = ["--integrator", "randomized", "--nodes", "4", "--solver-steps", "8", "--probes", "1"]


def test_likelihood_cli_equals_the_python_evaluation(pipe, tmp_path, capsys):
    """The CLI's bits/dim of 8 test digits is evaluate_likelihood of the loaded model with the
    first batch's generator (seed 0): the command adds no arithmetic of its own, and its JSON
    records the policy that ran."""
    out = tmp_path / "r.json"
    args = ["--diffusers", str(pipe), "--data", "digits", "--n", "8", *FAST]
    code, text, err = run_cli(capsys, "likelihood", *args, "--out", str(out))
    assert code == 0, err
    record = json.loads(out.read_text())
    model = load_diffusers(pipe)
    k = make_dataset("digits").test_set(8)
    estimator = ODE(divergence=Hutchinson(1), integrator=Randomized(nodes=4, steps=8))
    ref = evaluate_likelihood(
        model.score_fn, model.schedule, [k], estimator=estimator, levels=Levels(17, 2.0, -1.0),
        progress=False, generator=chunk_generator(0, LIKELIHOOD_STREAM, 0, "cpu"),
    )  # fmt: skip
    assert record["bpd_mean"] == pytest.approx(ref.bpd_mean, rel=1e-6)
    assert record["dequantization"] == "uniform" and "diffusers" in text
    assert record["tag"] == estimator.tag  # a fixed grid: no tol
    assert record["estimator"]["integrator"] == Randomized(nodes=4, steps=8).record()
    assert record["estimator"]["divergence"] == Hutchinson(1).record()
    assert f"({record['tag']})" in text and record["model"] == str(pipe.resolve())
    # an existing result is never replaced without --force
    code, _, err = run_cli(capsys, "likelihood", *args, "--seed", "1", "--out", str(out))
    assert code == 2 and "--force" in err and len(err.strip().splitlines()) == 1
    assert "same options" not in err and "--out" in err  # the user named the file, not sdelab
    assert json.loads(out.read_text()) == record
    code, _, err = run_cli(capsys, "likelihood", *args, "--seed", "1", "--out", str(out), "--force")
    assert code == 0 and json.loads(out.read_text())["seed"] == 1, err


@pytest.fixture(scope="module")
def pipe4(tmp_path_factory):
    """A 4×4 one-channel UNet (D = 16): the exact trace costs 16 products per evaluation."""
    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=4,
        in_channels=1,
        out_channels=1,
        block_out_channels=(4, 8),
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        layers_per_block=1,
        norm_num_groups=4,
    ).eval()
    path = tmp_path_factory.mktemp("diffusers") / "pipe4"
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=50)).save_pretrained(path)
    return path


@pytest.mark.parametrize("integrator", ["augmented", "quadrature", "randomized"])
def test_every_integrator_with_exact_trace_and_probes_on_a_unet(pipe4, tmp_path, capsys,
                                                                 integrator):  # fmt: skip
    """Each integrator, with the exact trace and with K = 4 probes, runs on a diffusers UNet
    (whose backward pass cannot be vmapped: one product at a time) and records what it ran;
    Hutchinson is unbiased, so the two agree within their bias bounds and 4 standard errors
    of the estimators' own noise (same images, same dequantization)."""
    base = ["likelihood", "--diffusers", str(pipe4), "--data", "digits", "--data-option",
            "size=4", "--n", "2", "--integrator", integrator, "--tol", "0.1"]  # fmt: skip
    if integrator == "randomized":
        base += ["--nodes", "4", "--solver-steps", "8"]
    records = []
    for div in (["--exact-trace"], ["--probes", "4"]):
        out = tmp_path / f"{div[0]}.json"
        code, _, err = run_cli(capsys, *base, *div, "--out", str(out))
        assert code == 0, err
        rec = json.loads(out.read_text())
        assert math.isfinite(rec["nll_mean"]) and rec["nfe"] > 0
        assert rec["estimator"]["integrator"]["kind"] == integrator.capitalize()
        assert rec["divergence"] == ("exact" if div[0] == "--exact-trace" else "hutchinson4")
        assert math.isfinite(rec["bias_bound_nats"])
        records.append(rec)
    exact, hutch = records
    if hutch["nll_se_probes"] is None:  # Quadrature's fixed probes: their noise is not measured
        return
    noise = math.hypot(exact["nll_se_probes"], hutch["nll_se_probes"])
    gap = abs(exact["nll_mean"] - hutch["nll_mean"])
    assert gap <= exact["bias_bound_nats"] + hutch["bias_bound_nats"] + 4 * noise, records


def test_diffusers_evaluation_resumes(pipe, tmp_path, capsys, monkeypatch):
    """--diffusers with --out keeps finished batches beside the result: after an interruption
    a fresh start is refused, --resume computes the rest, and the numbers are those of an
    uninterrupted evaluation."""
    from sdelab.train import evalstore

    args = ["likelihood", "--diffusers", str(pipe), "--data", "digits", "--n", "6",
            "--batch-size", "2", *FAST]  # fmt: skip
    whole = tmp_path / "whole.json"
    assert run_cli(capsys, *args, "--out", str(whole))[0] == 0
    put = evalstore.EvalStore.put_tensors

    def interrupted(self, i, *stored):  # Ctrl-C after the first finished batch
        put(self, i, *stored)
        raise KeyboardInterrupt

    monkeypatch.setattr(evalstore.EvalStore, "put_tensors", interrupted)
    out = tmp_path / "part.json"
    code, _, err = run_cli(capsys, *args, "--out", str(out))
    assert code == 130 and not out.exists(), err
    monkeypatch.setattr(evalstore.EvalStore, "put_tensors", put)
    code, _, err = run_cli(capsys, *args, "--out", str(out))
    assert code == 2 and "--resume" in err and len(err.strip().splitlines()) == 1
    code, _, err = run_cli(capsys, *args, "--out", str(out), "--resume")
    assert code == 0, err
    a, b = json.loads(whole.read_text()), json.loads(out.read_text())
    assert (a["nll_mean"], a["nll_se"]) == (b["nll_mean"], b["nll_se"])
    assert not (tmp_path / "eval").exists()  # complete: the store is gone


def test_diffusers_takes_the_run_options(pipe, tmp_path, capsys):
    """--split, --repeats and --dequantization apply to a diffusers model as to a run."""
    out = tmp_path / "r.json"
    args = ["--diffusers", str(pipe), "--data", "digits", "--n", "4", *FAST, "--split",
            "train", "--repeats", "2", "--dequantization", "truncated_normal", "--out",
            str(out)]  # fmt: skip
    code, text, err = run_cli(capsys, "likelihood", *args)
    assert code == 0, err
    rec = json.loads(out.read_text())
    assert (rec["split"], rec["repeats"], rec["dequantization"]) == ("train", 2, "truncated_normal")
    assert text.startswith("diffusers") and "train NLL" in text and "test NLL" not in text


def test_sample_cli_writes_images(pipe, tmp_path, capsys):
    out = tmp_path / "s.npy"
    code, _, err = run_cli(capsys, "sample", "--diffusers", str(pipe), "--sampler", "dpm_solver",
                           "--steps", "5", "--n", "6", "--out", str(out))  # fmt: skip
    assert code == 0, err
    x = np.load(out)
    assert x.shape == (6, 1, 8, 8) and np.isfinite(x).all()
    # the grid's first tile is the first sample's levels by model_to_levels (the one rule)
    from PIL import Image

    from sdelab.data.images import model_to_levels
    from sdelab.data.png import upscale_factor

    grid = np.asarray(Image.open(out.with_suffix(".png")))
    s = upscale_factor(8, 8)
    tile = grid[1 : 1 + 8 * s : s, 1 : 1 + 8 * s : s]  # 1 px gap, each pixel an s × s block
    levels = model_to_levels(torch.from_numpy(x[0, 0]), 256).numpy()
    np.testing.assert_array_equal(tile, levels)


@pytest.mark.parametrize(
    "args, message",
    [
        (["likelihood", "--diffusers", "PIPE"], "--data NAME"),
        (["likelihood", "--diffusers", "PIPE", "--data", "moons"], "continuous"),
        (["likelihood", "--diffusers", "PIPE", "--data", "digits", "--method", "vlb"], "vlb"),
        (["likelihood", "--diffusers", "PIPE", "--data", "digits", "--resume"], "--out FILE"),
        (["likelihood", "--diffusers", "PIPE", "--data", "digits", "--out", "x.txt"], ".json"),
        (["likelihood", "RUN", "--diffusers", "PIPE", "--data", "digits"], "not both"),
        (["likelihood", "--diffusers", "PIPE", "--data", "digits", "--checkpoint", "3"], "a run's"),
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
