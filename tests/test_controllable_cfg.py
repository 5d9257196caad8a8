"""Classifier-free guidance: conditional networks, label dropout in training, CFG sampling
through the CLI, image classifiers, and their one-line errors."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from cli_helpers import run_cli
from sdelab.cli import main
from sdelab.controllable import cfg_score, cfg_score_fn, guided_score_fn
from sdelab.data.toys import eight_gaussians_mixture
from sdelab.nets.mlp import MLP
from sdelab.nets.unet import ImageUNet
from sdelab.oracle import mixture_classifier, mixture_score_fn
from sdelab.sde import VPSchedule
from sdelab.train.build import build_run
from sdelab.train.classifier import load_classifier
from sdelab.train.config import ConfigError, load_config
from sdelab.train.loop import train, train_step
from sdelab.train.objectives import drop_labels

TINY = [
    "model.width=64",
    "model.depth=2",
    "model.embedding_dim=16",
    "train.batch_size=256",
    "train.log_every=100",
]
COND = ["model.num_classes=8", "model.label_dropout=0.1"]


# ---- the combination rule --------------------------------------------------------------------
def _oracle_conditional(schedule):
    """The exact conditional score of 8gaussians: component k's Gaussian score for y = k, the
    mixture's score for the null label 8."""
    means, std = eight_gaussians_mixture()
    mixture = mixture_score_fn(means, std, schedule)

    def model(x, t, y):
        alpha, sigma = schedule.alpha_sigma(t)
        var = (alpha**2 * std**2 + sigma**2)[:, None]
        comp = (alpha[:, None] * means[y.clamp(max=7)] - x) / var
        return torch.where((y == 8)[:, None], mixture(x, t), comp)

    return model, means, std


def test_cfg_with_exact_scores_equals_exact_classifier_guidance():
    """s(x,t,∅) + S (s(x,t,k) − s(x,t,∅)) = s(x,t) + S ∇ log p_t(k | x) for the exact mixture
    (Bayes: ∇ log p_t(x | k) − ∇ log p_t(x) = ∇ log p_t(k | x)), at every S."""
    schedule = VPSchedule()
    model, means, std = _oracle_conditional(schedule)
    g = torch.Generator().manual_seed(0)
    x, t = 3 * torch.randn(64, 2, generator=g), 0.05 + 0.9 * torch.rand(64, generator=g)
    classifier = mixture_classifier(means, std, schedule)
    for scale in (0.0, 1.0, 2.5):
        cfg = cfg_score_fn(model, 5, scale, num_classes=8)(x, t)
        exact = guided_score_fn(mixture_score_fn(means, std, schedule), classifier, 5, scale)
        torch.testing.assert_close(cfg, exact(x, t), rtol=1e-4, atol=1e-4)


def test_cfg_weight_zero_is_the_conditional_score():
    """cfg_score's w = 0 (guidance scale S = 1) is the conditional score exactly, also through
    a conditional network; S = 0 is the null-class (unconditional) score."""
    torch.manual_seed(0)
    net = MLP(2, width=16, depth=2, embedding_dim=8, num_classes=4)
    x, t = torch.randn(10, 2), torch.rand(10)
    y = torch.full((10,), 2)
    cond, uncond = net(x, t, y), net(x, t)
    assert torch.equal(cfg_score(cond, uncond, 0.0), cond)
    assert torch.equal(cfg_score_fn(net, 2, 1.0, num_classes=4)(x, t), cond)
    torch.testing.assert_close(cfg_score_fn(net, 2, 0.0, num_classes=4)(x, t), uncond)
    torch.testing.assert_close(
        cfg_score_fn(net, 2, 3.0, num_classes=4)(x, t), uncond + 3 * (cond - uncond)
    )
    with pytest.raises(ValueError, match="class index 4 out of range"):
        cfg_score_fn(net, 4, 1.0, num_classes=4)


def test_conditional_nets_take_labels_and_the_null_class():
    torch.manual_seed(0)
    unet = ImageUNet((8, 8), 1, base_channels=8, channel_mults=(1, 2), num_classes=3)
    for p in unet.parameters():  # zero-initialised output convs: give them weights
        if not p.any():
            torch.nn.init.normal_(p, std=0.1)
    x, t = torch.randn(4, 1, 8, 8), torch.rand(4)
    y = torch.tensor([0, 1, 2, 3])  # 3 = null
    out = unet(x, t, y)
    assert out.shape == x.shape
    torch.testing.assert_close(unet(x, t, torch.full((4,), 3)), unet(x, t))  # None = null
    torch.testing.assert_close(unet(x.flatten(1), t, y), out.flatten(1))  # flat input
    assert not torch.allclose(out[0], unet(x, t, torch.tensor([1, 1, 2, 3]))[0])
    with pytest.raises(ValueError, match="class index 4 out of range"):
        unet(x, t, torch.tensor([0, 1, 2, 4]))
    with pytest.raises(ValueError, match="unconditional"):
        MLP(2, width=8, depth=1)(torch.randn(2, 2), torch.rand(2), torch.zeros(2).long())


# ---- label dropout in training -----------------------------------------------------------------
def test_drop_labels_rate_and_kept_labels():
    """Each label becomes null with probability p: the null fraction of n = 40 000 draws lies
    within 5 binomial standard deviations of p; kept labels are unchanged."""
    n, p = 40_000, 0.1
    labels = torch.randint(8, (n,), generator=torch.Generator().manual_seed(0))
    out = drop_labels(labels, p, 8, torch.Generator().manual_seed(1))
    frac = float((out == 8).float().mean())
    assert abs(frac - p) < 5 * math.sqrt(p * (1 - p) / n), frac
    kept = out != 8
    assert torch.equal(out[kept], labels[kept])
    assert torch.equal(drop_labels(labels, 0.0, 8), labels)


def test_training_feeds_labels_with_the_dropout_rate(tmp_path):
    """The labels the network sees in train_step: a null fraction within 5σ of
    label_dropout = 0.25, and the true labels (the 8gaussians components) elsewhere."""
    config = load_config("8gaussians", [*TINY, "model.num_classes=8", "model.label_dropout=0.25"])
    run = build_run(config, tmp_path / "r")
    seen: list[torch.Tensor] = []
    run.model.net.register_forward_pre_hook(lambda mod, args: seen.append(args[2].clone()))
    for _ in range(10):
        train_step(run)
    labels = torch.cat(seen)
    n = labels.numel()
    assert n == 10 * 256
    frac = float((labels == 8).float().mean())
    assert abs(frac - 0.25) < 5 * math.sqrt(0.25 * 0.75 / n), frac
    assert int(labels.min()) >= 0 and len(torch.unique(labels)) == 9


def test_sharded_step_equals_plain_step_with_labels(tmp_path):
    """grad_accum = 4 goes through the sharded path (dropout mask drawn over the global batch
    from the loss generator): the same weights as the plain step after 4 steps."""
    over = [*TINY, *COND, "train.steps=4", "train.ckpt_every=4"]
    plain = train(load_config("8gaussians", over), tmp_path / "plain")
    accum = train(load_config("8gaussians", [*over, "train.grad_accum=4"]), tmp_path / "accum")
    from sdelab.train.checkpoint import load_checkpoint

    a, b = load_checkpoint(plain.run_dir).tensors, load_checkpoint(accum.run_dir).tensors
    for k in a:
        if k.startswith("model."):
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)
    assert any("class_embed" in k for k in a)


# ---- end to end through the CLI ---------------------------------------------------------------
@pytest.fixture(scope="module")
def cond_run(tmp_path_factory):
    """8gaussians with an 8-class conditional MLP and label dropout 0.1, 400 steps."""
    path = tmp_path_factory.mktemp("cfg") / "run"
    args = ["train", "8gaussians", *TINY, *COND, "train.steps=400", "train.ckpt_every=400"]
    assert main([*args, "--out", str(path)]) == 0
    return path


def test_cfg_samples_land_on_the_requested_component(cond_run, tmp_path, capsys):
    """`sdelab sample RUN --class 3`: the nearest 8gaussians centre of ≥ 90 % of 400 samples is
    centre 3 at S = 1 and 2 (neighbouring centres are 6 component stds apart, so an exact
    sampler gives ~100 %); at S = 0 (unconditional) the share is near 1/8 (< 0.25)."""
    means, _ = eight_gaussians_mixture()
    share = {}
    for scale in ("0", "1", "2"):
        out = tmp_path / f"c{scale}.npy"
        code, _, err = run_cli(
            capsys,
            "sample",
            str(cond_run),
            "--class",
            "3",
            "--guidance",
            scale,
            "--steps",
            "100",
            "--n",
            "400",
            "--out",
            str(out),
        )
        assert code == 0, err
        x = torch.from_numpy(np.load(out))
        share[scale] = float((torch.cdist(x, means).argmin(1) == 3).float().mean())
    assert share["1"] >= 0.9 and share["2"] >= 0.9, share
    assert share["0"] < 0.25, share


def test_cfg_bad_input_is_one_line_exit_2(cond_run, tmp_path, capsys):
    out = tmp_path / "x.npy"
    code, _, err = run_cli(capsys, "sample", str(cond_run), "--class", "8", "--out", str(out))
    assert code == 2 and "class index 8 out of range" in err and err.count("\n") == 1
    assert not out.exists()
    code, _, err = run_cli(
        capsys, "sample", str(cond_run), "--classifier", str(tmp_path), "--out", str(out)
    )
    assert code == 2 and "--class" in err


def test_conditional_config_on_unlabeled_data_is_one_line_exit_2(tmp_path, capsys):
    run = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", "swissroll", "model.num_classes=2", "--out", str(run))
    assert code == 2 and "no class labels" in err and err.count("\n") == 1
    assert not run.exists()
    code, _, err = run_cli(capsys, "train", "moons", "model.num_classes=3", "--out", str(run))
    assert code == 2 and "set model.num_classes=2" in err
    with pytest.raises(ConfigError, match="label_dropout needs"):
        load_config("moons", ["model.label_dropout=0.1"])


def test_guidance_without_label_dropout_is_refused(tmp_path, capsys):
    run = tmp_path / "run"
    over = [*TINY, "model.num_classes=2", "train.steps=2", "train.ckpt_every=2"]
    assert main(["train", "moons", *over, "--out", str(run)]) == 0
    out = tmp_path / "x.npy"
    args = ["sample", str(run), "--class", "1", "--steps", "5", "--n", "4", "--out"]
    code, _, err = run_cli(capsys, *args, str(out), "--guidance", "2")
    assert code == 2 and "label_dropout" in err and not out.exists()
    assert run_cli(capsys, *args, str(out))[0] == 0  # S = 1: the conditional score


# ---- image classifiers -----------------------------------------------------------------------
def test_train_classifier_on_digits_gives_a_conv_classifier(tmp_path, capsys):
    """`sdelab train-classifier images/digits`: a ConvClassifier trained on noised digits
    with their labels; 150 steps already beat chance (0.1) by far on the test split at t_min."""
    out = tmp_path / "clf"
    args = ["train-classifier", "images/digits", "--steps", "150", "--width", "8"]
    code, _, err = run_cli(capsys, *args, "--batch-size", "64", "--out", str(out))
    assert code == 0, err
    meta = json.loads((out / "classifier.json").read_text())
    assert meta["arch"] == "conv" and meta["image_shape"] == [1, 8, 8]
    assert meta["accuracy"]["0"] > 0.4, meta["accuracy"]
    net, _ = load_classifier(out)
    x, t = torch.randn(3, 64), torch.rand(3)
    torch.testing.assert_close(net(x, t), net(x.reshape(3, 1, 8, 8), t))  # flat images too
    clean = tmp_path / "clean"
    code, _, err = run_cli(capsys, *args, "--clean", "--out", str(clean))
    assert code == 0, err
    meta = json.loads((clean / "classifier.json").read_text())
    assert meta["clean"] is True and list(meta["accuracy"]) == ["0"]
