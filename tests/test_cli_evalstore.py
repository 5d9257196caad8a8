"""`sdelab evaluate`'s results and its store `RUN/eval/quality/`: results named by every option
that changes them and never overwritten, the store locked, checksummed and cleared when an
evaluation started afresh fails."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from cli_helpers import run_cli
from sdelab.cli import main
from sdelab.train import evalstore

TINY = [
    "model.width=32",
    "model.depth=2",
    "model.embedding_dim=16",
    "train.batch_size=128",
    "train.steps=60",
    "train.log_every=30",
    "train.ckpt_every=30",
]
BASE = ["--features", "identity", "--sampler", "ode", "--steps", "4", "--n", "40"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("evalstore") / "run"
    assert main(["train", "oracle", *TINY, "--out", str(path)]) == 0
    return path


def _evaluate(capsys, run_dir, *extra):
    code, out, err = run_cli(capsys, "evaluate", str(run_dir), *BASE, *extra)
    path = out.splitlines()[-1].removeprefix("-> ") if code == 0 else None
    return code, path, err


def _one_line(code, err):
    assert code == 2 and len(err.strip().splitlines()) == 1, err


def test_results_are_named_by_every_option_and_kept(run_dir, tmp_path, capsys):
    """--n, --metrics, --seed, the reference (--stats vs the split) and --checkpoint each give
    their own file, which records the checkpoint's step; the same options again are refused
    (the file unchanged) until --force."""
    stats = tmp_path / "ref.npz"
    assert main(["stats", str(run_dir), "--features", "identity", "--out", str(stats)]) == 0
    capsys.readouterr()
    variants = [
        [],
        ["--n", "41"],
        ["--metrics", "fd,sw2"],
        ["--seed", "1"],
        ["--stats", str(stats)],
        ["--checkpoint", "30"],
    ]
    paths = []
    for extra in variants:
        code, path, err = _evaluate(capsys, run_dir, *extra)
        assert code == 0, err
        assert "%|" not in err  # no tqdm bar on a stderr that is not a terminal
        paths.append(path)
    assert len(set(paths)) == len(variants), paths
    steps = [json.loads(open(p).read())["checkpoint"] for p in paths]
    assert steps == [60, 60, 60, 60, 60, 30]
    before = open(paths[0]).read()
    code, _, err = _evaluate(capsys, run_dir)
    _one_line(code, err)
    assert "--force" in err and open(paths[0]).read() == before
    code, path, err = _evaluate(capsys, run_dir, "--force")
    assert code == 0 and path == paths[0], err


def test_resume_with_nothing_to_resume_is_refused(run_dir, capsys):
    code, _, err = _evaluate(capsys, run_dir, "--seed", "7", "--resume")
    _one_line(code, err)
    assert "nothing to resume" in err
    assert not list(run_dir.glob("quality_*seed7*")) and not (run_dir / "eval").exists()


def test_store_batches_are_checksummed(run_dir, monkeypatch, capsys):
    """An evaluation killed after its first chunk: a fresh start is told to --resume; a
    truncated or altered chunk is refused by name in one line; once the damaged file is
    deleted, --resume recomputes it and reports the uninterrupted metrics; no RUN/eval/ is
    left."""
    opts = ["--batch-size", "20", "--seed", "3", "--metrics", "fd,sw2"]
    code, path, err = _evaluate(capsys, run_dir, *opts)
    assert code == 0, err
    full = json.loads(open(path).read())
    put = evalstore.EvalStore.put_tensors

    def dying(self, i, tensors, meta):
        put(self, i, tensors, meta)
        if i == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(evalstore.EvalStore, "put_tensors", dying)
    code, _, err = _evaluate(capsys, run_dir, *opts, "--force")
    assert code == 130, err
    monkeypatch.setattr(evalstore.EvalStore, "put_tensors", put)
    store = run_dir / "eval" / "quality"
    batches = sorted(store.glob("batch_*.safetensors"))
    assert len(batches) == 2
    code, _, err = _evaluate(capsys, run_dir, *opts, "--force")
    _one_line(code, err)
    assert "--resume" in err
    good = batches[0].read_bytes()
    altered = bytearray(good)
    altered[-3] ^= 0x01  # one bit of one stored sample
    for damaged in (bytes(altered), good[: len(good) // 2]):
        batches[0].write_bytes(damaged)
        code, _, err = _evaluate(capsys, run_dir, *opts, "--force", "--resume")
        _one_line(code, err)
        assert batches[0].name in err and "damaged" in err
    batches[0].unlink()
    code, path, err = _evaluate(capsys, run_dir, *opts, "--force", "--resume")
    assert code == 0, err
    resumed = json.loads(open(path).read())
    assert resumed["fd"] == full["fd"] and resumed["sliced_w2"] == full["sliced_w2"]
    assert not (run_dir / "eval").exists()


def test_store_is_locked_while_an_evaluation_runs(run_dir, capsys):
    """A live owner's lock refuses a second evaluation, naming the process; a dead owner's is
    taken over."""
    store = run_dir / "eval" / "quality"
    store.mkdir(parents=True)
    owner = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock = {"pid": owner.pid, "host": __import__("socket").gethostname(), "command": "x"}
        (store / ".lock").write_text(json.dumps(lock))
        code, _, err = _evaluate(capsys, run_dir, "--seed", "11")
        _one_line(code, err)
        assert f"in use by process {owner.pid}" in err
    finally:
        owner.kill()
        owner.wait()
    code, _, err = _evaluate(capsys, run_dir, "--seed", "11")
    assert code == 0 and "stale lock" in err, err
    assert not (run_dir / "eval").exists()


def test_a_failed_fresh_evaluation_leaves_no_store(run_dir, monkeypatch, capsys):
    """An evaluation that fails with an error after its chunks were stored leaves nothing
    that would block the next one."""
    import sdelab.runs.quality as rq

    def failing(*args, **kwargs):
        raise ValueError("the metric failed")

    good = rq.evaluate_quality
    monkeypatch.setattr(rq, "evaluate_quality", failing)
    code, _, err = _evaluate(capsys, run_dir, "--batch-size", "20", "--seed", "13")
    _one_line(code, err)
    assert not (run_dir / "eval").exists()
    monkeypatch.setattr(rq, "evaluate_quality", good)
    code, _, err = _evaluate(capsys, run_dir, "--batch-size", "20", "--seed", "13")
    assert code == 0, err
