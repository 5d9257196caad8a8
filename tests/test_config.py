"""Typed run config: YAML round trip, built-ins, overrides, one-line rejections."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from sdelab.sde import SCHEDULES
from sdelab.train.config import (
    ConfigError,
    RunConfig,
    apply_overrides,
    builtin_configs,
    load_config,
    parse_scalar,
    resolve_config_path,
)
from sdelab.train.rundir import flat_config


def test_defaults_and_round_trip(tmp_path):
    cfg = load_config({}, ["optim.lr=3e-4", "sde.kwargs.beta_max=10", "optim.betas=[0.8, 0.9]"])
    assert cfg.optim.lr == 3e-4 and cfg.sde.kwargs == {"beta_max": 10.0}
    assert cfg.optim.betas == (0.8, 0.9)
    (tmp_path / "c.yaml").write_text(cfg.to_yaml())
    assert load_config(tmp_path / "c.yaml") == cfg
    assert RunConfig.from_dict(json.loads(cfg.to_json())) == cfg
    # every key is written out, so a saved config reproduces the run alone
    assert set(yaml.safe_load(cfg.to_yaml())) == {
        "data", "sde", "model", "loss", "optim", "train", "eval"
    }  # fmt: skip


def test_builtins_load_and_resolve():
    names = builtin_configs()
    for required in (
        "toy/checkerboard",
        "toy/8gaussians",
        "toy/swissroll",
        "toy/sdeflow_swissroll",
    ):
        assert required in names
    for name in names:
        load_config(name)
    assert load_config("checkerboard") == load_config("toy/checkerboard.yaml")
    assert load_config(resolve_config_path("checkerboard")).data.name == "checkerboard"
    sdeflow = load_config("sdeflow_swissroll")
    assert (sdeflow.sde.name, sdeflow.loss.parametrization) == ("vp", "drift")
    assert (sdeflow.loss.weighting, sdeflow.loss.time_sampling) == ("score-matching", "uniform")
    debias = load_config("sdeflow_swissroll_debias")
    assert (debias.loss.weighting, debias.loss.time_sampling) == ("likelihood", "importance")
    assert sdeflow.optim.name == "adam" and sdeflow.optim.grad_clip is None


def test_recipes_stack_the_techniques():
    """Each recipe of issue 32 differs from its data set's first-order baseline by exactly its
    technique; the GPU configs of both papers load with theirs."""

    def diff(a, b):
        return {
            k for k, v in flat_config(a.to_dict()).items() if flat_config(b.to_dict()).get(k) != v
        }

    for ds, base_name in (("digits", "images/digits"), ("fashion", "images/fashion_mnist_small")):
        base = load_config(f"recipes/{ds}_first_order")
        assert base == load_config(base_name)
        high = load_config(f"recipes/{ds}_high_order")
        # a second stage from a first-order run (Lu et al.): a constant lr 2e-4, fewer steps
        assert diff(high, base) == {
            "loss.score_matching_order",
            "optim.lr",
            "optim.schedule",
            "optim.warmup_steps",
            "train.steps",
        }
        assert (high.optim.lr, high.optim.schedule, high.train.init_from) == (2e-4, "constant", None)
        assert high.train.steps < base.train.steps
        vel = load_config(f"recipes/{ds}_velocity")
        assert diff(vel, base) == {"loss.time_sampling"}
        assert vel.loss.time_sampling == "importance-velocity"
        flips = load_config(f"recipes/{ds}_velocity_flips")
        assert diff(flips, vel) == {"data.options.hflip"}
        fine = load_config(f"recipes/{ds}_velocity_finetune")
        assert (fine.model, fine.sde, fine.loss.parametrization) == (
            vel.model,
            vel.sde,
            vel.loss.parametrization,
        )
        assert (fine.loss.score_matching_order, fine.loss.second_order_form) == (2, "trace")
        assert fine.loss.high_order_weight == 0.1 and fine.train.init_from is None
    idode = load_config("images/idode_cifar10_vp_finetune")
    assert idode.loss.second_order_form == "trace" and idode.train.steps == 200_000
    assert load_config("images/idode_cifar10_aug").data.options["hflip"] is True
    lu = load_config("images/mle_score_ode_cifar10_vp")
    assert diff(lu, load_config("images/scoreflow_cifar10_vp")) == {
        "loss.score_matching_order",
        "train.steps",
    }
    given = load_config("recipes/digits_velocity_finetune", ["train.init_from=some/run"])
    assert given.train.init_from == str((Path.cwd() / "some" / "run").resolve())


@pytest.mark.parametrize(
    ("text", "value"),
    [("3e-4", 3e-4), ("1", 1), ("null", None), ("true", True), ("vp", "vp"), ("[1, 2]", [1, 2])],
)
def test_scalars(text, value):
    assert parse_scalar(text) == value


def test_overrides_nest_and_copy():
    base = {"optim": {"lr": 1.0}}
    out = apply_overrides(base, ["optim.grad_clip=null", "data.options.mean=[0, 1]"])
    assert out == {"optim": {"lr": 1.0, "grad_clip": None}, "data": {"options": {"mean": [0, 1]}}}
    assert base == {"optim": {"lr": 1.0}}


@pytest.mark.parametrize(
    ("override", "needles"),
    [
        ("optimm.lr=1", ["unknown key 'optimm'", "valid keys are data, sde, model, loss, optim"]),
        ("optim.lrr=1", ["unknown key 'optim.lrr'", "valid keys are name, lr, betas"]),
        ("sde.name=foo", ["sde.name", "unknown schedule 'foo'", ", ".join(SCHEDULES)]),
        ("loss.weighting=l2", ["loss.weighting", "choose one of score-matching, likelihood"]),
        ("loss.time_sampling=beta", ["loss.time_sampling", "choose one of uniform, importance"]),
        ("loss.parametrization=mu", ["loss.parametrization", "score, eps, x0, v, drift"]),
        ("optim.name=sgd", ["optim.name", "'adam' or 'adamw'", "'sgd'"]),
        ("optim.lr=-1", ["optim.lr", "greater than 0"]),
        (
            "sde.kwargs.sigma=1",
            ["unknown sde.kwargs sigma for schedule 'vp'", "beta_min, beta_max, t_min, T"],
        ),
        ("sde.kwargs.beta_min=-1", ["sde", "need 0 < beta_min <= beta_max"]),
        ("data.name=spiral", ["data.name", "unknown dataset 'spiral'", "checkerboard"]),
        ("data.name=array", ["set data.path"]),
        ("data.options.noise=1", ["unknown data.options noise", "valid are none"]),
        ("train.device=tpu", ["train.device", "cpu, cuda, cuda:N, mps, auto"]),
        ("train.steps=0", ["train.steps", "greater than or equal to 1"]),
        ("model.embedding=rope", ["model.embedding", "sinusoidal, fourier"]),
        ("train.batch_size=big", ["train.batch_size", "valid integer", "'big'"]),
        ("optim.lr", ["bad override 'optim.lr'", "KEY=VALUE", "optim.lr=3e-4"]),
        ("optim.lr.x=1", ["optim.lr is a value, not a section"]),
        ("=3", ["bad override '=3'"]),
    ],
)
def test_rejections_name_key_and_choices(override, needles):
    with pytest.raises(ConfigError) as info:
        load_config("checkerboard", [override])
    msg = str(info.value)
    assert "\n" not in msg
    for needle in needles:
        assert needle in msg, (needle, msg)


def test_bad_files(tmp_path):
    with pytest.raises(
        FileNotFoundError, match="neither a YAML file nor a built-in.*toy/checkerboard"
    ):
        load_config("no/such.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: {lr: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML") as info:
        load_config(bad)
    assert "\n" not in str(info.value)
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(bad)
    bad.write_text("train: {steps: 10, speed: 2}\n")
    with pytest.raises(
        ConfigError, match=r"bad.yaml: unknown key 'train.speed': valid keys are steps"
    ):
        load_config(bad)
