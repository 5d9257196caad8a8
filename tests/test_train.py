"""Training loop, EMA, checkpoints, kill-and-resume, signals, non-finite loss, load_run."""

from __future__ import annotations

import itertools
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sdelab.data import make_dataset
from sdelab.losses import dsm_loss, sample_time
from sdelab.nets.mlp import MLP
from sdelab.parametrization import KINDS, ScoreModel
from sdelab.sde import make_schedule
from sdelab.train import build, objectives
from sdelab.train.build import build_model, build_run, load_run, resolve_config
from sdelab.train.checkpoint import (
    CheckpointError,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from sdelab.train.config import ConfigError, load_config
from sdelab.train.loop import (
    EvalContext,
    TrainingError,
    ema_decay_at,
    lr_at,
    train,
    train_step,
    update_ema,
)
from sdelab.train.rundir import restore, save

TINY = [
    "model.width=32",
    "model.depth=2",
    "model.embedding_dim=16",
    "train.batch_size=64",
    "train.log_every=1",
    "optim.warmup_steps=0",
]


def tiny(*overrides: str, name: str = "oracle"):
    return load_config(name, [*TINY, *overrides])


def read_metrics(run_dir: Path, name: str = "metrics.jsonl") -> list[dict]:
    return [json.loads(line) for line in (run_dir / name).read_text().splitlines()]


# ---- model -----------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("embedding", ["sinusoidal", "fourier"])
def test_mlp_every_output_kind(kind, embedding):
    cfg = tiny(f"loss.parametrization={kind}", f"model.embedding={embedding}")
    cfg = resolve_config(cfg)
    sde = make_schedule("vp")
    model = build_model(cfg, sde)
    assert isinstance(model, ScoreModel) and model.parametrization == kind
    x, t = torch.randn(5, 2), torch.rand(5) * 0.9 + 0.05
    assert model(x, t).shape == (5, 2)
    for other in KINDS:  # every kind is a consistent conversion of the same prediction
        back = model.predict(x, t, other)
        assert back.shape == (5, 2) and torch.isfinite(back).all()
    torch.testing.assert_close(model.predict(x, t, kind), model.net(x, t))


def test_mlp_uses_time_and_rejects_bad_args():
    net = MLP(3, width=16, depth=2, embedding_dim=8)
    x = torch.randn(4, 3)
    assert not torch.allclose(net(x, torch.full((4,), 0.1)), net(x, torch.full((4,), 0.9)))
    with pytest.raises(ValueError, match="unknown time embedding 'rope'"):
        MLP(2, embedding="rope")
    with pytest.raises(ValueError, match="model.dim is unset"):
        build_model(tiny(), make_schedule("vp"))


def test_cosine_lr_decays_from_peak_to_floor():
    cfg = tiny(
        "optim.warmup_steps=2", "optim.lr=1.0", "optim.schedule=cosine", "optim.min_lr_ratio=0.1"
    ).optim
    lrs = [lr_at(cfg, s, 10) for s in range(10)]
    assert lrs[:2] == [0.5, 1.0]  # warm-up, then the peak at the end of the warm-up
    assert all(a > b for a, b in itertools.pairwise(lrs[1:]))  # strictly decreasing
    assert math.isclose(lrs[-1], 0.1)  # the floor at the last update
    mid = lr_at(cfg, 5, 10)  # halfway through the decay: the mean of peak and floor
    assert math.isclose(mid, 0.55)
    with pytest.raises(ValueError, match="total number of steps"):
        lr_at(cfg, 3)


def test_lr_warmup_and_ema():
    cfg = tiny("optim.warmup_steps=4", "optim.lr=1.0").optim
    assert [lr_at(cfg, s) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    old = a.weight.detach().clone()
    update_ema(a, b, 0.9)
    torch.testing.assert_close(a.weight, 0.9 * old + 0.1 * b.weight)
    update_ema(a, b, 0.0)
    assert torch.equal(a.weight, b.weight)
    assert [ema_decay_at(0.999, s) for s in (1, 90)] == [2 / 11, 0.91]
    assert ema_decay_at(0.999, 10**6) == 0.999 and ema_decay_at(0.0, 5) == 0.0


# ---- training --------------------------------------------------------------------------------
def test_short_run_on_gaussian_data_approaches_the_oracle(tmp_path):
    """A few hundred steps bring the DSM loss most of the way from its initial value to the
    loss of the exact score (the oracle's minimum), on fixed held-out (x0, t, ε)."""
    cfg = tiny("train.steps=300", "optim.lr=3e-3", "train.ema_decay=0.9", "train.log_every=50")
    run0 = build_run(resolve_config(cfg), tmp_path / "init")
    result = train(cfg, tmp_path / "run")
    assert result.step == 300
    _, ema, sde = load_run(tmp_path / "run", "ema")
    _, raw, _ = load_run(tmp_path / "run", "raw")
    assert not torch.equal(ema.net.out.weight, raw.net.out.weight)
    data = make_dataset("oracle")
    g = torch.Generator().manual_seed(99)
    x0 = data.sample(4000, g)
    ts = sample_time(sde, 4000, generator=g)
    noise = torch.randn(x0.shape, generator=g)

    def loss(fn, kind):
        with torch.no_grad():
            return float(
                dsm_loss(fn, sde, x0, parametrization=kind, time=ts, noise=noise).loss.mean()
            )

    initial, trained = loss(run0.model.net, "eps"), loss(ema.net, "eps")
    best = loss(data.gaussian.score_fn(sde), "score")
    assert trained < initial
    assert trained - best < 0.3 * (initial - best), (initial, trained, best)
    rows = read_metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == [50, 100, 150, 200, 250, 300]
    assert set(rows[0]) == {"step", "loss", "grad_norm", "lr", "steps_per_s"}
    assert (tmp_path / "run" / "loss.png").stat().st_size > 1000
    saved = load_config(tmp_path / "run" / "config.yaml")
    assert saved.model.dim == 2 and saved.train.steps == 300


def test_eval_hook_sees_ema_and_test_set_and_changes_nothing(tmp_path):
    calls = []

    def hook(ctx: EvalContext):
        calls.append(ctx.step)
        assert ctx.model is not ctx.raw_model and not ctx.model.training
        assert ctx.test_data.shape == (100, 2)
        torch.randn(3)  # global RNG use must not matter
        noise = torch.randn(ctx.test_data.shape, generator=ctx.generator)
        return {"score_norm": ctx.model(ctx.test_data + noise, 0.5).norm(dim=1).mean()}

    over = ("train.steps=12", "train.eval_every=5", "eval.n_test=100")
    train(tiny(*over), tmp_path / "a", eval_hook=hook)
    train(tiny(*over), tmp_path / "b")
    assert calls == [5, 10, 12]
    evals = read_metrics(tmp_path / "a", "eval.jsonl")
    assert [r["step"] for r in evals] == [5, 10, 12] and all("score_norm" in r for r in evals)
    # evaluating (with its own generator) leaves training untouched, bit for bit
    assert [r["loss"] for r in read_metrics(tmp_path / "a")] == [
        r["loss"] for r in read_metrics(tmp_path / "b")
    ]


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        out = dsm_loss(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 26:
            out.loss[3] = float("nan")
        return out

    monkeypatch.setattr(objectives, "dsm_loss", poisoned)
    run_dir = tmp_path / "run"
    with pytest.raises(TrainingError) as info:
        # no trial step of the memory check: the poisoned call is counted from step 1
        train(tiny("train.steps=100", "train.ckpt_every=10", "train.memory_check=false"), run_dir)
    msg = str(info.value)
    assert "loss is nan at step 26" in msg and "step_00000020.json is kept" in msg
    assert "optim.lr" in msg and "\n" not in msg
    assert [s for s, _ in list_checkpoints(run_dir)][-1] == 20
    assert load_checkpoint(run_dir).step == 20  # intact and loadable
    assert read_metrics(run_dir)[-1]["step"] == 25


def test_resume_in_process_matches_and_config_must_agree(tmp_path):
    cfg = tiny("train.steps=30", "train.ckpt_every=10")
    train(cfg, tmp_path / "ref")
    train(tiny("train.steps=20", "train.ckpt_every=10"), tmp_path / "part")
    train(cfg, tmp_path / "part", resume=True)  # extending train.steps is allowed
    assert read_metrics(tmp_path / "ref") == [
        {**r, "steps_per_s": ref["steps_per_s"]}
        for r, ref in zip(read_metrics(tmp_path / "part"), read_metrics(tmp_path / "ref"))
    ]
    with pytest.raises(
        ConfigError, match=r"different config: optim.eps \(saved 1e-08, given 0.5\)"
    ):
        train(tiny("train.steps=30", "optim.eps=0.5"), tmp_path / "part", resume=True)
    with pytest.raises(ConfigError, match="is not empty: pass --resume"):
        train(cfg, tmp_path / "part")


def test_tensorboard_missing_is_a_clear_error(tmp_path):
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("tensorboard is installed")
    with pytest.raises(ConfigError, match=r"pip install 'sdelab\[tensorboard\]'"):
        train(tiny("train.tensorboard=true"), tmp_path / "run")
    assert not (tmp_path / "run").exists()


# ---- checkpoints -----------------------------------------------------------------------------
def test_checkpoint_round_trip_keep_last_and_half_written_files(tmp_path):
    run = build_run(resolve_config(tiny("train.keep_last=2")), tmp_path)
    for _ in range(3):
        train_step(run)
        save(run)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2, 3]  # keep_last
    ckdir = tmp_path / "checkpoints"
    # a kill mid-save leaves a hidden temp file and maybe tensors without their JSON
    (ckdir / ".step_00000004.json.tmp-999").write_text('{"format": "sdelab-chec')
    (ckdir / "step_00000004.safetensors").write_bytes(b"\x00" * 10)
    assert load_checkpoint(tmp_path).step == 3
    # restoring gives back weights, optimizer state and generator states bit for bit
    other = build_run(run.config, tmp_path)
    restore(other)
    assert other.step == 3
    for a, b in zip(run.model.state_dict().values(), other.model.state_dict().values()):
        assert torch.equal(a, b)
    assert torch.equal(run.data_gen.get_state(), other.data_gen.get_state())
    assert torch.equal(run.loss_gen.get_state(), other.loss_gen.get_state())
    assert train_step(run) == train_step(other)
    save(run)  # the next save cleans stray temp and orphan files
    assert sorted(p.name for p in ckdir.iterdir()) == [
        "step_00000003.json", "step_00000003.safetensors",
        "step_00000004.json", "step_00000004.safetensors",
    ]  # fmt: skip
    # the tensor file is plain safetensors and carries the config in its metadata
    tensors = load_file(ckdir / "step_00000004.safetensors")
    assert {"rng.data", "rng.loss"} <= set(tensors)
    assert any(k.startswith("optim.") for k in tensors) and any(
        k.startswith("ema.") for k in tensors
    )


@pytest.mark.parametrize("damage", ["flip", "truncate", "json"])
def test_corrupt_checkpoint_is_a_clear_error(tmp_path, damage):
    run = build_run(resolve_config(tiny()), tmp_path)
    path = save(run)
    tensors = path.with_suffix(".safetensors")
    if damage == "flip":
        blob = bytearray(tensors.read_bytes())
        blob[len(blob) // 2] ^= 0xFF
        tensors.write_bytes(bytes(blob))
    elif damage == "truncate":
        tensors.write_bytes(tensors.read_bytes()[:100])
    else:
        path.write_text(path.read_text()[:50])
    with pytest.raises(CheckpointError, match=r"step_00000000.json is corrupt .*: delete") as info:
        load_run(tmp_path)
    assert "\n" not in str(info.value)


def test_load_run_errors(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint in"):
        load_run(tmp_path)
    cfg = resolve_config(tiny())
    save_checkpoint(tmp_path, 0, {"x": torch.zeros(1)}, {}, config=cfg)
    with pytest.raises(ValueError, match="unknown weights 'best': choose one of ema, raw"):
        load_run(tmp_path, "best")
    with pytest.raises(CheckpointError, match="no checkpoint of step 5 .*choose one of 0"):
        load_run(tmp_path, step=5)


# ---- kill -9, SIGTERM: subprocess runs ------------------------------------------------------
STEPS = 400
SUB_ARGS = [*TINY, f"train.steps={STEPS}", "train.ckpt_every=25", "train.keep_last=2"]


def cli(run_dir: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "sdelab.cli",
        "train",
        "oracle",
        *SUB_ARGS,
        "--out",
        str(run_dir),
        *extra,
    ]


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def start(run_dir: Path) -> subprocess.Popen:
    return subprocess.Popen(
        cli(run_dir), env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def wait_for_steps(proc: subprocess.Popen, run_dir: Path, n: int, timeout: float = 120) -> None:
    metrics = run_dir / "metrics.jsonl"
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if metrics.exists() and metrics.read_text().count("\n") >= n:
            return
        assert proc.poll() is None, "the run ended before it could be interrupted"
        time.sleep(0.005)
    raise TimeoutError(f"fewer than {n} steps after {timeout} s")


def losses(run_dir: Path) -> list[tuple[int, float, float]]:
    return [(r["step"], r["loss"], r["grad_norm"]) for r in read_metrics(run_dir)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The uninterrupted run, in this process (one thread, as the subprocesses)."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    train(load_config("oracle", SUB_ARGS), run_dir)
    return run_dir


def resume_and_compare(run_dir: Path, reference: Path) -> None:
    out = subprocess.run(
        cli(run_dir, "--resume"), env=ENV, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    got, want = losses(run_dir), losses(reference)
    assert [s for s, *_ in got] == list(range(1, STEPS + 1))
    assert got == want  # exact equality on CPU
    a = load_file(run_dir / "checkpoints" / f"step_{STEPS:08d}.safetensors")
    b = load_file(reference / "checkpoints" / f"step_{STEPS:08d}.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_sigkill_at_a_random_step_then_resume_is_exact(tmp_path, reference):
    target = random.Random().randrange(40, STEPS - 100)
    run_dir = tmp_path / "run"
    proc = start(run_dir)
    try:
        wait_for_steps(proc, run_dir, target)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, f"killed at step ≈{target}"
    killed_at = len(read_metrics_lenient(run_dir))
    assert killed_at < STEPS
    resume_and_compare(run_dir, reference)


def read_metrics_lenient(run_dir: Path) -> list[str]:
    return [
        line for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.endswith("}")
    ]


def test_sigterm_saves_and_exits_cleanly_then_resume_is_exact(tmp_path, reference):
    run_dir = tmp_path / "run"
    proc = start(run_dir)
    try:
        wait_for_steps(proc, run_dir, 60)
        proc.send_signal(signal.SIGTERM)
    finally:
        _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    assert "Traceback" not in stderr
    line = stderr.strip().splitlines()[-1]
    assert line.startswith("sdelab train: stopped by SIGTERM after step ") and "--resume" in line
    step = int(line.split("after step ")[1].split(";")[0])
    assert load_checkpoint(run_dir).step == step  # saved at the step it stopped
    assert read_metrics(run_dir)[-1]["step"] == step
    resume_and_compare(run_dir, reference)


def test_mixed_precision_auto_follows_the_device(tmp_path, monkeypatch):
    """auto trains in bf16 exactly where the device computes it natively, else in fp32."""
    cpu = torch.device("cpu")
    monkeypatch.setattr(build, "native_bf16", lambda device: True)
    assert build.resolve_precision("auto", cpu) == "bf16"
    assert build_run(tiny("train.mixed_precision=auto"), tmp_path).precision == "bf16"
    monkeypatch.setattr(build, "native_bf16", lambda device: False)
    assert build.resolve_precision("auto", cpu) == "no"
    assert build_run(tiny("train.mixed_precision=auto"), tmp_path / "b").precision == "no"
    assert build.resolve_precision("bf16", cpu) == "bf16"  # explicit names pass through
    monkeypatch.undo()
    assert build.native_bf16(torch.device("meta")) is False
