"""A DDPM / NCSN++-style U-Net ``net(x, t) -> same shape as x`` for 1- or 3-channel images.

Layout (Ho et al. 2020, as in score_sde's DDPM++): an input conv, then per resolution level
``num_res_blocks`` residual blocks (GroupNorm → SiLU → conv, plus the projected time embedding,
then GroupNorm → SiLU → dropout → conv) with optional self-attention, a strided-conv
downsample between levels, a middle of res–attention–res, and the mirror image going up with
skip connections (nearest-neighbour ×2 + conv). The time embedding is one of
:data:`~sdelab.nets.embeddings.TIME_EMBEDDINGS` followed by a two-layer MLP. Optionally the
input gets VDM's Fourier features sin/cos(2ⁿ·2π·x) concatenated on the channel axis.

The last conv of each residual branch, each attention output projection and the output
conv start at zero (as in DDPM), so an untrained U-Net returns zeros: ε̂ = 0 under
``ScoreModel(net, schedule, parametrization="eps")``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sdelab.nets.embeddings import TIME_EMBEDDINGS, ClassEmbedding, check_unconditional
from sdelab.utils import batch_time

__all__ = ["ImageUNet", "UNet", "fourier_features"]


def fourier_features(x: Tensor, exponents: Sequence[int]) -> Tensor:
    """VDM's input features sin(2ⁿ·2π·x) and cos(2ⁿ·2π·x) for each exponent n, per channel.

    ``(B, C, H, W) -> (B, 2·len(exponents)·C, H, W)``: first the sines, then the cosines; in
    each half, all C channels for the first n, then for the next n.
    """
    freqs = 2.0 ** torch.as_tensor(list(exponents), dtype=x.dtype, device=x.device) * 2 * math.pi
    arg = x.unsqueeze(1) * freqs.reshape(1, -1, 1, 1, 1)  # (B, n, C, H, W)
    arg = arg.flatten(1, 2)  # (B, n·C, H, W)
    return torch.cat([arg.sin(), arg.cos()], dim=1)


def _norm(channels: int, num_groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(num_groups, channels), channels, eps=1e-6)


def _zero(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class _ResBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, temb_dim: int, dropout: float, groups: int) -> None:
        super().__init__()
        self.norm1 = _norm(c_in, groups)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.temb = nn.Linear(temb_dim, c_out)
        self.norm2 = _norm(c_out, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = _zero(nn.Conv2d(c_out, c_out, 3, padding=1))
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb(temb)[:, :, None, None]  # (B, C_out) over every pixel
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class _SelfAttention(nn.Module):
    def __init__(self, channels: int, heads: int, groups: int) -> None:
        super().__init__()
        if channels % heads:
            raise ValueError(f"attention: {channels} channels do not split into {heads} heads")
        self.heads = heads
        self.norm = _norm(channels, groups)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = _zero(nn.Conv2d(channels, channels, 1))

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, h * w)
        q, k, v = qkv.transpose(-1, -2).unbind(1)  # each (B, heads, HW, C/heads)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, heads, HW, C/heads)
        return x + self.proj(out.transpose(-1, -2).reshape(b, c, h, w))


class _Block(nn.Module):
    """A residual block, optionally followed by self-attention."""

    def __init__(self, res: _ResBlock, attn: _SelfAttention | None) -> None:
        super().__init__()
        self.res = res
        self.attn = attn

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        h = self.res(x, temb)
        return h if self.attn is None else self.attn(h)


class _Downsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class _Upsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class UNet(nn.Module):
    """DDPM/NCSN++-style U-Net: ``UNet(...)(x, t)`` returns a tensor shaped like ``x``.

    Drops into ``ScoreModel(net, schedule, parametrization="eps")`` (or any other kind).

    Args:
        image_size: H = W, or ``(H, W)``; each must be divisible by 2^(levels − 1).
        in_channels: 1 or 3 (any positive number works).
        out_channels: defaults to ``in_channels``.
        base_channels: channels at full resolution; level i has ``base · channel_mults[i]``.
        channel_mults: one multiplier per resolution level; ``len − 1`` downsamplings by 2.
        num_res_blocks: residual blocks per level on the way down (one more on the way up).
        attn_resolutions: feature-map sizes (the shorter side, in pixels) at which each
            residual block is followed by self-attention, e.g. ``(16,)`` for 32×32 input;
            every value must be the size of some level.
        mid_attention: self-attention between the two middle residual blocks.
        attn_heads: heads of every attention layer.
        dropout: dropout probability inside residual blocks.
        time_embedding: ``"sinusoidal"`` (DDPM; scales t by 1000 by default) or ``"fourier"``
            (NCSN++ Gaussian Fourier features), from ``TIME_EMBEDDINGS``.
        time_embedding_kwargs: extra arguments of the embedding (``scale``, ``seed``, …).
        fourier_features: exponents n of VDM's input features sin/cos(2ⁿ·2π·x), e.g.
            ``range(6, 8)`` for 8-bit data scaled to [−1, 1]; empty = off.
        num_groups: GroupNorm groups (reduced to gcd(num_groups, channels) where needed).
        num_classes: K > 0: class-conditional, ``net(x, t, y)`` adds a learned class
            embedding (K classes + null, :class:`~sdelab.nets.embeddings.ClassEmbedding`)
            to the time embedding; ``y = None`` is the null class. 0: unconditional.

    Raises:
        ValueError: a size not divisible by the downsampling factor, an attention
            resolution that matches no level, or an input of another shape in ``forward``.

    Defaults are small for CPUs (~1.1 M parameters): 32 base channels,
    multipliers ``(1, 2, 2)``, one block per level, attention in the middle only.
    """

    def __init__(
        self,
        image_size: int | tuple[int, int],
        in_channels: int = 1,
        *,
        out_channels: int | None = None,
        base_channels: int = 32,
        channel_mults: Sequence[int] = (1, 2, 2),
        num_res_blocks: int = 1,
        attn_resolutions: Sequence[int] = (),
        mid_attention: bool = True,
        attn_heads: int = 1,
        dropout: float = 0.0,
        time_embedding: str = "sinusoidal",
        time_embedding_kwargs: dict | None = None,
        fourier_features: Sequence[int] = (),
        num_groups: int = 8,
        num_classes: int = 0,
    ) -> None:
        super().__init__()
        h, w = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        factor = 2 ** (len(channel_mults) - 1)
        if not channel_mults or h % factor or w % factor or h < factor or w < factor:
            raise ValueError(
                f"image size {h}×{w} is not divisible by the downsampling factor {factor} "
                f"(2^(len(channel_mults) − 1) with channel_mults={tuple(channel_mults)}): "
                "use fewer levels or pad/crop the images"
            )
        level_sizes = [min(h, w) // 2**i for i in range(len(channel_mults))]
        bad = [r for r in attn_resolutions if r not in level_sizes]
        if bad:
            raise ValueError(
                f"attn_resolutions {bad} match no level; the levels are {level_sizes} pixels"
            )
        if time_embedding not in TIME_EMBEDDINGS:
            raise ValueError(
                f"unknown time embedding {time_embedding!r}: choose one of "
                f"{', '.join(TIME_EMBEDDINGS)}"
            )
        self.image_shape = (in_channels, h, w)
        self.fourier_exponents = tuple(int(n) for n in fourier_features)
        out_channels = in_channels if out_channels is None else out_channels
        temb_dim = 4 * base_channels
        g = num_groups

        # Time: embedding (B, base) → MLP (B, 4·base).
        self.time_embed = TIME_EMBEDDINGS[time_embedding](
            base_channels, **(time_embedding_kwargs or {})
        )
        self.time_mlp = nn.Sequential(
            nn.Linear(base_channels, temb_dim), nn.SiLU(), nn.Linear(temb_dim, temb_dim)
        )
        self.class_embed = ClassEmbedding(num_classes, temb_dim) if num_classes else None

        c_in = in_channels * (1 + 2 * len(self.fourier_exponents))
        self.conv_in = nn.Conv2d(c_in, base_channels, 3, padding=1)

        # Down: remember the channels of every skip connection.
        ch, skips = base_channels, [base_channels]
        self.down = nn.ModuleList()
        for i, mult in enumerate(channel_mults):
            blocks = nn.ModuleList()
            for _ in range(num_res_blocks):
                attn = level_sizes[i] in attn_resolutions
                c_out = base_channels * mult
                blocks.append(self._block(ch, c_out, temb_dim, dropout, g, attn, attn_heads))
                ch = c_out
                skips.append(ch)
            level = nn.Module()
            level.blocks = blocks
            level.resample = _Downsample(ch) if i < len(channel_mults) - 1 else nn.Identity()
            if i < len(channel_mults) - 1:
                skips.append(ch)
            self.down.append(level)

        self.mid1 = self._block(ch, ch, temb_dim, dropout, g, mid_attention, attn_heads)
        self.mid2 = _Block(_ResBlock(ch, ch, temb_dim, dropout, g), None)

        # Up: num_res_blocks + 1 blocks per level, each eating one skip.
        self.up = nn.ModuleList()
        for i, mult in reversed(list(enumerate(channel_mults))):
            blocks = nn.ModuleList()
            for _ in range(num_res_blocks + 1):
                attn = level_sizes[i] in attn_resolutions
                c_out = base_channels * mult
                blocks.append(
                    self._block(ch + skips.pop(), c_out, temb_dim, dropout, g, attn, attn_heads)
                )
                ch = c_out
            level = nn.Module()
            level.blocks = blocks
            level.resample = _Upsample(ch) if i > 0 else nn.Identity()
            self.up.append(level)
        assert not skips

        self.norm_out = _norm(ch, g)
        self.conv_out = _zero(nn.Conv2d(ch, out_channels, 3, padding=1))

    @staticmethod
    def _block(c_in, c_out, temb_dim, dropout, groups, attn, heads) -> _Block:
        res = _ResBlock(c_in, c_out, temb_dim, dropout, groups)
        return _Block(res, _SelfAttention(c_out, heads, groups) if attn else None)

    def forward(self, x: Tensor, t: Tensor | float, y: Tensor | None = None) -> Tensor:
        """``x``: ``(B, C, H, W)`` as built, ``t``: scalar or ``(B,)``, ``y``: ``(B,)`` labels
        of a conditional net (``None``: null class) → ``(B, C_out, H, W)``."""
        if tuple(x.shape[1:]) != self.image_shape:
            raise ValueError(
                f"UNet built for inputs (B, {', '.join(map(str, self.image_shape))}), "
                f"got {tuple(x.shape)}"
            )
        t = batch_time(t, x)
        temb = self.time_mlp(self.time_embed(t))  # (B, 4·base)
        if self.class_embed is not None:
            temb = temb + self.class_embed(y, x.shape[0])
        else:
            check_unconditional(y)

        h = x
        if self.fourier_exponents:
            h = torch.cat([x, fourier_features(x, self.fourier_exponents)], dim=1)
        h = self.conv_in(h)
        hs = [h]
        for level in self.down:
            for block in level.blocks:
                h = block(h, temb)
                hs.append(h)
            if not isinstance(level.resample, nn.Identity):
                h = level.resample(h)
                hs.append(h)
        h = self.mid2(self.mid1(h, temb), temb)
        for level in self.up:
            for block in level.blocks:
                h = block(torch.cat([h, hs.pop()], dim=1), temb)
            h = level.resample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class ImageUNet(UNet):
    """A :class:`UNet` that also takes flattened images: ``(B, C·H·W)`` in, the same shape out.

    The network of ``model.arch: unet`` runs: the training loop feeds ``(B, C, H, W)``, while
    code that treats a run as vectors of ``model.dim`` (guidance, inpainting of flattened
    runs) may pass ``(B, D)``; both give the same numbers. The state dict is a plain UNet's.
    """

    def forward(self, x: Tensor, t: Tensor | float, y: Tensor | None = None) -> Tensor:
        if x.ndim == 2 and x.shape[1] == math.prod(self.image_shape):
            return super().forward(x.reshape(x.shape[0], *self.image_shape), t, y).flatten(1)
        return super().forward(x, t, y)
