"""`sdelab likelihood` killed with SIGKILL at a random moment, then `--resume` in one process or
in two (torchrun): exactly the per-example values of an uninterrupted evaluation."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sdelab.cli import main
from sdelab.likelihood.bpd import ODE
from sdelab.runs import run_likelihood

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from test_distributed import _torchrun  # noqa: E402

TOY = ["model.width=32", "model.depth=2", "train.batch_size=64", "train.steps=30",
       "train.ckpt_every=30"]  # fmt: skip
ARGS = ["--num-examples", "240", "--batch-size", "20", "--tol", "1e-3", "--seed", "3"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("kill") / "run"
    assert main(["train", "8gaussians", *TOY, "--out", str(path)]) == 0
    return path


def _kill_when_started(proc: subprocess.Popen, folder: Path, timeout: float = 240) -> None:
    """SIGKILL the whole process group after a random number (1–4) of finished batches."""
    want, t0 = random.Random(os.getpid()).randint(1, 4), time.time()
    while time.time() - t0 < timeout and proc.poll() is None:
        if len(list(folder.glob("batch_*.safetensors"))) >= want:
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _result(run_dir: Path) -> dict:
    (path,) = run_dir.glob("likelihood_ode_*_seed3*.json")
    record = json.loads(path.read_text())
    path.unlink()  # the result and its per-example arrays go: the next case computes them anew
    path.with_suffix(".npz").unlink()
    return record


@pytest.mark.parametrize("nproc", [1, 2])
def test_sigkill_then_resume_equals_uninterrupted(run_dir, nproc):
    ref = run_likelihood(run_dir, estimator=ODE(tol=1e-3), n=240, batch_size=20, seed=3,
                         progress=False)  # fmt: skip
    cli = ["-m", "sdelab.cli", "likelihood", str(run_dir), *ARGS]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, *cli], env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    folder = run_dir / "eval" / "likelihood"
    _kill_when_started(proc, folder)
    assert folder.is_dir() and not list(run_dir.glob("likelihood_ode_*_seed3*.json"))
    # a fresh start is refused while the interrupted evaluation is there
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    again = subprocess.run([sys.executable, *cli], env=env, capture_output=True, text=True)
    assert again.returncode == 2 and "--resume" in again.stderr
    if nproc == 1:
        done = subprocess.run([sys.executable, *cli, "--resume"], env=env, capture_output=True,
                              text=True)  # fmt: skip
        assert done.returncode == 0, done.stderr
    else:  # the batches left are split over two processes
        out, _ = _torchrun([*cli, "--resume"], run_dir.parent, nproc).communicate(timeout=300)
        assert not list(folder.glob("*.tmp-*")), out
    record = _result(run_dir)
    assert record["nll_mean"] == ref.nll_mean and record["nll_se"] == ref.nll_se
    assert not folder.exists()
