"""SIGTERM and SIGINT through the real `sdelab` script: one line on stderr and exit 128+signal,
never `error:` (a scheduler reads exit 2 as bad input); the commands with resumable stores say
that the finished batches are kept and how to continue."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sdelab.cli import main

SDELAB = Path(sys.executable).with_name("sdelab")
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
pytestmark = pytest.mark.skipif(not SDELAB.exists(), reason="the sdelab script is not installed")

TOY = ["model.width=32", "model.depth=2", "train.batch_size=64", "train.steps=20",
       "train.ckpt_every=20"]  # fmt: skip
DIGITS = ["model.base_channels=8", "model.channel_mults=[1,2]", "model.num_groups=4",
          "model.mid_attention=false", "train.steps=4", "train.batch_size=16",
          "train.ckpt_every=4"]  # fmt: skip


def _signal_when(cmd: list[str], ready, signum: int, timeout: float = 240) -> tuple[int, str]:
    """Run ``sdelab CMD``, send ``signum`` once ``ready()`` holds; (exit code, stderr)."""
    proc = subprocess.Popen(
        [str(SDELAB), *cmd], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ENV
    )
    try:
        t0 = time.time()
        while not ready() and proc.poll() is None:
            assert time.time() - t0 < timeout, "the command never got under way"
            time.sleep(0.05)
        assert proc.poll() is None, "the command ended before the signal"
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, err


def _last_line(err: str) -> str:
    assert "Traceback" not in err and "error:" not in err, err
    return err.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("sig") / "toy"
    assert main(["train", "8gaussians", *TOY, "--out", str(path)]) == 0
    return path


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_train_dequantizer_stops_with_128_plus_signal(tmp_path, signum):
    run, deq = tmp_path / "digits", tmp_path / "deq"
    assert main(["train", "images/digits", *DIGITS, "--out", str(run)]) == 0
    cmd = ["train-dequantizer", str(run), "--steps", "100000", "--batch-size", "4",
           "--log-every", "1", "--out", str(deq)]  # fmt: skip
    code, err = _signal_when(cmd, lambda: (deq / "metrics.jsonl").exists(), signum)
    assert code == 128 + signum, err
    line = _last_line(err)
    name = signal.Signals(signum).name
    assert line.startswith(f"sdelab train-dequantizer: stopped by {name} after step "), line
    assert line.endswith("continue with --resume") and (deq / "checkpoints").is_dir()


@pytest.mark.parametrize(
    "cmd, store",
    [
        (["likelihood", "--num-examples", "100000", "--batch-size", "20"], "likelihood"),
        (
            [
                "evaluate",
                "--features",
                "identity",
                "--n",
                "100000",
                "--batch-size",
                "50",
                "--steps",
                "20",
            ],
            "quality",
        ),
    ],
)
def test_sigterm_says_the_finished_batches_are_kept(toy_run, cmd, store):
    folder = toy_run / "eval" / store
    argv = [cmd[0], str(toy_run), *cmd[1:]]
    code, err = _signal_when(argv, lambda: any(folder.glob("batch_*")), signal.SIGTERM)
    assert code == 128 + signal.SIGTERM, err
    line = _last_line(err)
    assert line.startswith(f"sdelab {cmd[0]}: stopped by SIGTERM; "), line
    assert str(folder) in line and "--resume" in line, line
    assert any(folder.glob("batch_*"))  # the store survived
