"""What a new user hits on the command line (issue 16): resume from the run's own config,
overrides anywhere, absolute data paths, checked options, kept results, the run-folder lock,
no overwrites, one-line errors instead of tracebacks, advice that works, progress, --version,
and the plots. Through the real entry point (``run_cli``) and, where the behaviour belongs to
the process (exit 130, a second process meeting the lock), the installed ``sdelab`` script."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from io import StringIO
from pathlib import Path

import numpy as np
import pytest
import torch

import sdelab.cli.sample as cli_sample
from cli_helpers import recorded, run_cli
from sdelab.data.png import save_level_grid, save_png_grid
from sdelab.plots import samples_figure, smoothing_window
from sdelab.progress import Progress
from sdelab.runs import sample_run
from sdelab.train.build import build_run
from sdelab.train.config import load_config
from sdelab.train.rundir import LOCK_FILE, save

TINY = [
    "model.width=16",
    "model.depth=1",
    "model.embedding_dim=8",
    "train.batch_size=32",
    "train.steps=20",
    "train.log_every=5",
    "train.ckpt_every=10",
]
SDELAB = Path(sys.executable).with_name("sdelab")


def one_line(err: str, command: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"sdelab {command}: error: "), err
    return lines[0]


def last_step(run: Path) -> int:
    return json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["step"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A finished 20-step checkerboard run."""
    path = tmp_path_factory.mktemp("ux") / "run"
    from sdelab.cli import main

    assert main(["train", "checkerboard", *TINY, "--out", str(path)]) == 0
    return path


def _copy(run: Path, to: Path) -> Path:
    shutil.copytree(run, to)
    return to


# ---- 1. --resume uses the run's own config -----------------------------------------------------
def test_resume_without_config_uses_the_runs_config(run_dir, tmp_path, capsys):
    run = _copy(run_dir, tmp_path / "run")
    code, out, err = run_cli(capsys, "train", "--resume", "--out", str(run))
    assert code == 0, err
    assert "trained to step 20" in out and "nothing changed" in out
    # the CONFIG's own train.steps (10000 in checkerboard.yaml) is not used: only overrides are
    code, out, err = run_cli(
        capsys, "train", "checkerboard", *TINY[:4], "--resume", "--out", str(run)
    )
    assert code == 0, err
    assert "trained to step 20" in out and "not used on resume" in err and last_step(run) == 20
    code, out, err = run_cli(capsys, "train", "--resume", "--out", str(run), "train.steps=30")
    assert code == 0, err
    assert "train.steps 20 -> 30" in out and "trained to step 30" in out and last_step(run) == 30
    code, _, err = run_cli(capsys, "train", "--resume", "--out", str(run), "model.width=8")
    assert code == 2 and "model.width (saved 16, given 8)" in one_line(err, "train")


def test_resume_of_nothing_and_no_config_are_one_line(tmp_path, capsys):
    code, _, err = run_cli(capsys, "train", "--resume", "--out", str(tmp_path / "none"))
    assert code == 2 and "holds no run to resume" in one_line(err, "train")
    code, _, err = run_cli(capsys, "train", "--out", str(tmp_path / "x"))
    assert code == 2 and "CONFIG is required" in one_line(err, "train")


# ---- 2. KEY=VALUE anywhere ---------------------------------------------------------------------
def test_overrides_after_flags(capsys):
    code, out, err = run_cli(
        capsys, "train", "checkerboard", "--dry-run", "train.steps=1500", "optim.lr=3e-4"
    )
    assert code == 0, err
    assert "steps: 1500" in out and "lr: 0.0003" in out
    code, _, err = run_cli(capsys, "train", "checkerboard", "--dry-run", "--bogus")
    assert code == 2
    assert err.strip() == "sdelab: error: unrecognized arguments: --bogus (see sdelab --help)"


# ---- 3. relative data paths --------------------------------------------------------------------
def test_relative_data_path_is_made_absolute(tmp_path, monkeypatch, capsys):
    here, elsewhere = tmp_path / "here", tmp_path / "elsewhere"
    (here / "d").mkdir(parents=True)
    elsewhere.mkdir()
    x = np.random.default_rng(0).normal(size=(200, 2)).astype(np.float32)
    np.save(here / "d" / "x.npy", x)
    monkeypatch.chdir(here)
    argv = ["train", "oracle", *TINY, "data.name=array", "data.path=d/x.npy", "--out", "run"]
    assert run_cli(capsys, *argv)[0] == 0
    saved = json.loads((here / "run" / "config.json").read_text())["data"]
    assert saved["path"] == str(here / "d" / "x.npy") and saved["as_typed"] == {"path": "d/x.npy"}
    image = load_config("images/digits", ["data.options.root=data/digits"]).data
    assert image.options["root"] == str(here / "data" / "digits")
    assert image.as_typed == {"options.root": "data/digits"}
    monkeypatch.chdir(elsewhere)  # likelihood, sample and resume from another folder
    run = str(here / "run")
    code, out, err = run_cli(capsys, "likelihood", run, "--n", "20", "--tol", "1e-2")
    assert code == 0, err
    code, _, err = run_cli(capsys, "sample", run, "--n", "5", "--steps", "5", "--out", "s.npy")
    assert code == 0, err
    code, out, err = run_cli(capsys, "train", "--resume", "--out", run, "train.steps=25")
    assert code == 0 and "trained to step 25" in out, err


# ---- 4. likelihood: checked options, kept results ----------------------------------------------
@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--tol", "-0.001"], "argument --tol: must be a positive number, got -0.001"),
        (["--tol=-1e-3"], "argument --tol: must be a positive number, got -1e-3"),
        (["--tol", "nan"], "argument --tol: expected a finite number"),
        (["--n", "0"], "argument --n/--num-examples: must be a positive integer, got 0"),
        (["--probes", "0"], "argument --probes: must be a positive integer"),
        (["--batch-size", "ten"], "argument --batch-size: expected an integer, got 'ten'"),
        (["--seed", "-1"], "argument --seed: must be 0 or a positive integer"),
    ],
)
def test_likelihood_numeric_options_are_checked(run_dir, capsys, args, needle):
    code, _, err = run_cli(capsys, "likelihood", str(run_dir), *args)
    assert code == 2 and needle in one_line(err, "likelihood")


def test_sample_numeric_options_are_checked(run_dir, tmp_path, capsys):
    for args, needle in [
        (["--n", "-5"], "--n/--num-samples: must be a positive integer"),
        (["--steps", "0"], "--steps: must be a positive integer"),
        (["--guidance", "inf"], "--guidance: expected a finite number"),
    ]:
        code, _, err = run_cli(
            capsys, "sample", str(run_dir), *args, "--out", str(tmp_path / "a.npy")
        )
        assert code == 2 and needle in one_line(err, "sample")


def test_likelihood_keeps_each_result_and_records_its_options(run_dir, tmp_path, capsys):
    run = str(_copy(run_dir, tmp_path / "run"))
    base = ["likelihood", run, "--n", "40", "--tol", "1e-2"]
    code, out, err = run_cli(capsys, *base)
    assert code == 0, err
    exact = recorded(out)
    assert exact["divergence"] == "exact" and exact["probes"] is None
    assert (exact["tol"], exact["n"], exact["seed"]) == (1e-2, 40, 0)
    assert exact["method"] == "ode" and exact["dequantization"] == "none"
    code, out, err = run_cli(capsys, *base, "--probes", "2")
    assert code == 0, err
    hutch = recorded(out)
    assert hutch["divergence"] == "hutchinson2" and hutch["probes"] == 2
    files = sorted(p.name for p in Path(run).glob("likelihood_*.json"))
    assert len(files) == 2, files  # the exact-trace result was not replaced
    code, _, err = run_cli(capsys, *base)
    assert code == 2 and "pass --force to replace it" in one_line(err, "likelihood")
    code, out, err = run_cli(capsys, *base, "--force")
    assert code == 0 and recorded(out)["nll_mean"] == pytest.approx(exact["nll_mean"]), err


# ---- 5. the run-folder lock --------------------------------------------------------------------
def _write_lock(folder: Path, pid: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    import socket

    record = {"pid": pid, "host": socket.gethostname(), "command": "sdelab train", "started": "x"}
    (folder / LOCK_FILE).write_text(json.dumps(record))


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_live_lock_refuses_and_a_stale_one_is_taken_over(run_dir, tmp_path, capsys):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        run = _copy(run_dir, tmp_path / "run")
        _write_lock(run, sleeper.pid)
        code, _, err = run_cli(capsys, "train", "--resume", "--out", str(run), "train.steps=25")
        assert code == 2 and f"is in use by process {sleeper.pid}" in one_line(err, "train")
        assert last_step(run) == 20
        new = tmp_path / "new"  # a new folder: the stale lock alone does not make it "not empty"
        _write_lock(new, sleeper.pid)
        code, _, err = run_cli(capsys, "train", "checkerboard", *TINY, "--out", str(new))
        assert code == 2 and "in use by process" in one_line(err, "train")
        clf = tmp_path / "clf"
        _write_lock(clf, sleeper.pid)
        code, _, err = run_cli(
            capsys, "train-classifier", "8gaussians", "--steps", "5", "--out", str(clf)
        )
        assert code == 2 and "in use by process" in one_line(err, "train-classifier")
    finally:
        sleeper.kill()
        sleeper.wait()
    _write_lock(run, _dead_pid())
    code, out, err = run_cli(capsys, "train", "--resume", "--out", str(run), "train.steps=25")
    assert code == 0 and "taking over the stale lock" in err and "trained to step 25" in out
    assert not (run / LOCK_FILE).exists()  # released at the end


@pytest.mark.skipif(not SDELAB.exists(), reason="the sdelab script is not installed")
def test_two_processes_cannot_train_into_one_folder(tmp_path):
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen(
        [str(SDELAB), "train", "checkerboard", *TINY, "train.steps=1000000", "--out", str(run)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        deadline = time.time() + 120
        while not (run / "config.json").exists() and first.poll() is None:
            assert time.time() < deadline, "the first run never started"
            time.sleep(0.2)
        resumed = subprocess.run(
            [str(SDELAB), "train", "--resume", "--out", str(run)],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
        )
        assert resumed.returncode == 2 and f"in use by process {first.pid}" in resumed.stderr
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=120)
    assert first.returncode == 128 + signal.SIGTERM
    assert not (run / LOCK_FILE).exists()
    assert json.loads((run / "config.json").read_text())["data"]["name"] == "checkerboard"


# ---- 6. sample checks every output first -------------------------------------------------------
def test_sample_refuses_before_writing_anything(run_dir, tmp_path, capsys):
    out = tmp_path / "x.npy"
    out.with_suffix(".png").write_bytes(b"my plot")
    code, _, err = run_cli(
        capsys, "sample", str(run_dir), "--n", "5", "--steps", "5", "--out", str(out)
    )
    assert code == 2 and "x.png exists" in one_line(err, "sample")
    assert not out.exists() and out.with_suffix(".png").read_bytes() == b"my plot"
    code, _, err = run_cli(
        capsys, "sample", str(run_dir), "--n", "5", "--out", str(tmp_path / "x.txt")
    )
    assert code == 2 and ".npy or .csv" in one_line(err, "sample")


def test_sample_names_the_checkpoint_that_made_it(run_dir, tmp_path, capsys):
    """The printed line says which checkpoint step drew the samples (the newest by default)."""
    names = (run_dir / "checkpoints").glob("step_*.safetensors")
    steps = sorted(int(p.stem.split("_")[-1]) for p in names)
    out = tmp_path / "s.npy"
    code, stdout, _ = run_cli(
        capsys, "sample", str(run_dir), "--n", "5", "--steps", "5", "--out", str(out)
    )
    assert code == 0 and f"checkpoint step {steps[-1]}" in stdout, stdout


# ---- 7. one-line errors instead of tracebacks --------------------------------------------------
@pytest.mark.parametrize(
    ("option", "needle"),
    [
        ("snr=abc", "bad option snr='abc' for sampler 'pc': expected a number"),
        ("denoise=maybe", "bad option denoise='maybe' for sampler 'pc': expected true or false"),
        ("n_corrector_steps=1.5", "expected an integer"),
        ("predictor=3", "expected a name"),
    ],
)
def test_sampler_option_types_are_checked(run_dir, tmp_path, capsys, option, needle):
    argv = ["sample", str(run_dir), "--sampler", "pc", "--option", option, "--n", "5"]
    code, _, err = run_cli(capsys, *argv, "--out", str(tmp_path / "s.npy"))
    assert code == 2 and needle in one_line(err, "sample")


class _Exploit:
    def __reduce__(self):
        return (os.system, ("true",))


def test_unsafe_pickle_is_one_line(tmp_path, capsys):
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    payload = {b"data": np.zeros((1, 3072), np.uint8), b"labels": [_Exploit()]}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]:
        (root / name).write_bytes(pickle.dumps(payload, protocol=2))
    argv = ["train", "images/sdeflow_cifar10", f"data.options.root={root}"]
    code, _, err = run_cli(capsys, *argv, "--out", str(tmp_path / "run"))
    assert code == 2 and "refusing to load global" in one_line(err, "train")


def test_checkpoint_whose_config_disagrees_with_its_tensors(run_dir, tmp_path, capsys):
    run = _copy(run_dir, tmp_path / "run")
    for path in (run / "checkpoints").glob("*.json"):
        meta = json.loads(path.read_text())
        meta["config"]["model"]["width"] = 17
        path.write_text(json.dumps(meta))
    code, _, err = run_cli(capsys, "sample", str(run), "--n", "5", "--out", str(tmp_path / "s.npy"))
    assert code == 2 and "does not match the model its config describes" in one_line(err, "sample")
    code, _, err = run_cli(capsys, "train", "--resume", "--out", str(run), "train.steps=30")
    assert code == 2 and "does not match the model" in one_line(err, "train")


@pytest.fixture(scope="module")
def diverged_run(tmp_path_factory):
    """A run whose weights are NaN (as after an update with an infinite learning rate)."""
    path = tmp_path_factory.mktemp("ux") / "diverged"
    run = build_run(load_config("checkerboard", TINY), path)
    with torch.no_grad():
        for p in [*run.model.parameters(), *run.ema.parameters()]:
            p.fill_(float("nan"))
    path.mkdir(parents=True)
    save(run)
    return path


def test_diverged_run_sample_and_likelihood_are_one_line(diverged_run, tmp_path, capsys):
    out = tmp_path / "s.npy"
    code, _, err = run_cli(
        capsys, "sample", str(diverged_run), "--n", "8", "--steps", "5", "--out", str(out)
    )
    assert code == 2 and "weights are not finite" in one_line(err, "sample")
    assert not out.exists() and not out.with_suffix(".png").exists()
    for method in ("ode", "elbo"):
        argv = ["likelihood", str(diverged_run), "--method", method, "--n", "10"]
        code, _, err = run_cli(capsys, *argv)
        assert code == 2 and "the run diverged" in one_line(err, "likelihood")


def test_non_finite_samples_are_refused(run_dir):
    def broken(config, model, schedule):  # a score that blows up, as an unstable sampler would
        return lambda x, t: x * float("nan")

    with pytest.raises(ValueError, match="8 of 8 samples are not finite"):
        sample_run(run_dir, n=8, steps=5, guide=broken)


def test_impossible_model_is_one_line_and_leaves_no_folder(tmp_path, capsys):
    out = tmp_path / "big"
    code, _, err = run_cli(
        capsys, "train", "checkerboard", *TINY, "model.width=10000000000", "--out", str(out)
    )
    assert code == 2 and "cannot allocate the model" in one_line(err, "train")
    assert not out.exists()


def test_ctrl_c_in_sample_is_one_line_exit_130(run_dir, tmp_path, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli_sample, "sample_run", interrupted)
    code, _, err = run_cli(
        capsys, "sample", str(run_dir), "--n", "5", "--out", str(tmp_path / "s.npy")
    )
    assert (
        code == 130
        and err.strip() == "sdelab sample: interrupted (Ctrl-C); nothing more was written"
    )


@pytest.mark.skipif(not SDELAB.exists(), reason="the sdelab script is not installed")
def test_sigint_during_sampling_exits_130_in_one_line(run_dir, tmp_path):
    out = tmp_path / "s.npy"
    proc = subprocess.Popen(
        [
            str(SDELAB),
            "sample",
            str(run_dir),
            "--n",
            "50000",
            "--steps",
            "5000",  # a long job: the signal cannot miss it on a loaded machine
            "--out",
            str(out),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    line = proc.stderr.readline()  # the first progress line: sampling is under way
    assert line.startswith("sample: "), line
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130
    assert (
        err.strip().splitlines()[-1]
        == "sdelab sample: interrupted (Ctrl-C); nothing more was written"
    )
    assert "Traceback" not in err and not out.exists()


# ---- 8. advice that can be followed ------------------------------------------------------------
def test_non_finite_loss_advice_works(run_dir, tmp_path, capsys):
    run = _copy(run_dir, tmp_path / "run")
    argv = [
        "train",
        "--resume",
        "--out",
        str(run),
        "train.steps=40",
        "optim.lr=1e8",
        "optim.grad_clip=null",
    ]
    code, _, err = run_cli(capsys, *argv)
    line = one_line(err, "train")
    assert code == 2 and "step_00000020.json is kept" in line
    advice = line.split("clip: ", 1)[1]
    assert advice.startswith(
        f"sdelab train --resume --out {run} optim.lr=1e+07 or optim.grad_clip=1"
    )
    # what it says: resume with a lower learning rate (or a clip) -- both may change on resume
    code, out, err = run_cli(
        capsys,
        "train",
        "--resume",
        "--out",
        str(run),
        "train.steps=40",
        "optim.lr=1e-3",
        "optim.grad_clip=1",
    )
    assert code == 0 and "trained to step 40" in out, err
    assert "train.steps 20 -> 40" in out  # from the last good checkpoint's config
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    resumed = [r for r in rows if r["step"] > 20]
    assert resumed and all(0 < r["lr"] <= 1e-3 and np.isfinite(r["loss"]) for r in resumed)


# ---- 9. no silent acceptance -------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "extra", "needle"),
    [
        (
            "train:\n  steps: 5\n  steps: 7\n",
            [],
            "line 3, column 3: duplicate key 'steps' (first at line 2)",
        ),
        ("train:\n  steps: [1, 2\n", [], "not valid YAML (line 3, column 1:"),
        (
            "eval:\n  options: {n_evl: 10}\n",
            [],
            "unknown eval.options n_evl: valid are n_eval, tol",
        ),
        ("{}\n", ["eval.options.tol=-1"], "eval.options.tol must be > 0"),
    ],
)
def test_config_mistakes_are_named(tmp_path, capsys, text, extra, needle):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    code, _, err = run_cli(capsys, "train", str(path), *extra, "--dry-run")
    assert code == 2 and needle in one_line(err, "train")


# ---- 10. progress --------------------------------------------------------------------------------
def test_progress_lines_without_a_terminal(monkeypatch):
    monkeypatch.setattr(Progress, "MIN_S", 0.0)
    stream = StringIO()
    with Progress(50, "train", "steps", stream=stream, tty=False) as bar:
        for _ in range(50):
            bar.update(1, loss=0.5)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 9  # every tenth of the work, the end excluded (the command reports it)
    assert (
        lines[0].startswith("train: 5/50 steps (10%), 0:00 elapsed, ETA ")
        and "loss 0.5" in lines[0]
    )
    quiet = StringIO()  # short work is quiet without a terminal
    monkeypatch.setattr(Progress, "MIN_S", 60.0)
    with Progress(50, "train", "steps", stream=quiet, tty=False) as bar:
        bar.update(50)
    assert quiet.getvalue() == ""


def test_train_sample_likelihood_report_progress(run_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(Progress, "MIN_S", 0.0)
    code, _, err = run_cli(capsys, "train", "checkerboard", *TINY, "--out", str(tmp_path / "r"))
    assert code == 0 and "train: 10/20 steps (50%)" in err and "ETA" in err and "loss" in err
    code, _, err = run_cli(
        capsys,
        "sample",
        str(run_dir),
        "--n",
        "10",
        "--steps",
        "20",
        "--out",
        str(tmp_path / "s.npy"),
    )
    assert code == 0 and "sample: " in err and "samples (" in err
    code, _, err = run_cli(
        capsys, "likelihood", str(run_dir), "--n", "40", "--batch-size", "4", "--tol", "1e-2"
    )
    assert code == 0 and "likelihood: 4/40 examples (10%)" in err


# ---- 11. expected things -----------------------------------------------------------------------
@pytest.mark.skipif(not SDELAB.exists(), reason="the sdelab script is not installed")
def test_version_and_module_entry_point():
    from sdelab import __version__

    for cmd in ([str(SDELAB)], [sys.executable, "-m", "sdelab"]):
        res = subprocess.run([*cmd, "--version"], capture_output=True, text=True, timeout=120)
        assert res.returncode == 0 and res.stdout.strip() == f"sdelab {__version__}"


@pytest.mark.parametrize(
    "command",
    ["demo", "train", "sample", "likelihood", "plot", "inpaint", "colorize", "train-classifier"],
)
def test_every_help_has_examples(capsys, command):
    code, out, _ = run_cli(capsys, command, "--help")
    assert code == 0 and "example" in out and f"sdelab {command}" in out.split("example", 1)[1]


def test_sample_ode_default_steps_suit_the_sampler(run_dir, tmp_path, capsys):
    code, out, err = run_cli(
        capsys,
        "sample",
        str(run_dir),
        "--sampler",
        "ode",
        "--n",
        "10",
        "--out",
        str(tmp_path / "s.npy"),
    )
    assert code == 0, err
    assert "100 steps, NFE 400" in out  # RK4: 4 evaluations per step, 100 steps


# ---- 13. plots ---------------------------------------------------------------------------------
def test_image_grids_are_upscaled_by_nearest_neighbour(tmp_path):
    from PIL import Image

    levels = torch.randint(0, 17, (4, 1, 8, 8), generator=torch.Generator().manual_seed(0))
    path = save_level_grid(levels, 17, tmp_path / "g.png")
    grid = np.asarray(Image.open(path))
    assert grid.shape == (2 * 65 + 1, 2 * 65 + 1)  # 8×8 tiles at ×8, 1-pixel borders
    tile = grid[1:65, 1:65]
    expected = np.round(levels[0, 0].numpy() * 255 / 16).astype(np.uint8)
    assert (tile == np.kron(expected, np.ones((8, 8), np.uint8))).all()  # exact blocks
    # the lines between tiles are grey: a gap on black (digits) and white backgrounds alike
    assert (grid[65, :] == 128).all() and (grid[:, 65] == 128).all() and (grid[0, :] == 128).all()
    rgb = save_png_grid([torch.zeros(2, 3, 32, 32)], tmp_path / "r.png")
    assert Image.open(rgb).size == (2 * 65 + 1, 65 + 1)  # 32 px tiles: ×2
    native = save_level_grid(levels, 17, tmp_path / "n.png", scale=1)
    assert Image.open(native).size == (19, 19)


def test_grayscale_sample_strip_is_drawn_in_grey(tmp_path):
    """plots/samples_during_training.png shows one-channel grids in grey, not a colour map:
    every pixel of the figure has R = G = B."""
    from PIL import Image

    from sdelab.plots import plot_sample_strip

    g = torch.Generator().manual_seed(0)
    grids = [
        save_level_grid(torch.randint(0, 17, (4, 1, 8, 8), generator=g), 17, tmp_path / f"{i}.png")
        for i in range(2)
    ]
    rgb = np.asarray(Image.open(plot_sample_strip(grids, tmp_path / "strip.png")).convert("RGB"))
    assert (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all()


def test_loss_smoothing_window_scales_with_the_run():
    assert smoothing_window(3) == 1
    assert smoothing_window(20) == 5
    assert smoothing_window(1000) == 100 and smoothing_window(10_000) == 1000


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("scale", [1e-3, 1.0, 1e4])
def test_sample_plot_titles_are_not_clipped(seed, scale):
    x = scale * torch.randn(100, 2, generator=torch.Generator().manual_seed(seed))
    title = "samples (euler-maruyama, NFE 1000)"
    fig = samples_figure(x, x, ("test data", title))
    fig.canvas.draw()  # the layout is made when drawn, as when saved
    renderer = fig.canvas.get_renderer()
    box = fig.bbox
    for ax in fig.axes:
        t = ax.title.get_window_extent(renderer)
        assert box.x0 <= t.x0 and t.x1 <= box.x1 and t.y1 <= box.y1, (ax.title.get_text(), t, box)


# ---- 12. what the README promises --------------------------------------------------------------
def test_metrics_right_after_import_sdelab():
    code = (
        "import sdelab, torch; "
        "print(sdelab.metrics.gaussian_w2(torch.randn(50, 2), torch.zeros(2), torch.eye(2)) >= 0)"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "True", res.stderr


def test_vp_default_t_min_is_what_the_docs_say():
    import sdelab

    notation = (Path(__file__).parents[1] / "docs" / "concepts" / "notation.md").read_text()
    (row,) = [ln for ln in notation.splitlines() if ln.startswith("| `VPSchedule`")]
    assert "t_min = 1e-5" in row
    assert sdelab.make_schedule("vp").t_min == 1e-5
    assert load_config("checkerboard").sde.kwargs["t_min"] == 1e-3  # the toy configs' choice


def test_demo_refuses_a_folder_it_did_not_write(tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    code, _, err = run_cli(capsys, "demo", "--out", str(mine))
    assert code == 2 and "holds files the demo did not write" in one_line(err, "demo")
    assert (mine / "notes.txt").read_text() == "keep"
