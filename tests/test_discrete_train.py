"""Training with loss.objective ddpm / smld, samples while training, memory at start and
checkpoints every N epochs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sdelab.cli import main
from sdelab.discrete import DiscreteScoreModel, chain_loss
from sdelab.likelihood import log_likelihood
from sdelab.likelihood.options import Exact
from sdelab.samplers import sample
from sdelab.train.build import build_run, load_run, resolve_config
from sdelab.train.checkpoint import list_checkpoints
from sdelab.train.config import ConfigError, load_config
from sdelab.train.loop import train, train_step
from sdelab.train.memory import measure_step
from sdelab.train.periodic import draw_samples, sample_paths

TINY = [
    "model.width=32",
    "model.depth=2",
    "model.embedding_dim=16",
    "train.batch_size=64",
    "train.log_every=1",
]
DDPM = ["loss.objective=ddpm", "sde.name=vp", "loss.discrete_steps=100"]
SMLD = [
    "loss.objective=smld",
    "sde.name=ve",
    "sde.kwargs={}",
    "sde.kwargs.sigma_max=5",
    "loss.discrete_steps=50",
]


def tiny(*overrides: str, name: str = "oracle"):
    return load_config(name, [*TINY, *overrides])


@pytest.mark.parametrize("objective", [DDPM, SMLD])
def test_discrete_run_trains_loads_and_samples_every_way(tmp_path, objective, capsys):
    """The loss falls on Gaussian data; load_run gives the continuous view; the exact chain,
    a continuous sampler and the ODE likelihood all run on it; sample_every writes the same
    seed's grids."""
    cfg = tiny(
        *objective,
        "train.steps=120",
        "optim.lr=3e-3",
        "train.sample_every=60",
        "eval.sampler=chain",
        "eval.n_samples=16",
    )
    run0 = build_run(resolve_config(cfg), tmp_path / "init")
    train(cfg, tmp_path / "run")
    assert "parameters; one step at train.batch_size=64" in capsys.readouterr().out
    config, model, schedule = load_run(tmp_path / "run")
    assert isinstance(model, DiscreteScoreModel) and model.chain.n == cfg.loss.discrete_steps
    g = torch.Generator().manual_seed(5)
    x0 = run0.dataset.sample(4000, g)
    steps = torch.randint(0, model.chain.n, (4000,), generator=g)
    noise = torch.randn(x0.shape, generator=g)

    def loss(net):
        with torch.no_grad():
            return float(chain_loss(net, model.chain, x0, steps=steps, noise=noise).loss.mean())

    assert loss(model.net) < loss(run0.model.net)
    # samples while training: .npy and a scatter per sample_every, and at the last step
    files = sorted(p.name for p in (tmp_path / "run" / "samples").iterdir())
    assert files == [f"step_{s:08d}.{e}" for s in (60, 120) for e in ("npy", "png")]
    a = np.load(tmp_path / "run" / "samples" / "step_00000120.npy")
    assert a.shape == (16, 2) and np.isfinite(a).all()
    # the exact chain with the fixed seed of the loop reproduces the saved samples
    redo = draw_samples(model, config, 16, torch.Generator().manual_seed(0), "cpu")
    assert redo.shape == (16, 2) and torch.isfinite(redo).all()
    # the continuous view: any sampler, and the ODE likelihood
    res = sample(model, schedule, (32, 2), sampler="pc", steps=50, generator=0)
    assert torch.isfinite(res.samples).all()
    ll = log_likelihood(model, schedule, x0[:8], divergence=Exact())
    assert torch.isfinite(ll.nll).all()


def test_discrete_grad_accum_takes_the_same_step(tmp_path):
    cfg = resolve_config(tiny(*DDPM, "train.memory_check=false"))
    accum = cfg.model_copy(update={"train": cfg.train.model_copy(update={"grad_accum": 4})})
    one, four = build_run(cfg, tmp_path / "a"), build_run(accum, tmp_path / "b")
    l1, l4 = train_step(one), train_step(four)
    assert abs(l1.loss - l4.loss) < 1e-5
    for p, q in zip(one.model.parameters(), four.model.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["loss.objective=ddpm", "sde.name=ve", "sde.kwargs={}"], "sde.name=vp"),
        (["loss.objective=smld", "sde.name=vp"], "sde.name=ve"),
        ([*DDPM, "loss.weighting=likelihood"], "loss.weighting=likelihood has no meaning"),
        ([*DDPM, "loss.discrete_steps=20"], "more than 20 steps"),
        (["eval.sampler=heun"], "unknown eval.sampler 'heun'"),
        (["eval.sampler=chain"], "eval.sampler=chain is the exact chain"),
    ],
)
def test_discrete_config_errors_name_the_fix(overrides, match):
    with pytest.raises(ConfigError, match=match):
        tiny(*overrides)


def test_memory_check_reports_refuses_and_changes_nothing(tmp_path):
    cfg = tiny("train.steps=3")
    run = build_run(resolve_config(cfg), tmp_path / "m")
    before = [p.clone() for p in run.model.parameters()]
    state = run.loss_gen.get_state()
    report = measure_step(run, train_step)
    assert report.params == sum(p.numel() for p in run.model.parameters())
    assert report.peak_bytes >= 0 and run.step == 0
    assert all(torch.equal(p, q) for p, q in zip(before, run.model.parameters()))
    assert torch.equal(run.loss_gen.get_state(), state)
    # a fake limit far below any step's need: refused in one line, before any file is written
    with pytest.raises(ConfigError, match=r"train\.batch_size=64 .* train\.grad_accum") as e:
        train(tiny("train.steps=3", "train.memory_limit_mb=1e-9"), tmp_path / "refused")
    assert "\n" not in str(e.value)
    assert not list_checkpoints(tmp_path / "refused")
    # with and without the check, training is the same
    train(tiny("train.steps=3"), tmp_path / "on")
    train(tiny("train.steps=3", "train.memory_check=false"), tmp_path / "off")
    _, on, _ = load_run(tmp_path / "on", "raw")
    _, off, _ = load_run(tmp_path / "off", "raw")
    assert all(torch.equal(p, q) for p, q in zip(on.parameters(), off.parameters()))


def test_ckpt_every_epochs(tmp_path):
    rows = np.random.default_rng(0).normal(size=(110, 2)).astype(np.float32)
    path = tmp_path / "data.npy"
    np.save(path, rows)
    # 100 training rows (10 % held out), batch 20: one epoch = 5 steps
    cfg = load_config(
        "oracle",
        [
            *TINY,
            "data.name=array",
            f"data.path={path}",
            "data.options.test_fraction=0.0909",
            "train.batch_size=20",
            "train.steps=12",
            "train.ckpt_every=1000",
            "train.keep_last=10",
            "train.ckpt_every_epochs=1",
        ],
    )
    train(cfg, tmp_path / "run")
    assert [s for s, _ in list_checkpoints(tmp_path / "run")] == [5, 10, 12]
    with pytest.raises(ConfigError, match="has no epochs"):
        train(tiny("train.ckpt_every_epochs=1", "train.steps=2"), tmp_path / "toy")


def test_sample_paths_sorted(tmp_path):
    (tmp_path / "samples").mkdir()
    for s in (30, 5, 100):
        (tmp_path / "samples" / f"step_{s:08d}.png").write_bytes(b"")
    assert [p.name for p in sample_paths(tmp_path)] == [
        "step_00000005.png",
        "step_00000030.png",
        "step_00000100.png",
    ]


def test_tutorial_folder64_is_seed_002_and_runs_on_a_tiny_folder(tmp_path):
    """The config holds the seed's settings; a few steps on 12 generated RGB images write a
    checkpoint every epoch, the PC samples of the seed's sampler while training, and a strip."""
    from PIL import Image

    from sdelab.runs import plot_run

    rng = np.random.default_rng(0)
    root = tmp_path / "images"
    root.mkdir()
    for i in range(12):
        arr = rng.integers(0, 256, size=(20, 24, 3), dtype=np.uint8)
        Image.fromarray(arr).save(root / f"{i:02d}.png")
    full = load_config("images/tutorial_folder64", [f"data.options.root={root}"])
    assert full.sde.name == "tutorial" and full.sde.kwargs["s"] == 391
    assert full.model.image_shape == [3, 64, 64] and full.train.ckpt_every_epochs == 20
    assert full.eval.sampler == "pc" and full.eval.steps == 1000
    assert full.eval.sampler_options["snr"] == 0.075
    small = [
        f"data.options.root={root}",
        "data.options.size=8",
        "model.base_channels=8",
        "model.channel_mults=[1, 2]",
        "model.num_groups=4",
        "model.embedding_dim=16",
        "train.batch_size=4",  # 12 images: an epoch is 3 steps
        "train.steps=7",
        "train.ckpt_every_epochs=1",
        "train.sample_every=3",
        "eval.steps=4",
        "eval.n_samples=4",
    ]
    train(load_config("images/tutorial_folder64", small), tmp_path / "run")
    assert [s for s, _ in list_checkpoints(tmp_path / "run")] == [3, 6, 7]
    grids = sample_paths(tmp_path / "run")
    assert [p.stem for p in grids] == ["step_00000003", "step_00000006", "step_00000007"]
    x = np.load(grids[-1].with_suffix(".npy"))
    assert x.shape == (4, 3, 8, 8) and np.isfinite(x).all()
    (strip,) = plot_run(tmp_path / "run")
    assert strip.name == "samples_during_training.png" and strip.stat().st_size > 1000
    with pytest.raises(ConfigError, match="unknown eval.sampler_options snrr"):
        load_config("images/tutorial_folder64", [*small, "eval.sampler_options.snrr=1"])


def test_seed_001_configs_and_their_fashion_twins():
    """The three configs by name with the seed's SDE, objective, N and sampler; each
    Fashion-MNIST twin keeps those and only shrinks the network and the run."""
    expect = {
        "vpsde_discrete": ("vp", "ddpm", "chain", {}),
        "vpsde_continuous": ("vp", "dsm", "euler_maruyama", {}),
        "subvpsde": ("subvp", "dsm", "pc", {"snr": 0.16}),
    }
    for name, (sde, objective, sampler, opts) in expect.items():
        full = load_config(f"images/score_sde_{name}", ["data.options.root=/nonexistent"])
        twin = load_config(f"images/fashion_{name}")
        for cfg in (full, twin):
            assert (cfg.sde.name, cfg.loss.objective, cfg.eval.sampler) == (sde, objective, sampler)
            assert cfg.sde.kwargs["beta_min"] == 0.1 and cfg.sde.kwargs["beta_max"] == 20
            assert cfg.eval.steps == 1000 and cfg.loss.discrete_steps == 1000
            assert opts.items() <= cfg.eval.sampler_options.items()
        assert full.model.image_shape == [1, 32, 32] and full.train.batch_size == 128
        assert full.model.base_channels == 128 and full.model.channel_mults == [1, 2, 2, 2]
        assert twin.data.name == "fashion_mnist" and twin.model.base_channels == 16


def test_likelihood_vlb_of_a_ddpm_run_is_its_discrete_bound(tmp_path, capsys):
    """`sdelab likelihood RUN --method vlb` on a DDPM run evaluates DDPM's own L_vlb: the sum of
    its terms, and the m-term estimate agrees with the all-terms value within 5 SE."""
    from sdelab.runs import run_vlb

    run = tmp_path / "ddpm"
    img = ["model.base_channels=8", "model.channel_mults=[1,2]", "model.num_groups=4",
           "model.mid_attention=false", "train.steps=3", "train.batch_size=16",
           "train.ckpt_every=3", "loss.discrete_steps=30", "loss.weighting=score-matching",
           "loss.time_sampling=uniform"]  # fmt: skip
    assert main(["train", "images/digits", "loss.objective=ddpm", *img, "--out", str(run)]) == 0
    full = run_vlb(run, n=16, batch_size=8, progress=False)
    terms = full.terms
    torch.testing.assert_close(terms["total"], terms["prior"] + terms["diffusion"]
                               + terms["reconstruction"])  # fmt: skip
    assert full.bound == "ddpm" and bool((terms["total"] > 0).all())
    est = run_vlb(run, n=16, batch_size=8, steps=5, progress=False)
    (a, _), (b, se) = full.mean_se("total"), est.mean_se("total")
    assert abs(a - b) < 5 * se
    capsys.readouterr()
    assert main(["likelihood", str(run), "--method", "vlb", "--n", "8"]) == 0
    assert "DDPM's bound" in capsys.readouterr().out
