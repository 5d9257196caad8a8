"""`sdelab sample | likelihood | plot | demo` on a tiny trained run, and their errors."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cli_helpers import recorded, run_cli
from sdelab.cli import main
from sdelab.likelihood.bpd import ODE
from sdelab.likelihood.options import Exact, Hutchinson, default_policy
from sdelab.runs import run_likelihood

TINY = [
    "model.width=32",
    "model.depth=2",
    "model.embedding_dim=16",
    "train.batch_size=128",
    "train.steps=150",
    "train.log_every=50",
    "train.ckpt_every=150",
]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "run"
    assert main(["train", "8gaussians", *TINY, "--out", str(path)]) == 0
    return path


def test_sample_writes_array_and_plot(run_dir, tmp_path, capsys):
    out = tmp_path / "s.npy"
    code, text, _ = run_cli(
        capsys,
        "sample",
        str(run_dir),
        "--sampler",
        "ode",
        "--steps",
        "10",
        "--option",
        "method=rk4",
        "--n",
        "300",
        "--out",
        str(out),
    )
    assert code == 0, text
    x = np.load(out)
    assert x.shape == (300, 2) and np.isfinite(x).all()
    assert out.with_suffix(".png").exists() and "NFE 40" in text  # RK4: 4 per step
    # never overwrite
    code, _, err = run_cli(capsys, "sample", str(run_dir), "--n", "10", "--out", str(out))
    assert code == 2 and "exists" in err and len(err.strip().splitlines()) == 1


def test_sample_bad_option_is_one_line(run_dir, tmp_path, capsys):
    code, _, err = run_cli(
        capsys,
        "sample",
        str(run_dir),
        "--sampler",
        "pc",
        "--option",
        "snr=oops=1",
        "--option",
        "colour=red",
        "--n",
        "5",
        "--out",
        str(tmp_path / "x.npy"),
    )
    assert code == 2 and len(err.strip().splitlines()) == 1 and "colour" in err
    code, _, err = run_cli(
        capsys,
        "sample",
        str(run_dir),
        "--option",
        "snr",
        "--n",
        "5",
        "--out",
        str(tmp_path / "y.npy"),
    )
    assert code == 2 and "KEY=VALUE" in err


@pytest.mark.parametrize(
    "args",
    [
        ["--method", "ode", "--tol", "1e-3"],
        ["--method", "ode", "--probes", "2", "--tol", "1e-3"],
        ["--method", "elbo"],
        ["--method", "scoreflow"],
    ],
)
def test_likelihood_reports_and_records(run_dir, capsys, args):
    code, out, _ = run_cli(capsys, "likelihood", str(run_dir), *args, "--n", "200", "--force")
    assert code == 0 and "nats" in out
    rec = recorded(out)
    assert rec["tol"] == (1e-3 if args[1] == "ode" else None) and rec["seed"] == 0
    assert rec["n"] == 200 and math.isfinite(rec["nll_mean"]) and rec["nll_se"] > 0
    # bits/dim of a density is nats / (D log 2)
    assert rec["bpd_mean"] == pytest.approx(rec["nll_mean"] / (2 * math.log(2)), rel=1e-6)
    # the printed policy, the file name and the record are the same resolved estimator's
    assert f"({rec['tag']})" in out and rec["tag"] in recorded_path(out).name
    assert rec["checkpoint"] == 150  # the newest checkpoint, resolved (never null)
    assert "solver bias" in out and "SE by source" in out  # the error bar
    # per-example results beside the record: they pair up by index and average to the record
    arrays = np.load(recorded_path(out).with_name(rec["per_example"]))
    assert list(arrays["index"]) == list(range(200))
    assert float(arrays["nll"].mean()) == pytest.approx(rec["nll_mean"], rel=1e-6)
    np.testing.assert_allclose(arrays["bpd"], arrays["nll"] / (2 * math.log(2)), rtol=1e-6)
    if args[1] == "ode":  # each ODE value has its error bar; a bound has none
        assert bool((arrays["error"] >= 0).all()) and bool((arrays["error"] < 0.05).all())
        if "--probes" in args:  # K = 2 probes: their standard error per example (0 where the
            # two ±1 probes agree up to sign, which in D = 2 gives the same estimate)
            se = arrays["probe_se"]
            assert bool((se >= 0).all()) and bool((se > 0).any())
        else:  # the exact trace has no probe noise
            assert "probe_se" not in arrays or bool((arrays["probe_se"] == 0).all())
    else:
        assert bool(np.isnan(arrays["error"]).all())


def recorded_path(out: str):
    from pathlib import Path

    (line,) = [ln for ln in out.splitlines() if ln.startswith("recorded in ")]
    return Path(line.removeprefix("recorded in "))


def test_likelihood_defaults_come_from_the_one_policy(run_dir, capsys):
    """No flags: the result is default_policy's choice for D = 2 (exact trace, augmented,
    tol 1e-2), as the library resolves it."""
    from sdelab.likelihood.options import default_policy

    code, out, err = run_cli(capsys, "likelihood", str(run_dir), "--n", "20", "--force")
    assert code == 0, err
    policy = default_policy(2)
    assert recorded(out)["estimator"]["tag"] == f"ode_{policy.tag}"


def test_hutchinson_agrees_with_exact_trace(run_dir):
    """Same points, same ODE: the Hutchinson estimate is unbiased for the exact-trace NLL."""
    exact = run_likelihood(run_dir, estimator=ODE(tol=1e-3, divergence=Exact()), n=300,
                           progress=False)  # fmt: skip
    hutch = run_likelihood(
        run_dir, estimator=ODE(tol=1e-3, divergence=Hutchinson(4)), n=300, progress=False
    )
    diff = hutch.nll - exact.nll
    assert abs(float(diff.mean())) < 4 * float(diff.std()) / math.sqrt(len(diff)) + 1e-2


def test_plot_writes_every_figure(run_dir, tmp_path, capsys):
    code, out, _ = run_cli(capsys, "plot", str(run_dir), "--out", str(tmp_path / "p"))
    assert code == 0
    names = {p.split("/")[-1] for p in out.split()}
    assert {
        "loss.png",
        "samples_ode.png",
        "samples_euler_maruyama.png",
        "density.png",
        "trajectories.png",
    } <= names


def test_missing_run_is_one_line_error(tmp_path, capsys):
    for cmd in (
        ["likelihood", str(tmp_path / "nope")],
        ["plot", str(tmp_path / "nope")],
        ["sample", str(tmp_path / "nope"), "--out", str(tmp_path / "a.npy")],
    ):
        code, _, err = run_cli(capsys, *cmd)
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        assert err.startswith(f"sdelab {cmd[0]}: error:")


@pytest.mark.slow
def test_demo_end_to_end(tmp_path, capsys):
    code, out, _ = run_cli(
        capsys, "demo", "--steps", "300", "--n", "300", "--out", str(tmp_path / "demo")
    )
    assert code == 0 and "true entropy" in out
    assert (tmp_path / "demo" / "plots" / "density.png").exists()
    # the demo owns its folder: a second demo replaces the first (make demo twice works)
    code, out, err = run_cli(
        capsys, "demo", "--steps", "20", "--n", "50", "--out", str(tmp_path / "demo")
    )
    assert code == 0 and "replacing the earlier demo" in out, err
    assert "training checkerboard for 20 steps" in out
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    code, _, err = run_cli(capsys, "demo", "--out", str(mine))
    assert code == 2 and "holds files the demo did not write" in err
    assert (mine / "notes.txt").read_text() == "keep"


@pytest.mark.slow
def test_trained_oracle_nll_approaches_entropy(tmp_path):
    """A short run on Gaussian data: exact ODE NLL within 0.05 nats of the closed-form entropy
    (and never below it by more than 3 SE: a model cannot beat the true density on average)."""
    run = tmp_path / "oracle"
    assert main(["train", "oracle", "train.steps=3000", "--out", str(run)]) == 0
    res = run_likelihood(run, estimator=ODE(tol=1e-3), n=4000, progress=False)
    from sdelab.train.build import load_run, make_run_dataset

    config, _, _ = load_run(run)
    entropy = make_run_dataset(config).entropy()
    assert res.nll_mean - entropy < 0.05 + 3 * res.nll_se
    assert res.nll_mean - entropy > -3 * res.nll_se - 0.01


def test_train_with_periodic_likelihood_eval(tmp_path, capsys):
    from sdelab.plots import read_jsonl

    run = tmp_path / "ev"
    code, _, _ = run_cli(
        capsys,
        "train",
        "8gaussians",
        *TINY,
        "train.steps=40",
        "train.eval_every=20",
        "eval.options={n_eval: 50}",
        "--out",
        str(run),
    )
    assert code == 0
    rows = read_jsonl(run / "eval.jsonl")
    assert [r["step"] for r in rows] == [20, 40]
    assert all(math.isfinite(r["test_nll_ode"]) and math.isfinite(r["test_elbo_nll"]) for r in rows)
    # the same default policy as `sdelab likelihood`, recorded; a solver-bias bound beside it
    assert all(r["ode_policy"] == default_policy(2).tag and r["ode_bias_bound"] >= 0 for r in rows)
    # one default: the library, run_likelihood, the CLI and the eval hook resolve the same
    # integrator (and divergence, tol) for the same run and data
    import torch

    from sdelab.likelihood import log_likelihood
    from sdelab.train.build import load_run

    _, model, schedule = load_run(run)
    x = torch.randn(4, 2, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        library = log_likelihood(model, schedule, x).policy.tag
    runs = run_likelihood(run, n=20, progress=False).policy["tag"]
    code, out, err = run_cli(capsys, "likelihood", str(run), "--n", "20")
    assert code == 0, err
    cli = recorded(out)["estimator"]["tag"].removeprefix("ode_")
    assert library == runs == cli == rows[-1]["ode_policy"] == default_policy(2).tag
