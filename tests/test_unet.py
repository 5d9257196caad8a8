"""The U-Net: shapes, time dependence, attention and Fourier options, errors, a short fit."""

from __future__ import annotations

import math
import time

import pytest
import torch

from sdelab.data.images import levels_to_model, load_digits, minibatches
from sdelab.losses import TimeSample, dsm_loss
from sdelab.nets.unet import UNet, _SelfAttention, fourier_features
from sdelab.parametrization import ScoreModel
from sdelab.sde import make_schedule

TINY = dict(base_channels=8, channel_mults=(1, 2), num_res_blocks=1, num_groups=4)


def randomize(net: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Replace the zero initialisation of output layers so every path carries signal."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return net


@pytest.mark.parametrize(
    "size, channels, mults",
    [(8, 1, (1, 2)), (28, 1, (1, 2, 2)), (32, 3, (1, 2, 2, 2)), ((8, 12), 3, (1, 2))],
)
def test_output_shape(size, channels, mults, gen):
    net = UNet(size, channels, base_channels=8, channel_mults=mults, num_groups=4)
    h, w = (size, size) if isinstance(size, int) else size
    x = torch.randn(2, channels, h, w, generator=gen)
    out = net(x, torch.rand(2, generator=gen))
    assert out.shape == x.shape
    assert torch.count_nonzero(out) == 0  # zero-initialised output: ε̂ = 0 at the start
    assert net(x, 0.5).shape == x.shape  # scalar time broadcasts
    model = ScoreModel(net, make_schedule("vp"), parametrization="eps")
    assert model(x, 0.3).shape == x.shape


@pytest.mark.parametrize("embedding", ["sinusoidal", "fourier"])
def test_output_depends_on_time(embedding, gen):
    net = randomize(UNet(8, 1, time_embedding=embedding, **TINY)).eval()
    x = torch.randn(1, 1, 8, 8, generator=gen).expand(3, -1, -1, -1)
    out = net(x, torch.tensor([0.1, 0.5, 0.9]))
    for i, j in ((0, 1), (1, 2), (0, 2)):
        assert (out[i] - out[j]).abs().max() > 1e-3 * out.abs().max()
    # Each example gets its own time: batching does not mix them.
    assert torch.allclose(out[1:2], net(x[:1], torch.tensor([0.5])), atol=1e-5)


def test_attention_on_off(gen):
    def count(net):
        return sum(isinstance(m, _SelfAttention) for m in net.modules())

    off = UNet(8, 1, attn_resolutions=(), mid_attention=False, **TINY)
    mid = UNet(8, 1, attn_resolutions=(), mid_attention=True, **TINY)
    at4 = UNet(8, 1, attn_resolutions=(4,), mid_attention=False, attn_heads=2, **TINY)
    # Level of size 4: num_res_blocks blocks down + (num_res_blocks + 1) up.
    assert (count(off), count(mid), count(at4)) == (0, 1, 1 + 2)
    # Every parameter, attention included, gets a gradient.
    net = randomize(UNet(8, 1, attn_resolutions=(8, 4), attn_heads=2, **TINY))
    x = torch.randn(2, 1, 8, 8, generator=gen)
    net(x, torch.rand(2, generator=gen)).square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())


def test_attention_is_permutation_equivariant(gen):
    # Self-attention without positional encoding commutes with permuting the pixels.
    attn = randomize(_SelfAttention(8, heads=2, groups=4))
    x = torch.randn(2, 8, 4, 4, generator=gen)
    perm = torch.randperm(16, generator=gen)
    permuted = x.flatten(2)[..., perm].reshape_as(x)
    assert torch.allclose(attn(permuted).flatten(2), attn(x).flatten(2)[..., perm], atol=1e-5)


def test_fourier_features(gen):
    x = torch.randn(2, 3, 4, 4, generator=gen, dtype=torch.float64)
    feats = fourier_features(x, (0, 2))
    assert feats.shape == (2, 12, 4, 4)
    for i, n in enumerate((0, 2)):
        arg = 2**n * 2 * math.pi * x
        assert torch.allclose(feats[:, 3 * i : 3 * i + 3], arg.sin())
        assert torch.allclose(feats[:, 6 + 3 * i : 6 + 3 * i + 3], arg.cos())
    # Period 2^−n in x: a shift by 1 changes no feature with n ≥ 0.
    assert torch.allclose(fourier_features(x + 1, (0, 3)), fourier_features(x, (0, 3)))

    on = UNet(8, 3, fourier_features=range(6, 8), **TINY)
    off = UNet(8, 3, **TINY)
    assert on.conv_in.in_channels == 3 * (1 + 2 * 2) and off.conv_in.in_channels == 3
    on = randomize(on)
    x = torch.randn(2, 3, 8, 8, generator=gen)
    assert on(x, 0.5).shape == x.shape
    # The features make the output sensitive to shifts of x by 1/128 (the period for n = 7).
    assert not torch.allclose(on(x, 0.5), on(x + 1 / 256, 0.5), atol=1e-3)


def test_dropout_only_in_training(gen):
    net = randomize(UNet(8, 1, dropout=0.5, **TINY))
    x = torch.randn(2, 1, 8, 8, generator=gen)
    net.train()
    assert not torch.allclose(net(x, 0.5), net(x, 0.5))
    net.eval()
    assert torch.equal(net(x, 0.5), net(x, 0.5))


def test_bad_configuration_errors():
    with pytest.raises(ValueError, match="not divisible by the downsampling factor 4"):
        UNet(30, channel_mults=(1, 2, 2))
    with pytest.raises(ValueError, match="downsampling factor 8"):
        UNet(28, channel_mults=(1, 2, 2, 2))
    with pytest.raises(ValueError, match="match no level"):
        UNet(28, attn_resolutions=(16,))
    with pytest.raises(ValueError, match="unknown time embedding"):
        UNet(8, time_embedding="learned")
    net = UNet(8, 1, **TINY)
    with pytest.raises(ValueError, match="built for inputs"):
        net(torch.zeros(2, 1, 16, 16), 0.5)
    with pytest.raises(ValueError, match="built for inputs"):
        net(torch.zeros(2, 3, 8, 8), 0.5)


def test_tiny_unet_learns_digits():
    """Two dozen Adam steps of eps-prediction DSM on 8×8 digits lower the loss on a fixed
    evaluation batch (fixed times and noise) well below ½·E‖ε‖² = 32 of the zero output."""
    torch.manual_seed(0)
    sde = make_schedule("vp")
    digits = load_digits(split="train")
    net = UNet(8, 1, base_channels=16, channel_mults=(1, 2), mid_attention=False)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    x_eval = levels_to_model(digits.levels[:256], digits.num_levels)
    eval_gen = torch.Generator().manual_seed(1)
    eval_t = sde.t_min + (sde.T - sde.t_min) * torch.rand(256, generator=eval_gen)
    eval_noise = torch.randn(x_eval.shape, generator=eval_gen)

    def eval_loss() -> float:
        with torch.no_grad():
            time_ = TimeSample(eval_t, torch.ones_like(eval_t))
            return dsm_loss(net, sde, x_eval, time=time_, noise=eval_noise).loss.mean().item()

    before = eval_loss()
    start = time.perf_counter()
    batches = minibatches(digits, batch_size=64, generator=gen, epochs=None)
    for _, (levels, _) in zip(range(24), batches):
        x0 = levels_to_model(levels, digits.num_levels)
        loss = dsm_loss(net, sde, x0, generator=gen).loss.mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = eval_loss()
    assert before == pytest.approx(32.0, rel=0.15)
    assert after < 0.5 * before, (before, after, time.perf_counter() - start)
