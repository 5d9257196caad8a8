"""The training skeleton every trainer shares (`sdelab.train.skeleton`): the folder's lock,
SIGTERM/SIGINT saving a checkpoint, exact resume, ``metrics.jsonl`` and progress on stderr —
for `sdelab train-classifier` and `sdelab train-dequantizer` as for `sdelab train`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cli_helpers import run_cli
from sdelab.cli import main
from sdelab.progress import Progress
from sdelab.train.checkpoint import list_checkpoints
from sdelab.train.classifier import load_classifier
from sdelab.train.rundir import LOCK_FILE, TrainState
from sdelab.train.skeleton import TrainingInterrupted, TrainSkeleton

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
DIGITS = ["model.base_channels=8", "model.channel_mults=[1,2]", "model.num_groups=4",
          "model.mid_attention=false", "optim.warmup_steps=0", "train.steps=4",
          "train.batch_size=16", "train.ckpt_every=4"]  # fmt: skip
DEQ = ["--batch-size", "4", "--n-samples", "2"]
CLF = ["--width", "8", "--batch-size", "32"]


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("skel") / "digits"
    assert main(["train", "images/digits", *DIGITS, "--out", str(path)]) == 0
    return path


def _command(name: str, run: Path) -> list[str]:
    """The argv of a trainer (without --steps / --out)."""
    if name == "train-dequantizer":
        return [name, str(run), *DEQ]
    return [name, "8gaussians", *CLF]


def _losses(folder: Path, key: str) -> dict[int, float]:
    rows = [json.loads(s) for s in (folder / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r[key] for r in rows}


# ---- the skeleton on its own ------------------------------------------------------------------
def _toy_loop(folder: Path, steps: int, *, resume: bool = False, signal_at: int | None = None):
    """A least-squares fit in a TrainSkeleton; ``signal_at``: SIGINT to this process during
    that step (the skeleton finishes the step, saves and raises)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = torch.nn.Linear(3, 1)
    opt = torch.optim.Adam(net.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(1)
    state = TrainState({"net": net}, opt, {"data": gen})
    skeleton = TrainSkeleton(
        folder, "sdelab toy", steps=steps, ckpt_every=4, log_every=1, resume=resume,
        progress=False,
    )  # fmt: skip
    with skeleton:
        if skeleton.resuming:
            skeleton.restore(state)

        def step():
            x = torch.randn(8, 3, generator=gen)
            loss = (net(x) - x.sum(1, keepdim=True)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            if skeleton.step + 1 == signal_at:
                os.kill(os.getpid(), signal.SIGINT)
            return {"loss": float(loss.detach())}

        skeleton.run(state, step, config={"toy": 1})
    return net


def test_a_signal_saves_the_step_and_resume_continues_bit_for_bit(tmp_path):
    full = _toy_loop(tmp_path / "full", 10)
    split = tmp_path / "split"
    with pytest.raises(TrainingInterrupted) as info:
        _toy_loop(split, 10, signal_at=6)
    e = info.value
    assert e.signum == signal.SIGINT and e.step == 6 and e.checkpoint.is_file()
    assert list_checkpoints(split)[-1] == (6, e.checkpoint)  # step 6 saved, though not due
    assert not (split / LOCK_FILE).exists()  # the lock was released
    resumed = _toy_loop(split, 10, resume=True)
    for a, b in zip(full.state_dict().values(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert _losses(split, "loss") == _losses(tmp_path / "full", "loss")


# ---- the commands through the real entry point -----------------------------------------------
@pytest.mark.parametrize("name", ["train-classifier", "train-dequantizer"])
def test_sigterm_saves_and_a_second_process_meets_the_lock(name, digits_run, tmp_path, capsys):
    """`python -m sdelab.cli CMD` under way: the same folder is refused to a second process
    (the lock names the first's pid); SIGTERM saves a checkpoint, prints one line naming it
    and exits 143; --resume continues from it."""
    out = tmp_path / "out"
    argv = [*_command(name, digits_run), "--log-every", "1"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "sdelab.cli", *argv, "--steps", "1000000", "--out", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
    )
    try:
        t0 = time.time()
        while not (out / "metrics.jsonl").exists() and proc.poll() is None:
            assert time.time() - t0 < 120, "the command never got under way"
            time.sleep(0.05)
        assert proc.poll() is None, proc.communicate()
        code, _, err = run_cli(capsys, *argv, "--steps", "3", "--resume", "--out", str(out))
        assert code == 2 and f"in use by process {proc.pid}" in err, err
        assert len(err.strip().splitlines()) == 1, err
        proc.send_signal(signal.SIGTERM)
        stdout, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "Traceback" not in err and "error:" not in err and stdout == "", err
    line = err.strip().splitlines()[-1]
    prefix = f"sdelab {name}: stopped by SIGTERM after step "
    assert line.startswith(prefix) and line.endswith("; continue with --resume"), line
    step = int(line.removeprefix(prefix).split(";")[0])
    (ckpt,) = [p for s, p in list_checkpoints(out) if s == step]
    assert f"checkpoint saved to {ckpt};" in line
    assert not (out / LOCK_FILE).exists()
    code, _, err = run_cli(capsys, *argv, "--steps", str(step + 2), "--resume", "--out", str(out))
    assert code == 0, err
    assert list_checkpoints(out)[-1][0] == step + 2


@pytest.mark.parametrize("name", ["train-classifier", "train-dequantizer"])
def test_progress_goes_to_stderr_with_an_eta(name, digits_run, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(Progress, "MIN_S", 0.0)  # short work too: lines from the first tenth
    out = tmp_path / "out"
    code, stdout, err = run_cli(capsys, *_command(name, digits_run), "--steps", "5",
                                "--out", str(out))  # fmt: skip
    assert code == 0, err
    lines = [ln for ln in err.splitlines() if ln.startswith(f"{name}: ")]
    assert lines and all("steps (" in ln and "ETA" in ln and "loss" in ln for ln in lines), err
    assert len(stdout.strip().splitlines()) == 1, stdout  # the result line only
    assert "step" not in stdout and "ETA" not in stdout


def test_train_classifier_resume_is_bit_identical(tmp_path, capsys):
    full, split = tmp_path / "full", tmp_path / "split"
    argv = ["train-classifier", "8gaussians", *CLF, "--log-every", "1", "--ckpt-every", "2"]
    assert run_cli(capsys, *argv, "--steps", "6", "--out", str(full))[0] == 0
    assert run_cli(capsys, *argv, "--steps", "3", "--out", str(split))[0] == 0
    code, _, err = run_cli(capsys, *argv, "--steps", "6", "--out", str(split))
    assert code == 2 and "is not empty: pass --resume" in err
    assert run_cli(capsys, *argv, "--steps", "6", "--resume", "--out", str(split))[0] == 0
    (a, meta_a), (b, meta_b) = load_classifier(full), load_classifier(split)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=0, msg=name)
    assert _losses(full, "loss") == _losses(split, "loss")
    assert meta_a["final_loss"] == meta_b["final_loss"] == _losses(full, "loss")[6]
    code, _, err = run_cli(capsys, *argv, "--steps", "8", "--lr", "0.01", "--resume",
                           "--out", str(split))  # fmt: skip
    assert code == 2 and "other options (lr): only --steps may change" in err, err
