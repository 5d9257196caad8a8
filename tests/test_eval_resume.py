"""Evaluation that survives pre-emption, ScoreFlow's evaluation options (split, repeats) and the
test-set denoising loss, on tiny trained runs."""

from __future__ import annotations

import pytest
import torch

from sdelab.cli import main
from sdelab.likelihood.bpd import ELBO, ODE
from sdelab.likelihood.repeats import repeat_statistics
from sdelab.runs import run_likelihood, run_loss
from sdelab.train import evalstore

TOY = [
    "model.width=32",
    "model.depth=2",
    "model.embedding_dim=16",
    "train.batch_size=128",
    "train.steps=40",
    "train.ckpt_every=40",
]
IMG = [
    "model.base_channels=8",
    "model.channel_mults=[1,2]",
    "model.num_groups=4",
    "model.mid_attention=false",
    "optim.warmup_steps=0",
    "train.steps=4",
    "train.batch_size=16",
    "train.ckpt_every=4",
]
FAST = dict(n=40, batch_size=10, estimator=ODE(tol=1e-2), progress=False)


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    path = tmp_path_factory.mktemp("evr") / "toy"
    assert main(["train", "8gaussians", *TOY, "--out", str(path)]) == 0
    return path


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    path = tmp_path_factory.mktemp("evr") / "digits"
    assert main(["train", "images/digits", *IMG, "--out", str(path)]) == 0
    return path


class Preempted(BaseException):  # as SIGTERM (the CLI's Terminated) or Ctrl-C
    pass


def test_interrupted_then_resumed_equals_uninterrupted(toy, monkeypatch):
    full = run_likelihood(toy, **FAST)
    put = evalstore.EvalStore.put_tensors
    calls = {"n": 0}

    def dying_put(self, i, *stored):  # the job is killed after its second finished batch
        put(self, i, *stored)
        calls["n"] += 1
        if calls["n"] == 2:
            raise Preempted

    monkeypatch.setattr(evalstore.EvalStore, "put_tensors", dying_put)
    with pytest.raises(Preempted):
        run_likelihood(toy, resumable=True, **FAST)
    monkeypatch.setattr(evalstore.EvalStore, "put_tensors", put)
    folder = toy / "eval" / "likelihood"
    assert len(list(folder.glob("batch_*.safetensors"))) == 2
    # a new evaluation is refused while the interrupted one is there; other options too
    with pytest.raises(ValueError, match="--resume"):
        run_likelihood(toy, resumable=True, **FAST)
    with pytest.raises(ValueError, match="tol saved 0.01, given 0.001"):
        run_likelihood(toy, resume=True, **{**FAST, "estimator": ODE(tol=1e-3)})
    resumed = run_likelihood(toy, resume=True, **FAST)
    torch.testing.assert_close(resumed.nll, full.nll, rtol=0, atol=0)
    # the error bar of the resumed result is the uninterrupted one's too
    torch.testing.assert_close(resumed.error, full.error, rtol=0, atol=0)
    assert (resumed.policy, resumed.nll_se, resumed.nfe) == (full.policy, full.nll_se, full.nfe)
    assert resumed.bias_bound == full.bias_bound
    assert not folder.exists()  # complete: nothing left to resume


def test_split_and_repeats(digits):
    """K repeats give K per-image values whose mean is the reported NLL, and the nested
    standard error of the mean splits into image and repeat parts that add up."""
    res = run_likelihood(digits, estimator=ELBO(), n=12, batch_size=6, repeats=3, progress=False)
    assert res.per_repeat.shape == (3, 12)
    torch.testing.assert_close(res.per_repeat.mean(0), res.nll)
    stats = repeat_statistics(res.per_repeat.T)
    if stats.var_images > 0:  # the between-image mean square exceeds the within one
        assert stats.se**2 == pytest.approx(stats.se_images**2 + stats.se_repeats**2, rel=1e-6)
    else:  # clamped at zero: then the whole SE is at most the repeats' part
        assert stats.se_images == 0 and stats.se <= stats.se_repeats * (1 + 1e-12)
    train = run_likelihood(digits, estimator=ELBO(), n=12, split="train", progress=False)
    assert not torch.equal(train.nll, res.nll)  # other images
    with pytest.raises(ValueError, match="--repeats must be"):
        run_likelihood(digits, repeats=0)


def test_repeats_need_image_data(toy):
    with pytest.raises(ValueError, match="image data"):
        run_likelihood(toy, repeats=2, **FAST)


def test_test_loss_matches_the_training_split_loss(toy):
    """A briefly trained model does not overfit 8gaussians: the denoising loss of fresh
    training draws and of the test set agree within 4 standard errors."""
    test = run_loss(toy, n=4000, batch_size=1000)
    train = run_loss(toy, n=4000, batch_size=1000, split="train")
    assert abs(test.mean - train.mean) < 4 * (test.se**2 + train.se**2) ** 0.5
    assert test.weighting == "likelihood" and test.loss.shape == (4000,)
