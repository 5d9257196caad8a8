"""`sdelab likelihood`: flags map onto the estimator objects in one place; impossible
combinations, gone flags and unresolvable tolerances are one-line errors naming the cause."""

from __future__ import annotations

import json

import pytest

from cli_helpers import recorded, run_cli
from sdelab.cli import main

TINY = ["model.width=32", "model.depth=2", "model.embedding_dim=16", "train.batch_size=64",
        "train.steps=20", "train.ckpt_every=20"]  # fmt: skip


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("lik") / "run"
    assert main(["train", "8gaussians", *TINY, "--out", str(path)]) == 0
    return path


def _results(run_dir) -> set[str]:
    return {p.name for p in run_dir.glob("likelihood_*.json")}


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--rtol", "1e-3"], "--rtol/--atol are gone: --tol sets"),
        (["--atol", "1e-300"], "--rtol/--atol are gone"),
        (["--tol", "1e-300"], "below what the float64 ODE state can resolve"),
        (["--tol", "nan"], "argument --tol: expected a finite number"),
        (["--tol", "-1"], "argument --tol: must be a positive number"),
        (["--nodes", "8"], "--nodes sets an integrator's option: give --integrator"),
        (["--solver", "dopri8"], "--solver sets an integrator's option"),
        (["--integrator", "augmented", "--nodes", "8"], "use --integrator randomized"),
        (["--integrator", "randomized", "--nodes", "3"], "nodes must be even"),
        (["--integrator", "quadrature", "--solver-steps", "8"], "dopri8 is adaptive"),
        (["--integrator", "randomized", "--solver", "dopri5", "--solver-steps", "8"], "adaptive"),
        (["--integrator", "augmented", "--solver", "dpm3m"], "for the augmented solve"),
        (["--method", "elbo", "--tol", "1e-3"], "--tol set the ODE's solve: they need --method"),
        (["--method", "scoreflow", "--probes", "2"], "the ScoreFlow bound has no divergence"),
        (["--method", "vlb", "--integrator", "augmented"], "need --method ode"),
        (["--method", "loss", "--exact-trace"], "do not apply to --method loss"),
        (["--out", "x.json"], "--out is for --diffusers"),
    ],
)
def test_impossible_options_are_one_line(run_dir, capsys, args, needle):
    before = _results(run_dir)
    code, _, err = run_cli(capsys, "likelihood", str(run_dir), *args)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and needle in lines[0], err
    assert "time contains" not in err and _results(run_dir) == before


def test_flags_become_the_estimator_that_runs(run_dir, capsys):
    """--integrator/--solver/--nodes/--solver-steps/--probes land on the option objects: the
    printed tag, the file name and the record name the same integrator."""
    args = ["--integrator", "randomized", "--nodes", "4", "--solver-steps", "16", "--n", "8"]
    code, out, err = run_cli(capsys, "likelihood", str(run_dir), *args)
    assert code == 0, err
    rec = recorded(out)
    assert rec["tag"] == "ode_randomized4_dpm3m16_hutchinson1" and rec["tol"] is None
    assert (
        rec["estimator"]["integrator"]["nodes"] == 4 and rec["integrator"] == "randomized4_dpm3m16"
    )
    assert f"({rec['tag']})" in out and any(rec["tag"] in n for n in _results(run_dir))
    args = ["--integrator", "quadrature", "--solver", "dopri5", "--probes", "2", "--tol", "0.1"]
    code, out, err = run_cli(capsys, "likelihood", str(run_dir), *args, "--n", "8")
    assert code == 0, err
    rec = recorded(out)
    assert rec["tag"] == "ode_quadrature_dopri5_hutchinson2_tol0.1" and rec["probes"] == 2


def test_split_train_is_named_train(run_dir, capsys):
    code, out, err = run_cli(capsys, "likelihood", str(run_dir), "--split", "train", "--n", "8")
    assert code == 0, err
    assert "train NLL" in out and "test NLL" not in out
    rec = recorded(out)
    assert rec["split"] == "train" and "_train_" in out.split("recorded in ")[-1]


def test_a_result_from_the_old_format_is_kept(run_dir, capsys):
    """A result written by sdelab before the option objects (rtol/atol, no policy) stays where
    it is, untouched, beside the new result of the same evaluation (even with --force)."""
    old = run_dir / "likelihood_ode_exact_rtol0.001_n8_seed0.json"
    record = {"method": "ode", "divergence": "exact", "probes": None, "rtol": 1e-3,
              "atol": 1e-3, "n": 8, "seed": 0, "weights": "ema", "checkpoint": None,
              "nll_mean": 3.0, "nll_se": 0.1, "bpd_mean": 2.2, "bpd_se": 0.07}  # fmt: skip
    text = json.dumps(record)
    old.write_text(text)
    code, out, err = run_cli(capsys, "likelihood", str(run_dir), "--tol", "1e-3", "--n", "8",
                             "--force")  # fmt: skip
    assert code == 0, err
    assert old.read_text() == text and recorded(out)["checkpoint"] == 20


def test_only_torchdiffeqs_underflow_is_an_unsolvable_ode(run_dir, monkeypatch):
    """The step-size underflow becomes a one-line error naming --tol; any other assertion is a
    bug and keeps its traceback."""
    from sdelab.runs import likelihood

    def failing(message):
        def evaluate(*args, **kwargs):
            raise AssertionError(message)

        return evaluate

    monkeypatch.setattr(likelihood, "evaluate_sharded", failing("underflow in dt 1e-30"))
    with pytest.raises(ValueError, match="could not be solved.*looser --tol"):
        likelihood.run_likelihood(run_dir, n=4, progress=False)
    monkeypatch.setattr(likelihood, "evaluate_sharded", failing("shapes differ"))
    with pytest.raises(AssertionError, match="shapes differ"):
        likelihood.run_likelihood(run_dir, n=4, progress=False)


def test_help_names_every_bound(capsys):
    code, out, _ = run_cli(capsys, "likelihood", "--help")
    text = " ".join(out.split())
    assert code == 0 and "VDM's for VDM runs, DDPM's discrete L_vlb for DDPM runs" in text
    assert "--tol" in text and "--rtol" not in text
