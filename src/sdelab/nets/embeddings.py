"""Time embeddings shared by every network (MLP, U-Net)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ["TIME_EMBEDDINGS", "GaussianFourierEmbedding", "SinusoidalEmbedding"]


class SinusoidalEmbedding(nn.Module):
    """Transformer/DDPM sinusoidal embedding of a scalar per example.

    ``scale`` multiplies the input first (DDPM feeds 1000·t for t ∈ [0, 1]). Output
    ``(B, dim)`` = [sin(s·t·ω_k), cos(s·t·ω_k)] with ω_k = max_period^(−k/(dim/2)).
    """

    def __init__(self, dim: int, scale: float = 1000.0, max_period: float = 10_000.0) -> None:
        super().__init__()
        if dim % 2:
            raise ValueError(f"embedding dim must be even, got {dim}")
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half) / half)
        self.register_buffer("freqs", freqs, persistent=False)
        self.scale = scale
        self.dim = dim

    def forward(self, t: Tensor) -> Tensor:
        arg = self.scale * t.reshape(-1, 1).to(self.freqs.dtype) * self.freqs
        return torch.cat([arg.sin(), arg.cos()], dim=1)


class GaussianFourierEmbedding(nn.Module):
    """Random Fourier features of a scalar (NCSN++): [sin 2π W t, cos 2π W t], W ~ N(0, s²).

    W is fixed (a persistent buffer, saved in checkpoints). ``input_log`` feeds log t, which
    suits VE schedules whose σ spans orders of magnitude.
    """

    def __init__(self, dim: int, scale: float = 16.0, seed: int = 0) -> None:
        super().__init__()
        if dim % 2:
            raise ValueError(f"embedding dim must be even, got {dim}")
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("W", torch.randn(dim // 2, generator=g) * scale)
        self.dim = dim

    def forward(self, t: Tensor) -> Tensor:
        arg = 2 * math.pi * t.reshape(-1, 1).to(self.W.dtype) * self.W
        return torch.cat([arg.sin(), arg.cos()], dim=1)


#: Time embeddings by name, for configs.
TIME_EMBEDDINGS: dict[str, type[nn.Module]] = {
    "sinusoidal": SinusoidalEmbedding,
    "fourier": GaussianFourierEmbedding,
}
