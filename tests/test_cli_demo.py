"""`sdelab demo` owns only what it wrote: a second demo replaces those files and refuses a
folder that also holds anything else, under the folder's lock."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cli_helpers import run_cli
from sdelab.train.rundir import LOCK_FILE

SDELAB = Path(sys.executable).with_name("sdelab")
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
USER_FILES = ("notes.txt", "plots/mine/keep.txt", "run/my_notes.md")


def _files(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()
    }


def _demo(out: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(SDELAB), "demo", "--out", str(out), *args],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=600,
    )


def _interrupted_demo(out: Path) -> None:
    """A real demo stopped by SIGTERM while it trains: its mark and run folder stay."""
    proc = subprocess.Popen(
        [str(SDELAB), "demo", "--steps", "1000000", "--out", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
    )
    try:
        deadline = time.time() + 120
        while not (out / "run" / "metrics.jsonl").exists() and proc.poll() is None:
            assert time.time() < deadline, "the demo never started training"
            time.sleep(0.2)
        # while it trains, a second demo on the folder is refused and deletes nothing
        before = _files(out)
        second = _demo(out, "--steps", "2")
        assert second.returncode == 2 and f"in use by process {proc.pid}" in second.stderr
        assert _files(out).keys() >= before.keys()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM
    assert not (out / LOCK_FILE).exists() and not (out / "run" / LOCK_FILE).exists()


@pytest.mark.skipif(not SDELAB.exists(), reason="the sdelab script is not installed")
def test_second_demo_refuses_a_folder_holding_user_files(tmp_path):
    out = tmp_path / "demo"
    _interrupted_demo(out)
    for name in USER_FILES:
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(f"mine: {name}")
    before = _files(out)
    res = _demo(out, "--steps", "2")
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sdelab demo: error: "), res.stderr
    assert all(str(out / name) in lines[0] for name in USER_FILES), lines[0]
    assert _files(out) == before  # nothing deleted: neither the user's files nor the demo's
    assert not (out / LOCK_FILE).exists()


@pytest.mark.slow
@pytest.mark.skipif(not SDELAB.exists(), reason="the sdelab script is not installed")
def test_second_demo_replaces_only_the_demos_files(tmp_path, capsys):
    out = tmp_path / "demo"
    code, _, err = run_cli(capsys, "demo", "--steps", "20", "--n", "50", "--out", str(out))
    assert code == 0, err
    first = _files(out)
    assert "plots/density.png" in first and "likelihood.md" in first
    (out / "run" / "my_notes.md").write_text("mine")
    code, _, err = run_cli(capsys, "demo", "--steps", "20", "--n", "50", "--out", str(out))
    assert code == 2 and "my_notes.md" in err
    assert _files(out) == {**first, "run/my_notes.md": b"mine"}
    (out / "run" / "my_notes.md").unlink()
    (out / "plots" / "density.png").unlink()  # a demo cut short: fewer files, still its own
    code, out_text, err = run_cli(capsys, "demo", "--steps", "30", "--n", "50", "--out", str(out))
    assert code == 0 and "replacing the earlier demo" in out_text, err
    # the same files, the old checkpoint replaced by the new run's
    assert set(_files(out)) == {f.replace("step_00000020", "step_00000030") for f in first}
    assert "training checkerboard for 30 steps" in out_text
