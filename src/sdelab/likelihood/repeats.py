r"""Mean and standard errors of a per-example estimate repeated K times per image.

A likelihood evaluation with K repeats (ScoreFlow's ``num_repeats``: K dequantization and probe
draws per image) gives an array v of shape ``(N, K)``. Its variation has two sources, modelled
as the balanced one-way random-effects (nested) model

    v_ij = μ + a_i + e_ij,   Var a_i = σ²_img (images differ),  Var e_ij = σ²_rep (draws differ),

and the grand mean m = mean_ij v_ij has Var m = σ²_img/N + σ²_rep/(N K). With the ANOVA mean
squares MS_between = K Σ_i (v̄_i − v̄)²/(N − 1) and MS_within = Σ_ij (v_ij − v̄_i)²/(N(K − 1)),

    E MS_within = σ²_rep,   E MS_between = K σ²_img + σ²_rep,

so σ̂²_rep = MS_within, σ̂²_img = (MS_between − MS_within)/K (clipped at 0) are unbiased (before
clipping), and

    se      = √(MS_between / (N K)) = sd(v̄_i)/√N     (the SE of m; unbiased for Var m)
    se_img  = √(σ̂²_img / N)                          (what remains with K → ∞)
    se_rep  = √(σ̂²_rep / (N K))                      (the Monte-Carlo part; shrinks with K)

with se² = se_img² + se_rep² whenever σ̂²_img is not clipped. With K = 1 the two sources cannot be
told apart: se is still right, se_img and se_rep are NaN.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["RepeatStats", "repeat_statistics"]


@dataclass(frozen=True)
class RepeatStats:
    """Mean of an ``(N, K)`` array and its standard errors (module docstring).

    Attributes:
        mean: the grand mean m.
        se: the standard error of m (both sources).
        se_images: the part of ``se`` from image-to-image variation.
        se_repeats: the part of ``se`` from the repeats' Monte-Carlo noise.
        var_images, var_repeats: σ̂²_img and σ̂²_rep (per value, not per mean).
        n_images, n_repeats: N and K.
    """

    mean: float
    se: float
    se_images: float
    se_repeats: float
    var_images: float
    var_repeats: float
    n_images: int
    n_repeats: int


def repeat_statistics(values: Tensor) -> RepeatStats:
    """Mean and the SE over images and over repeats of per-example values ``(N, K)``.

    Args:
        values: ``(N, K)``: N images (N >= 2), K repeats each (K >= 1), e.g. bits/dim.

    Returns:
        :class:`RepeatStats`.

    Raises:
        ValueError: not a 2-D array, N < 2, K < 1, or NaN/inf values.
    """
    v = torch.as_tensor(values).to(torch.float64)
    if v.ndim != 2 or v.shape[0] < 2 or v.shape[1] < 1:
        raise ValueError(
            f"values must have shape (N images >= 2, K repeats >= 1), got {tuple(v.shape)}: "
            "stack the repeats of each image along the second axis"
        )
    if not bool(torch.isfinite(v).all()):
        raise ValueError("values contain NaN or inf: drop or fix those examples first")
    n, k = v.shape
    per_image = v.mean(1)  # (N,)
    ms_between = k * float(per_image.var(unbiased=True))
    se = math.sqrt(ms_between / (n * k))
    if k == 1:
        nan = float("nan")
        return RepeatStats(float(per_image.mean()), se, nan, nan, nan, nan, n, k)
    ms_within = float(((v - per_image.unsqueeze(1)) ** 2).sum()) / (n * (k - 1))
    var_images = max(ms_between - ms_within, 0.0) / k
    return RepeatStats(
        mean=float(per_image.mean()),
        se=se,
        se_images=math.sqrt(var_images / n),
        se_repeats=math.sqrt(ms_within / (n * k)),
        var_images=var_images,
        var_repeats=ms_within,
        n_images=n,
        n_repeats=k,
    )
