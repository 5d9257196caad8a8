"""`sdelab train` on the command line: a tiny run, --dry-run, --help, and one-line errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cli_helpers import run_cli
from sdelab.cli import main
from sdelab.train.build import load_run

TINY = [
    "model.width=16",
    "model.depth=1",
    "model.embedding_dim=8",
    "train.batch_size=32",
    "train.steps=20",
    "train.log_every=5",
    "train.ckpt_every=10",
]


def one_line_error(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("sdelab train: error: "), err
    return lines[0]


def test_train_smoke_and_resume(tmp_path, capsys):
    out_dir = tmp_path / "run"
    code, out, _ = run_cli(capsys, "train", "checkerboard", *TINY, "--out", str(out_dir))
    assert code == 0 and "trained to step 20" in out
    for name in ("config.yaml", "config.json", "metrics.jsonl", "loss.png"):
        assert (out_dir / name).is_file()
    config, model, schedule = load_run(out_dir)
    assert config.data.name == "checkerboard" and config.model.dim == 2
    assert model(torch.zeros(3, 2), 0.5).shape == (3, 2)
    assert schedule.t_min == pytest.approx(1e-3)
    # extend the finished run
    code, out, _ = run_cli(
        capsys, "train", "checkerboard", *TINY, "train.steps=30", "--out", str(out_dir), "--resume"
    )
    assert code == 0 and "trained to step 30" in out


def test_train_on_array_file(tmp_path, capsys):
    np.save(tmp_path / "x.npy", np.random.default_rng(0).normal(size=(100, 3)).astype(np.float32))
    argv = ["train", "oracle", *TINY, "data.name=array", f"data.path={tmp_path / 'x.npy'}"]
    code, _, err = run_cli(capsys, *argv, "--out", str(tmp_path / "run"))
    assert code == 0, err
    assert load_run(tmp_path / "run")[0].model.dim == 3


def test_dry_run_and_help(capsys):
    code, out, _ = run_cli(capsys, "train", "sdeflow_swissroll", "optim.lr=3e-4", "--dry-run")
    assert code == 0 and "parametrization: drift" in out and "lr: 0.0003" in out and "dim: 2" in out
    with pytest.raises(SystemExit) as info:
        main(["train", "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    assert "examples:" in text and "--resume" in text and "toy/checkerboard" in text


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["nope.yaml"], "'nope.yaml' is neither a YAML file nor a built-in config: choose one of"),
        (["checkerboard", "optim.lrr=1"], "unknown key 'optim.lrr': valid keys are name, lr"),
        (["checkerboard", "optim.lr"], "bad override 'optim.lr': write KEY=VALUE"),
        (
            ["checkerboard", "sde.name=edm"],
            "sde.name: unknown schedule 'edm': choose one of ve, vp",
        ),
        (["oracle", "data.name=array", "data.path=missing.npy"], "missing.npy not found"),
        (["checkerboard", "train.device=cuda:3"], None),
    ],
)
def test_bad_inputs_are_one_line_errors(tmp_path, capsys, argv, needle):
    if needle is None:  # an unavailable device; skip where one exists
        if torch.cuda.is_available():
            pytest.skip("CUDA is available here")
        needle = "train.device=cuda:3 but CUDA is not available: use train.device=cpu"
    code, _, err = run_cli(capsys, "train", *argv, *TINY, "--out", str(tmp_path / "run"))
    assert code == 2
    assert needle in one_line_error(err)


def test_missing_out_non_empty_folder_and_corrupt_checkpoint(tmp_path, capsys):
    code, _, err = run_cli(capsys, "train", "checkerboard", *TINY)
    assert code == 2 and "--out DIR is required" in one_line_error(err)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    code, _, err = run_cli(capsys, "train", "checkerboard", *TINY, "--out", str(busy))
    assert code == 2
    assert f"run folder {busy} is not empty: pass --resume to continue it" in one_line_error(err)
    assert (busy / "notes.txt").read_text() == "mine"

    run = tmp_path / "run"
    assert run_cli(capsys, "train", "checkerboard", *TINY, "--out", str(run))[0] == 0
    (run / "checkpoints" / "step_00000020.safetensors").write_bytes(b"garbage")
    code, _, err = run_cli(capsys, "train", "checkerboard", *TINY, "--out", str(run), "--resume")
    assert code == 2
    line = one_line_error(err)
    assert "step_00000020.json is corrupt" in line and "delete" in line


def test_high_order_training_and_fine_tuning_stage(tmp_path, capsys):
    """Third-order DSM trains; a second stage (i-DODE's second-order flow matching) starts
    from the first run's weights through train.init_from (a step with lr 1e-12 leaves them);
    a different model there, or high order with another objective, is a one-line error."""
    from sdelab.train.checkpoint import load_checkpoint, prefixed

    first = tmp_path / "first"
    argv = [*TINY, "train.steps=10", "loss.parametrization=velocity"]
    code, _, err = run_cli(
        capsys, "train", "checkerboard", *argv, "loss.score_matching_order=3", "--out", str(first)
    )
    assert code == 0, err
    second = tmp_path / "second"
    fine_tune = [
        *argv,
        "train.steps=1",
        "optim.lr=1e-12",
        "optim.warmup_steps=0",
        "loss.score_matching_order=2",
        "loss.second_order_form=trace",
        "loss.high_order_weight=0.1",
        f"train.init_from={first}",
    ]
    code, _, err = run_cli(capsys, "train", "checkerboard", *fine_tune, "--out", str(second))
    assert code == 0, err
    a = prefixed(load_checkpoint(first).tensors, "model")
    b = prefixed(load_checkpoint(second).tensors, "model")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-9)
    code, _, err = run_cli(
        capsys,
        "train",
        "checkerboard",
        *fine_tune,
        "model.width=8",
        "--out",
        str(tmp_path / "other"),
    )
    assert code == 2 and "is a different model: model.width (there 16, here 8)" in one_line_error(
        err
    )
    assert not (tmp_path / "other" / "checkpoints").exists()
    code, _, err = run_cli(
        capsys,
        "train",
        "vdm_moons",
        "loss.score_matching_order=2",
        "--out",
        str(tmp_path / "vdm"),
    )
    assert code == 2 and "set loss.objective=dsm (got vdm)" in one_line_error(err)
