"""VDM through the training loop (issue 8): the bound as objective, the learned schedule's
variance-minimising gradient, checkpoints of the schedule, ``sdelab likelihood --method vlb``."""

from __future__ import annotations

import math

import pytest
import torch

from cli_helpers import recorded, run_cli
from sdelab.cli import main
from sdelab.oracle import GaussianData
from sdelab.parametrization import score_fn_to_kind
from sdelab.runs import run_vlb
from sdelab.runs.core import open_run
from sdelab.sde import VDMLinearSchedule, make_schedule
from sdelab.train.build import build_run, load_run
from sdelab.train.checkpoint import load_checkpoint, prefixed
from sdelab.train.config import ConfigError, load_config
from sdelab.train.loop import train, train_step
from sdelab.train.rundir import restore
from sdelab.vdm import vdm_vlb

TOY = [
    "sde.kwargs.hidden=16",
    "model.width=32",
    "model.depth=2",
    "model.embedding_dim=16",
    "train.batch_size=128",
    "train.log_every=10",
    "optim.warmup_steps=0",
    "train.ema_decay=0.9",
]
DIGITS = [
    "model.base_channels=8",
    "model.channel_mults=[1]",
    "model.num_groups=4",
    "train.batch_size=16",
    "train.log_every=1",
    "optim.warmup_steps=0",
]


class _Fn(torch.nn.Module):
    def __init__(self, fn) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.fn(x, t)


def _mean_se(v: torch.Tensor) -> tuple[float, float]:
    return float(v.mean()), float(v.std() / math.sqrt(v.numel()))


def _test_vlb(model, schedule, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return vdm_vlb(model.eps, schedule, x, generator=torch.Generator().manual_seed(5)).total


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    """A tiny VDM on moons with the learned γ-network: 150 steps (~4 s)."""
    path = tmp_path_factory.mktemp("vdm") / "run"
    config = load_config("toy/vdm_moons", [*TOY, "train.steps=150", "train.ckpt_every=150"])
    initial = build_run(config, path / "unused")
    train(config, path)
    return path, initial


def test_training_lowers_the_vlb_and_keeps_gamma_monotone_with_exact_ends(toy_run):
    path, initial = toy_run
    config, model, schedule = load_run(path)
    x = initial.dataset.test_set(1000)
    before = _test_vlb(initial.model.eval(), initial.schedule, x)
    after = _test_vlb(model, schedule, x)
    (mb, sb), (ma, sa) = _mean_se(before), _mean_se(after)
    assert ma < mb - 4 * math.hypot(sa, sb), (mb, ma)  # the bound went down, beyond 4 SE
    # γ = −λ: exact end points, strictly increasing in between, and the shape was trained
    t = torch.linspace(0, 1, 1001)
    with torch.no_grad():
        gamma = -schedule.log_snr(t)
        slope = -schedule.d_log_snr(t)
    assert float(gamma[0]) == pytest.approx(-13.3, abs=1e-5)
    assert float(gamma[-1]) == pytest.approx(5.0, abs=1e-5)
    assert bool((gamma.diff() > 0).all()) and bool((slope > 0).all())
    fresh = make_schedule("vdm-learned", **config.sde.kwargs)
    moved = max(
        float((a - b).detach().abs().max())
        for a, b in zip(schedule.parameters(), fresh.parameters())
    )
    assert moved > 1e-3, "the variance gradient never reached the schedule"


def test_checkpoint_holds_the_schedule_and_resume_restores_it(toy_run, tmp_path):
    path, _ = toy_run
    ckpt = load_checkpoint(path)
    config, model, schedule = load_run(path)
    saved = prefixed(prefixed(ckpt.tensors, "ema"), "schedule")
    assert saved.keys() == {"w1", "b1", "w2", "b2", "w3"}
    for name, value in saved.items():  # load_run builds the schedule from the checkpoint
        torch.testing.assert_close(getattr(schedule, name), value, rtol=0, atol=0)
    assert model.schedule is schedule
    raw = prefixed(prefixed(ckpt.tensors, "model"), "schedule")
    assert any(not torch.equal(raw[k], saved[k]) for k in raw), "EMA must average the schedule"
    run = build_run(config, path)
    restore(run)
    for name, value in raw.items():
        torch.testing.assert_close(getattr(run.schedule, name), value, rtol=0, atol=0)
    # AdamW's weight decay leaves the schedule alone
    groups = run.optimizer.param_groups
    assert [g["weight_decay"] for g in groups][1] == 0.0
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in run.schedule.parameters()}
    # three steps + resume for three more == six uninterrupted, schedule included
    cfg = load_config("toy/vdm_moons", [*TOY, "train.steps=6", "train.ckpt_every=3"])
    train(cfg, tmp_path / "full")
    first = load_config("toy/vdm_moons", [*TOY, "train.steps=3", "train.ckpt_every=3"])
    train(first, tmp_path / "resumed")
    train(cfg, tmp_path / "resumed", resume=True)
    a, b = (load_checkpoint(tmp_path / d).tensors for d in ("full", "resumed"))
    for k in a:
        if k.startswith(("model.", "ema.")):
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


def test_grad_accumulation_takes_the_same_vdm_step(tmp_path):
    """2 micro-batches of the global batch == 1 batch: the variance gradient is a mean over
    examples, so it splits (denominator = the whole batch)."""
    base = [*TOY, "train.steps=3", "train.ckpt_every=3", "optim.grad_clip=null"]
    train(load_config("toy/vdm_moons", base), tmp_path / "one")
    train(load_config("toy/vdm_moons", [*base, "train.grad_accum=2"]), tmp_path / "two")
    a, b = (load_checkpoint(tmp_path / d).tensors for d in ("one", "two"))
    for k in a:
        if k.startswith("model."):
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-5, msg=k)


def test_loop_variance_gradient_lowers_the_loss_variance_with_the_oracle(tmp_path):
    """The existing oracle test, through ``train_step``: with the exact ε̂ (a function of the
    network's time input τ = normalised γ, as VDM conditions it) E[L] does not depend on γ's
    shape, so only the variance gradient moves it — it must keep E[L] (4 SE) and cut Var[L] by
    ≥ 20 % after 100 steps (both measured on the same 20 000 fresh draws)."""
    cfg = load_config(
        "toy/vdm_moons",
        [
            "data.name=oracle",
            "sde.kwargs.hidden=32",
            "optim.name=adam",
            "optim.lr=0.1",
            "optim.grad_clip=null",
            "optim.warmup_steps=0",
            "train.batch_size=256",
            "loss.low_discrepancy=false",
        ],
    )
    run = build_run(cfg, tmp_path)
    data: GaussianData = run.dataset.gaussian
    # ε̂(z, τ): γ = γ_min + (γ_max − γ_min) τ is VDMLinearSchedule's γ at time τ
    oracle = score_fn_to_kind(data.score_fn(VDMLinearSchedule()), VDMLinearSchedule(), "eps")
    run.model.net = run.ema.net = _Fn(oracle)  # no parameters: the schedule alone trains
    x = data.sample(20_000, generator=torch.Generator().manual_seed(1))

    def diffusion() -> torch.Tensor:
        with torch.no_grad():
            return vdm_vlb(
                run.model.eps, run.schedule, x, generator=torch.Generator().manual_seed(2)
            ).diffusion

    before = diffusion()
    for _ in range(100):
        train_step(run)
    after = diffusion()
    (mb, sb), (ma, sa) = _mean_se(before), _mean_se(after)
    assert abs(ma - mb) < 4 * math.hypot(sa, sb), (mb, ma)
    assert float(after.var()) < 0.8 * float(before.var()), (float(before.var()), after.var())


def test_vlb_command_on_a_trained_image_run(tmp_path, capsys):
    """Digits with the discretized decoder: bits/dim finite and positive (a bound on a
    probability mass), terms summing to the total; the JSON record and T steps too."""
    run = tmp_path / "digits"
    over = [*DIGITS, "train.steps=6", "train.ckpt_every=3", "train.keep_last=5"]
    assert main(["train", "images/vdm_digits", *over, "--out", str(run)]) == 0
    capsys.readouterr()
    # --checkpoint: the bound of that checkpoint, in a file of its own
    assert main(["likelihood", str(run), "--method", "vlb", "--n", "16", "--checkpoint", "3"]) == 0
    early = recorded(capsys.readouterr().out)
    assert early["checkpoint"] == 3 and list(run.glob("likelihood_vlb_vdm_continuous_*step3.json"))
    ref = run_vlb(open_run(run, step=3), n=16, progress=False)
    assert early["total_nats_mean"] == pytest.approx(float(ref.terms["total"].mean()), rel=1e-6)
    code = main(["likelihood", str(run), "--method", "vlb", "--steps", "50", "--n", "40"])
    out = capsys.readouterr().out
    assert code == 0 and "T = 50 steps, 17 levels" in out and "reconstruction" in out
    rec = recorded(out)
    assert rec["steps"] == 50 and rec["n"] == 40 and rec["bound"] == "vdm"
    assert "likelihood_vlb_vdm_T50_" in out  # T steps of VDM's bound
    assert math.isfinite(rec["total_bpd_mean"]) and rec["total_bpd_mean"] > 0
    parts = sum(rec[f"{k}_nats_mean"] for k in ("diffusion", "prior", "reconstruction"))
    assert parts == pytest.approx(rec["total_nats_mean"], rel=1e-6)
    res = run_vlb(run, n=40, progress=False)  # continuous time
    assert res.steps is None and res.levels == 17 and res.dims == 64
    total = res.terms["diffusion"] + res.terms["prior"] + res.terms["reconstruction"]
    torch.testing.assert_close(total, res.terms["total"])
    assert bool((res.terms["total"] > 0).all()) and bool((res.terms["reconstruction"] >= 0).all())


def test_vlb_command_errors(toy_run, tmp_path, capsys):
    path, _ = toy_run
    assert main(["likelihood", str(path), "--method", "ode", "--steps", "5"]) == 2
    assert "--steps" in capsys.readouterr().err
    code, _, err = run_cli(capsys, "likelihood", str(path), "--method", "vlb", "--steps=-1")
    assert code == 2 and "--steps: must be 0 or a positive integer" in err
    vp = tmp_path / "vp"
    tiny = ["model.width=16", "model.depth=1", "train.steps=2", "train.batch_size=8"]
    assert main(["train", "moons", *tiny, "--out", str(vp)]) == 0
    capsys.readouterr()
    assert main(["likelihood", str(vp), "--method", "vlb"]) == 2
    assert "needs a VDM schedule" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (["loss.objective=dsm", "loss.weighting=score-matching"], "only the VDM bound trains"),
        (["sde.name=vp", "sde.kwargs={}"], "set sde.name to one of vdm"),
        (["loss.weighting=score-matching"], "set loss.weighting=likelihood"),
        (["loss.time_sampling=importance"], "set loss.time_sampling=uniform"),
        (
            ["sde.name=vdm", "sde.kwargs={}", "loss.vlb_steps=10", "loss.time_sampling=importance"],
            "T-step loss draws its step uniformly",
        ),
        (
            ["sde.name=vdm", "sde.kwargs={}", "loss.objective=dsm", "loss.vlb_steps=5"],
            "loss.vlb_steps needs loss.objective=vdm",
        ),
        (["loss.objective=bogus"], "loss.objective"),
    ],
)
def test_bad_vdm_configs_are_config_errors(overrides, needle):
    with pytest.raises(ConfigError, match=needle):
        load_config("toy/vdm_moons", overrides)


def test_vdm_on_images_needs_the_centred_range():
    with pytest.raises(ConfigError, match=r"data_range=\[-1,1\]"):
        load_config("images/vdm_digits", ["data.options.data_range=[0,1]"])
    ok = load_config("images/vdm_digits", ["sde.name=vdm", "loss.time_sampling=importance"])
    assert ok.loss.objective == "vdm"  # importance-sampled t is fine with a fixed schedule


@pytest.mark.slow  # two torchrun launches (~25 s here)
def test_two_processes_take_the_one_process_vdm_step(tmp_path):
    """DDP (2 gloo processes x 2 micro-batches) == 1 process: the network's gradients are
    averaged by DDP, the schedule's (outside the DDP module) by the loop's all-reduce."""
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    over = [*TOY, "train.steps=3", "train.ckpt_every=3", "optim.grad_clip=null"]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes=1",
        "--nproc_per_node=2",
        "--master_addr=127.0.0.1",
        f"--master_port={port}",
        "-m",
        "sdelab.cli",
        "train",
        "toy/vdm_moons",
        *over,
        "train.grad_accum=2",
        "--out",
        str(tmp_path / "two"),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    train(load_config("toy/vdm_moons", over), tmp_path / "one")
    a, b = (load_checkpoint(tmp_path / d).tensors for d in ("one", "two"))
    assert any(k.startswith("model.schedule.") for k in a)
    for k in a:
        if k.startswith(("model.", "ema.")):
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-5, msg=k)
