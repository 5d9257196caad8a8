"""Small shared helpers: broadcasting, seeding, shape checks."""

from __future__ import annotations

import torch
from torch import Tensor


def append_dims(v: Tensor, ndim: int) -> Tensor:
    """Append trailing singleton dims so ``v`` broadcasts against a tensor of rank ``ndim``.

    A per-example quantity of shape ``(B,)`` becomes ``(B, 1, ..., 1)``; a 0-d tensor stays 0-d
    (it already broadcasts). This is the one place where time-like tensors meet data of any rank.
    """
    if v.ndim == 0:
        return v
    if v.ndim > ndim:
        raise ValueError(
            f"cannot broadcast a tensor of rank {v.ndim} against data of rank {ndim}: "
            "pass one value per example (shape (B,)) or a scalar"
        )
    return v.reshape(*v.shape, *([1] * (ndim - v.ndim)))


def batch_time(t: Tensor | float, x: Tensor) -> Tensor:
    """Return time as a ``(B,)`` tensor on ``x``'s device and dtype, from a scalar or ``(B,)``.

    Raises ``ValueError`` when ``t`` has one value per example but the count differs from ``B``.
    """
    t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
    if t.ndim == 0:
        return t.expand(x.shape[0]).contiguous()  # torch.func transforms need real storage
    if t.ndim != 1 or t.shape[0] != x.shape[0]:
        raise ValueError(
            f"time has shape {tuple(t.shape)} but the batch has {x.shape[0]} examples: "
            "pass a scalar or one time per example"
        )
    return t


def make_generator(
    seed: int | torch.Generator | None, device: torch.device | str = "cpu"
) -> torch.Generator | None:
    """Turn a seed into a ``torch.Generator`` (a generator passes through, ``None`` stays)."""
    if seed is None or isinstance(seed, torch.Generator):
        return seed
    g = torch.Generator(device=device)
    g.manual_seed(int(seed))
    return g


def randn_like(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """``torch.randn_like`` that honours an explicit generator."""
    return torch.randn(x.shape, dtype=x.dtype, device=x.device, generator=generator)


def sum_except_batch(x: Tensor) -> Tensor:
    """Sum over every dim but the first: per-example totals of shape ``(B,)``."""
    return x.reshape(x.shape[0], -1).sum(dim=1)
