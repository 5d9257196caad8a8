"""Time embeddings shared by every network (MLP, U-Net), and the class embedding of
conditional networks."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ["TIME_EMBEDDINGS", "ClassEmbedding", "GaussianFourierEmbedding", "SinusoidalEmbedding"]


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


class ClassEmbedding(nn.Module):
    """A learned embedding of K classes plus one "null" class (index K, no label), for
    conditional score networks trained with label dropout (classifier-free guidance).

    ``forward(y, batch)``: ``y`` ``(B,)`` int labels in 0…K (K = null), or ``None`` for the null
    class for the whole batch of size ``batch``; returns ``(B, dim)``.
    """

    def __init__(self, num_classes: int, dim: int) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"a conditional network needs num_classes >= 2, got {num_classes}")
        self.num_classes = num_classes
        self.table = nn.Embedding(num_classes + 1, dim)

    @property
    def null(self) -> int:
        """The index of the null class (K)."""
        return self.num_classes

    def forward(self, y: Tensor | None, batch: int) -> Tensor:
        if y is None:
            y = torch.full((batch,), self.null, dtype=torch.long, device=self.table.weight.device)
        y = torch.as_tensor(y, device=self.table.weight.device).long().reshape(-1)
        if y.numel() == 1 and batch != 1:
            y = y.expand(batch)
        if y.shape != (batch,):
            raise ValueError(f"need one label per example: got {tuple(y.shape)} for {batch}")
        if y.numel() and (int(y.min()) < 0 or int(y.max()) > self.null):
            bad = int(y.max()) if int(y.max()) > self.null else int(y.min())
            raise ValueError(
                f"class index {bad} out of range: the network has {self.num_classes} classes "
                f"(0…{self.num_classes - 1}; {self.null} = no label)"
            )
        return self.table(y)


def check_unconditional(y: Tensor | None) -> None:
    """Raise the one-line error for labels passed to an unconditional network."""
    if y is not None:
        raise ValueError(
            "this network is unconditional (model.num_classes=0) and takes no labels: "
            "train with model.num_classes=K for class-conditional sampling"
        )
