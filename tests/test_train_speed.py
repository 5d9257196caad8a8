"""Speed options of the training loop (issue 22): ``train.channels_last`` and ``train.compile``
change where and how the U-Net computes, never what: the same weights give the same outputs,
losses and gradients (to float32 rounding), and checkpoints stay plain state dicts."""

from __future__ import annotations

import pytest
import torch

from sdelab.train.build import build_run, load_run
from sdelab.train.config import load_config
from sdelab.train.loop import train, train_step

TINY = [
    "model.base_channels=8",
    "model.channel_mults=[1,2]",
    "model.num_groups=4",
    "loss.weighting=score-matching",
    "loss.time_sampling=uniform",
    "optim.warmup_steps=0",
    "train.batch_size=16",
    "train.mixed_precision=no",
    "train.log_every=1",
]


def _pair(tmp_path, option: str):
    plain = build_run(load_config("images/digits", TINY), tmp_path / "plain")
    fast = build_run(load_config("images/digits", [*TINY, f"{option}=true"]), tmp_path / "fast")
    return plain, fast


def _four_d(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p for p in model.parameters() if p.ndim == 4 and p.shape[1] > 1]


def test_channels_last_computes_the_same_step(tmp_path):
    plain, fast = _pair(tmp_path, "train.channels_last")
    weights = _four_d(fast.model)
    assert weights and all(p.is_contiguous(memory_format=torch.channels_last) for p in weights)
    assert not all(p.is_contiguous() for p in weights)
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in _four_d(fast.ema))
    # Same initial weights (the layout is no part of the maths): the same outputs ...
    for a, b in zip(plain.model.state_dict().values(), fast.model.state_dict().values()):
        assert torch.equal(a, b)
    x = plain.dataset.sample(8, torch.Generator().manual_seed(0))
    t = torch.linspace(0.05, 1.0, 8)
    torch.testing.assert_close(fast.model.net(x, t), plain.model.net(x, t), rtol=1e-5, atol=1e-5)
    # ... and the same first step: the same batch, loss and gradient norm.
    a, b = train_step(plain), train_step(fast)
    assert a.loss == pytest.approx(b.loss, rel=1e-5)
    assert a.grad_norm == pytest.approx(b.grad_norm, rel=1e-4)


def test_channels_last_checkpoint_loads_plain_and_resumes(tmp_path):
    over = [*TINY, "train.steps=2", "train.ckpt_every=2", "train.channels_last=true"]
    train(load_config("images/digits", over), tmp_path / "run")
    _, model, _ = load_run(tmp_path / "run")  # a plain (contiguous) U-Net
    x = torch.zeros(2, 64)
    assert model(x, torch.full((2,), 0.5)).shape == (2, 64)
    more = [*TINY, "train.steps=3", "train.ckpt_every=3", "train.channels_last=false"]
    res = train(load_config("images/digits", more), tmp_path / "run", resume=True)
    assert res.step == 3


@pytest.mark.slow
def test_compile_computes_the_same_steps(tmp_path):
    """torch.compile (inductor; minutes on a shared CPU) gives the eager losses, and the
    checkpointed state dict keeps the plain names."""
    plain, fast = _pair(tmp_path, "train.compile")
    assert plain.model.state_dict().keys() == fast.model.state_dict().keys()
    for _ in range(2):
        a, b = train_step(plain), train_step(fast)
        assert a.loss == pytest.approx(b.loss, rel=1e-4)
        assert a.grad_norm == pytest.approx(b.grad_norm, rel=1e-3)
