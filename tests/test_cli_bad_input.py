"""Input that cannot work, caught at the door: one line on stderr naming the cause, exit code
2, nothing written — a full disk, an allocation too large, damaged or non-finite files and
values, impossible sizes."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import sdelab
from cli_helpers import run_cli
from sdelab.cli import main

TINY = [
    "model.width=32",
    "model.depth=2",
    "model.embedding_dim=16",
    "train.batch_size=64",
    "train.steps=20",
    "train.log_every=10",
    "train.ckpt_every=20",
]
QUICK = ["--features", "identity", "--sampler", "ode", "--steps", "4", "--n", "40"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("bad") / "run"
    assert main(["train", "oracle", *TINY, "--out", str(path)]) == 0
    return path


def _one_line(code: int, err: str, *needles: str) -> None:
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert all(n in lines[0] for n in needles), err


def _sdelab_with_file_limit(args: list[str], limit: int, cwd: Path):
    """``python -m sdelab ARGS`` with files limited to ``limit`` bytes: a write past it fails
    as on a full disk (EFBIG; Python ignores SIGXFSZ)."""

    def cap():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    env = {**os.environ, "PYTHONPATH": str(Path(sdelab.__file__).parents[1])}
    return subprocess.run(
        [sys.executable, "-m", "sdelab", *args],
        cwd=cwd, env=env, preexec_fn=cap, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def test_a_full_disk_in_sample_leaves_no_file(run_dir, tmp_path):
    """The samples fit, their plot does not: one line, exit 2, and neither file (nor a temp
    file) is left."""
    res = _sdelab_with_file_limit(
        ["sample", str(run_dir), "--sampler", "ode", "--steps", "2", "--n", "2000",
         "--out", "x.npy"], 30_000, tmp_path,
    )  # fmt: skip
    last = res.stderr.strip().splitlines()[-1]
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert last.startswith("sdelab sample: error: cannot write x.png") and "disk" in last
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_in_train_is_one_line(tmp_path):
    """The first checkpoint does not fit: one line, exit 2, no partial checkpoint, no lock."""
    res = _sdelab_with_file_limit(["train", "oracle", *TINY, "--out", "r"], 20_000, tmp_path)
    last = res.stderr.strip().splitlines()[-1]
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert last.startswith("sdelab train: error: cannot write r/checkpoints/step_00000020")
    assert list((tmp_path / "r" / "checkpoints").iterdir()) == []
    assert not (tmp_path / "r" / ".lock").exists()


@pytest.mark.parametrize("command", ["sample", "evaluate"])
@pytest.mark.parametrize("option", ["--n", "--steps"])
def test_sizes_beyond_memory_are_one_line(run_dir, tmp_path, capsys, command, option):
    args = [command, str(run_dir), *QUICK, option, str(10**12)]
    if command == "sample":
        args = [a for a in args if a not in ("--features", "identity")] + ["--out", "x.npy"]
    code, _, err = run_cli(capsys, *args)
    _one_line(code, err, "GiB", "fewer")
    assert not list(run_dir.glob("quality_*n1000000000000*")) and not (run_dir / "eval").exists()


def test_a_failed_allocation_is_one_line(run_dir, tmp_path, monkeypatch, capsys):
    """What the door cannot foresee (a GPU's memory): the allocator's error becomes one line."""
    import sdelab.runs.sampling as rs

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(rs, "sample", oom)
    code, _, err = run_cli(capsys, "sample", str(run_dir), "--out", str(tmp_path / "x.npy"))
    _one_line(code, err, "not enough memory", "20.00 GiB", "--batch-size")


def test_debug_shows_the_traceback(run_dir, tmp_path, monkeypatch, capsys):
    """--debug and SDELAB_DEBUG=1 raise instead of printing one line."""
    args = ["sample", str(run_dir), "--class", "3", "--out", str(tmp_path / "x.npy")]
    code, _, err = run_cli(capsys, *args)
    assert code == 2 and "unconditional" in err
    with pytest.raises(ValueError, match="unconditional"):
        main(["--debug", *args])
    monkeypatch.setenv("SDELAB_DEBUG", "1")
    with pytest.raises(ValueError, match="unconditional"):
        main(args)


def _stats_file(path: Path, mu, sigma) -> str:
    np.savez(path, mu=np.asarray(mu, float), sigma=np.asarray(sigma, float))
    return str(path)


@pytest.mark.parametrize(
    "mu, sigma, cause",
    [
        ([np.nan, 0.0], np.eye(2), "mean mu contains NaN"),
        ([0.0, 0.0], [[1.0, np.inf], [np.inf, 1.0]], "sigma contains NaN"),
        ([0.0, 0.0], [[1.0, 2.0], [2.0, 1.0]], "not positive semi-definite"),
        ([0.0, 0.0], [[1.0, 0.5], [0.0, 1.0]], "not symmetric"),
        ([0.0, 0.0, 0.0], np.eye(3), "3 features"),
    ],
)
def test_impossible_statistics_are_refused(run_dir, tmp_path, capsys, mu, sigma, cause):
    stats = _stats_file(tmp_path / "s.npz", mu, sigma)
    code, _, err = run_cli(capsys, "evaluate", str(run_dir), *QUICK, "--stats", stats)
    _one_line(code, err, cause)
    assert not list(run_dir.glob("quality_*stats-s_*"))


def test_a_truncated_statistics_file_is_one_line(run_dir, tmp_path, capsys):
    good = Path(_stats_file(tmp_path / "good.npz", [0.0, 0.0], np.eye(2))).read_bytes()
    (tmp_path / "cut.npz").write_bytes(good[: len(good) // 2])
    code, _, err = run_cli(capsys, "evaluate", str(run_dir), *QUICK, "--stats",
                           str(tmp_path / "cut.npz"))  # fmt: skip
    _one_line(code, err, "cut.npz", "truncated or damaged")


def test_a_wrong_inception_weights_file_is_one_line(tmp_path, capsys):
    junk = tmp_path / "inception.pth"
    junk.write_bytes(b"not a weights file" * 10)
    out = tmp_path / "s.npz"
    code, _, err = run_cli(capsys, "stats", "digits", "--features", "inception",
                           "--inception-weights", str(junk), "--out", str(out))  # fmt: skip
    _one_line(code, err, "not a readable weights file")
    assert not out.exists()


def test_evaluate_checks_sampler_options(run_dir, capsys):
    code, _, err = run_cli(capsys, "evaluate", str(run_dir), *QUICK[:2], "--sampler", "pc",
                           "--option", "snr=abc")  # fmt: skip
    _one_line(code, err, "snr='abc'", "expected a number")


def test_an_impossible_kid_subset_size_is_refused(run_dir, capsys):
    code, _, err = run_cli(capsys, "evaluate", str(run_dir), *QUICK, "--metrics", "kid",
                           "--kid-subset-size", "500")  # fmt: skip
    _one_line(code, err, "--kid-subset-size 500", "choose 2 to 40")


def test_inpaint_refuses_a_non_finite_observation(run_dir, tmp_path, capsys):
    code, _, err = run_cli(capsys, "inpaint", str(run_dir), "--known", "0=nan", "--n", "4",
                           "--out", str(tmp_path / "i.npy"))  # fmt: skip
    _one_line(code, err, "0=nan", "finite")
    assert "diverged" not in err
