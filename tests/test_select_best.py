"""`eval.fd_features` / `eval.select_best: fd`: the Fréchet distance during training, the best
checkpoint kept through pruning, and `--checkpoint best` in sample and likelihood."""

from __future__ import annotations

import json

import pytest

from cli_helpers import run_cli
from sdelab.cli import main
from sdelab.train.checkpoint import best_step, list_checkpoints
from sdelab.train.config import ConfigError, load_config

TINY = [
    "model.width=32",
    "model.depth=2",
    "model.embedding_dim=16",
    "train.batch_size=128",
    "train.steps=40",
    "train.eval_every=10",
    "train.ckpt_every=40",
    "train.keep_last=1",
    "eval.options.n_eval=50",
    "eval.n_test=200",
    "eval.fd_features=identity",
    "eval.fd_n=200",
    "eval.select_best=fd",
]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("best") / "run"
    assert main(["train", "8gaussians", *TINY, "--out", str(path)]) == 0
    return path


def test_best_is_the_lowest_fd_and_survives_pruning(run_dir):
    evals = [json.loads(x) for x in (run_dir / "eval.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [10, 20, 30, 40]
    best = min(evals, key=lambda e: e["fd"])
    record = json.loads((run_dir / "best.json").read_text())
    assert record == {"metric": "fd", "value": best["fd"], "step": best["step"]}
    steps = [s for s, _ in list_checkpoints(run_dir)]
    assert best_step(run_dir) in steps and 40 in steps  # keep_last=1 prunes all but these


def test_checkpoint_best_in_sample_and_likelihood(run_dir, tmp_path, capsys):
    args = ["--checkpoint", "best", "--sampler", "ode", "--steps", "5", "--n", "20"]
    code, _, err = run_cli(capsys, "sample", str(run_dir), *args, "--out", str(tmp_path / "s.npy"))
    assert code == 0, err
    code, out, err = run_cli(capsys, "likelihood", str(run_dir), "--checkpoint", "best",
                             "--n", "20", "--tol", "1e-2")  # fmt: skip
    assert code == 0, err
    assert f"_step{best_step(run_dir)}.json" in out  # the resolved step names the result


def test_bad_settings_are_one_line(tmp_path, capsys):
    with pytest.raises(ConfigError, match="fd_features"):
        load_config("8gaussians", ["eval.select_best=fd"])
    with pytest.raises(ConfigError, match="fd_classifier"):
        load_config("8gaussians", ["eval.fd_features=classifier"])
    run = tmp_path / "plain"
    assert main(["train", "8gaussians", *TINY[:3], "train.steps=5", "--out", str(run)]) == 0
    capsys.readouterr()
    code, _, err = run_cli(capsys, "sample", str(run), "--checkpoint", "best", "--n", "5",
                           "--out", str(tmp_path / "x.npy"))  # fmt: skip
    assert code == 2 and "no best checkpoint" in err and len(err.strip().splitlines()) == 1
