"""`sdelab stats | evaluate`: reference statistics and sample-quality metrics of a run."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cli_helpers import run_cli
from sdelab.cli import main
from sdelab.metrics import frechet_distance_features, sliced_w2
from sdelab.quality import load_stats
from sdelab.runs import data_split, open_run, sample_run

TINY = [
    "model.width=32",
    "model.depth=2",
    "model.embedding_dim=16",
    "train.batch_size=128",
    "train.steps=60",
    "train.log_every=30",
    "train.ckpt_every=60",
]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("quality") / "run"
    assert main(["train", "oracle", *TINY, "--out", str(path)]) == 0
    return path


def test_stats_of_the_oracle_are_its_moments(tmp_path, capsys):
    """Identity-feature statistics of N(μ, Σ) training draws estimate μ and Σ: within 5
    standard errors (SE of a mean σ/√n, of a covariance entry ≈ √((Σ_ii Σ_jj + Σ_ij²)/n))."""
    out = tmp_path / "oracle.npz"
    code, text, err = run_cli(
        capsys, "stats", "oracle", "--features", "identity", "--n", "20000", "--out", str(out)
    )
    assert code == 0, err
    assert str(out) in text
    stats = load_stats(out)
    mean, cov = np.array([1.0, -0.5]), np.array([[1.0, 0.7], [0.7, 0.8]])
    n = stats.n
    assert n == 20000
    se_mean = np.sqrt(np.diag(cov) / n)
    assert np.all(np.abs(np.asarray(stats.mu) - mean) < 5 * se_mean)
    se_cov = np.sqrt((np.outer(np.diag(cov), np.diag(cov)) + cov**2) / n)
    assert np.all(np.abs(np.asarray(stats.sigma) - cov) < 5 * se_cov)
    # never overwrite
    code, _, err = run_cli(capsys, "stats", "oracle", "--features", "identity", "--out", str(out))
    assert code == 2 and "exists" in err


def test_evaluate_equals_the_metrics_of_the_same_samples(run_dir, capsys):
    """`evaluate` reports the FD and sliced W2 of exactly the samples `sample_run` draws with
    the same seed, against the run's test split."""
    code, text, err = run_cli(
        capsys,
        "evaluate",
        str(run_dir),
        "--metrics",
        "fd,sw2",
        "--features",
        "identity",
        "--n",
        "400",
        "--sampler",
        "ode",
        "--steps",
        "20",
        "--seed",
        "3",
    )
    assert code == 0, err
    name = "quality_identity_ode_20_fd-sw2_n400_seed3_test_step60.json"
    assert text.splitlines()[-1] == f"-> {run_dir / name}"
    record = json.loads((run_dir / name).read_text())
    assert record["checkpoint"] == 60
    loaded = open_run(run_dir)
    x = sample_run(loaded, n=400, sampler="ode", steps=20, seed=3).samples
    ref = data_split(loaded.dataset, "test", None)
    assert record["fd"] == pytest.approx(frechet_distance_features(x, ref), rel=1e-9)
    g = torch.Generator().manual_seed(3)
    assert record["sliced_w2"] == pytest.approx(sliced_w2(x, ref, generator=g), rel=1e-9)
    assert record["n_samples"] == 400 and record["nfe"] > 0 and "fd" in text


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--metrics", "kid", "--stats", "STATS"], "need reference features"),
        (["--metrics", "is"], "class probabilities"),
        (["--metrics", "fid"], "unknown metric"),
        (["--features", "classifier"], "--classifier DIR"),
        (["--features", "inception"], "image data"),
        (["--n", "1"], "--n must be"),
    ],
)
def test_evaluate_bad_input_is_one_line(run_dir, tmp_path, capsys, extra, message):
    stats = tmp_path / "s.npz"
    assert main(["stats", str(run_dir), "--features", "identity", "--out", str(stats)]) == 0
    capsys.readouterr()
    extra = [str(stats) if e == "STATS" else e for e in extra]
    args = ["evaluate", str(run_dir), "--features", "identity", "--n", "50", "--steps", "5"]
    code, _, err = run_cli(capsys, *args, *extra)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_interrupted_evaluate_resumes_to_the_same_metrics(run_dir, monkeypatch, capsys):
    """A run killed after its first sample chunk, resumed with --resume, reports the metrics of
    an uninterrupted one (chunk i depends only on (seed, i)); a fresh start is refused while
    the interrupted one is there, and other options on resume too."""
    from sdelab.runs import run_quality
    from sdelab.train import evalstore

    kw = dict(metrics="fd,sw2", features="identity", n=300, sampler="ode", steps=10,
              batch_size=100, seed=5, progress=False)  # fmt: skip
    full = run_quality(run_dir, **kw).result
    put = evalstore.EvalStore.put_tensors

    def dying(self, i, tensors, meta):
        put(self, i, tensors, meta)
        raise KeyboardInterrupt

    monkeypatch.setattr(evalstore.EvalStore, "put_tensors", dying)
    with pytest.raises(KeyboardInterrupt):
        run_quality(run_dir, resumable=True, **kw)
    monkeypatch.setattr(evalstore.EvalStore, "put_tensors", put)
    with pytest.raises(ValueError, match="--resume"):
        run_quality(run_dir, resumable=True, **kw)
    with pytest.raises(ValueError, match="steps"):
        run_quality(run_dir, resume=True, **{**kw, "steps": 11})
    resumed = run_quality(run_dir, resume=True, **kw).result
    assert resumed.fd == full.fd and resumed.sliced_w2 == full.sliced_w2
    assert not (run_dir / "eval" / "quality").exists()
