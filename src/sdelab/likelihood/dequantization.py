r"""Dequantization and bits/dim: the one place where discrete data meets a density.

Discrete data k ∈ {0, …, L−1}^D (L levels: 256 for 8-bit pixels, any L ≥ 2 works) is mapped to
the model's space by an explicit affine map of the unit cube,

    x = (k + u) / L ∈ [0, 1)^D,     y = a·x + b       (a = 2, b = −1 for a model on [−1, 1]).

For any density q(y | k) supported inside the image of k's bin, Jensen's inequality gives

    −log P(k) ≤ E_{y ~ q(·|k)}[−log p(y)] − H(q(·|k)),

and bits/dim is that bound divided by D log 2. Two choices of q:

- ``"uniform"``: u ~ U[0, 1)^D, so q is uniform on the bin of volume (a/L)^D and
  H = D log(a/L); the bound is E_u[−log p_y(y)] − D log a + D log L, the textbook formula with the
  level count and scale written out (never an unexplained "offset").
- ``"truncated_normal"``: the training-free dequantization of i-DODE (Zheng et al. 2023). The
  model density is evaluated at time t_min, where the diffusion itself has noise σ = σ(t_min)
  and scale α = α(t_min); the dequantized point is

      y = α·y_c + σ·z,   y_c = a (k + ½)/L + b,   z ~ N(0, I) truncated to [−τ, τ]^D,
      τ = α a / (2 L σ),

  so y stays inside α times k's bin (the bins stay disjoint) and q matches the perturbation
  kernel p_{0 t_min} that the model was trained on. Its entropy (the correction that replaces
  D log L − D log a) is, with Z = erf(τ/√2) and φ the standard normal density,

      H = D [½ log(2πe) + log σ + log Z − τ φ(τ) / Z].

- **variational** (Flow++, Ho et al. 2019; ScoreFlow's trained dequantizer): u ~ q(· | k), a
  conditional flow on (0, 1)^D (:class:`~sdelab.nets.dequantizer.Dequantizer`), trained after
  the score model to shrink the gap. In model space q_y(y | k) = q(u | k)·(L/a)^D, so the bound
  reads

      −log P(k) ≤ E_{u ~ q}[−log p_y(y) + log q(u | k)] − D log a + D log L,

  and :func:`variational_dequantize` returns the one-draw estimate −log q_y(y | k) =
  −log q(u | k) + D log(a/L) in the place of the entropy (its expectation is H(q_y(·|k))). The
  gap to −log P(k) is KL(q(·|k) ‖ p(·|k)), p(u | k) ∝ p_y(a(k + u)/L + b) on the bin.

A negative bits/dim is impossible for the exact expectation (P(k) ≤ 1); every function here
takes the *integer* data and dequantizes it itself, so a forgotten dequantization cannot happen.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from sdelab.sde import Schedule
from sdelab.utils import check_int

__all__ = [
    "DEQUANTIZATIONS",
    "Dequantized",
    "check_levels",
    "dequantize",
    "nats_to_bpd",
    "to_model_space",
    "variational_dequantize",
]

DEQUANTIZATIONS: tuple[str, ...] = ("uniform", "truncated_normal")


def nats_to_bpd(nats: Tensor | float, dim: int) -> Tensor | float:
    """Convert nats (per example, summed over ``dim`` dimensions) to bits per dimension."""
    return nats / (dim * math.log(2.0))


def to_model_space(
    k: Tensor, levels: int, scale: float = 1.0, shift: float = 0.0, u: Tensor | float = 0.5
) -> Tensor:
    """y = scale·(k + u)/L + shift: integer levels (plus a dequantization offset u ∈ [0, 1),
    ½ = the bin centres) to model space. The one place this map is written.

    Integer ``k`` becomes torch's default float dtype; floating ``k`` keeps its dtype.
    """
    kf = k if k.is_floating_point() else k.to(torch.get_default_dtype())
    return scale * ((kf + u) / levels) + shift


def check_levels(k: Tensor, levels: int, dtype: torch.dtype | None = None) -> Tensor:
    """Validate integer data k ∈ {0..levels−1} of shape ``(B, ...)``; return it as floats.

    Raises:
        ValueError: ``levels`` not an integer >= 2; data not a batch; NaN/inf; non-integer values
            (data already scaled or dequantized); values outside [0, levels − 1].
    """
    check_int("levels", levels, 2, " (e.g. 256 for 8-bit data)")
    k = torch.as_tensor(k)
    if k.ndim < 2 or k.shape[0] == 0:
        raise ValueError(f"data must be a non-empty batch of shape (B, ...), got {tuple(k.shape)}")
    dtype = dtype or torch.get_default_dtype()
    if k.is_floating_point():
        if not bool(torch.isfinite(k).all()):
            raise ValueError(
                "data contains NaN or inf: pass the raw integer levels k in {0..levels-1}"
            )
        if not bool((k == k.round()).all()):
            bad = float(k[k != k.round()][0])
            raise ValueError(
                f"data must be integer levels k in {{0..{levels - 1}}}, got non-integer values "
                f"(e.g. {bad:g}): pass the raw integer data (e.g. uint8 pixels 0..255), not data "
                "already scaled to [0, 1] or [-1, 1] or dequantized — this function dequantizes "
                "itself and takes the map to model space as scale and shift"
            )
    elif k.dtype == torch.bool or k.is_complex():
        raise ValueError(f"data must be integer levels, got dtype {k.dtype}")
    lo, hi = float(k.min()), float(k.max())
    if lo < 0 or hi > levels - 1:
        raise ValueError(
            f"data values span [{lo:g}, {hi:g}] but levels={levels} allows only "
            f"0..{levels - 1}: pass the right level count (e.g. 256 for 8-bit data, "
            "2**n_bits in general) or the unshifted integer data"
        )
    return k.to(dtype)


@dataclass(frozen=True)
class Dequantized:
    """A dequantized batch in model space and the entropy of its dequantization density.

    Attributes:
        y: model-space points, shaped like the data.
        entropy: H(q(·|k)) in nats, ``(B,)`` (the same for every example).
    """

    y: Tensor
    entropy: Tensor


def _check_map(scale: float, shift: float) -> None:
    if not (math.isfinite(scale) and scale > 0 and math.isfinite(shift)):
        raise ValueError(
            f"need a finite scale > 0 and a finite shift for y = scale·x + shift, got "
            f"scale={scale!r}, shift={shift!r} (e.g. scale=2, shift=-1 for [-1, 1])"
        )


def dequantize(
    k: Tensor,
    levels: int,
    scale: float = 1.0,
    shift: float = 0.0,
    *,
    method: Literal["uniform", "truncated_normal"] = "uniform",
    schedule: Schedule | None = None,
    t_min: float | None = None,
    generator: torch.Generator | None = None,
    dtype: torch.dtype | None = None,
) -> Dequantized:
    """Dequantize integer data and map it to model space (formulas in the module docstring).

    Args:
        k: integer levels in {0..levels−1}, shape ``(B, ...)`` (any integer or integral float
            dtype).
        levels: the number of levels L (any integer >= 2).
        scale, shift: the map y = scale·x + shift from the unit cube to model space.
        method: ``"uniform"`` or ``"truncated_normal"`` (i-DODE; needs ``schedule``).
        schedule, t_min: the diffusion whose α, σ at ``t_min`` (default ``schedule.t_min``)
            define the truncated normal.
        generator: the source of the noise.
        dtype: floating dtype of the result (default: torch's default dtype).

    Returns:
        :class:`Dequantized` with ``y`` and the entropy H(q(·|k)), shape ``(B,)``.

    Raises:
        ValueError: bad data or levels (:func:`check_levels`), bad scale/shift, unknown method,
            truncated normal without a schedule or with σ(t_min) = 0.
    """
    if method not in DEQUANTIZATIONS:
        raise ValueError(
            f"unknown dequantization {method!r}: choose one of {', '.join(DEQUANTIZATIONS)}"
        )
    _check_map(scale, shift)
    kf = check_levels(k, levels, dtype)
    b, d = kf.shape[0], kf[0].numel()
    u = torch.rand(kf.shape, generator=generator, dtype=kf.dtype, device=kf.device)
    if method == "uniform":
        y = to_model_space(kf, levels, scale, shift, u)
        entropy = d * math.log(scale / levels)
        return Dequantized(y, torch.full((b,), entropy, dtype=kf.dtype, device=kf.device))
    if schedule is None:
        raise ValueError(
            "dequantization='truncated_normal' needs the schedule (its α and σ at t_min define "
            "the truncated normal): pass schedule=..."
        )
    t = torch.tensor(schedule.t_min if t_min is None else t_min, dtype=torch.float64)
    schedule.check_time(t)
    alpha, sigma = (float(v) for v in schedule.alpha_sigma(t))
    if not sigma > 0:
        raise ValueError("truncated-normal dequantization needs σ(t_min) > 0: use t_min > 0")
    tau = alpha * scale / (2 * levels * sigma)
    z_mass = math.erf(tau / math.sqrt(2))  # Z = P(|N(0,1)| <= τ)
    # inverse-CDF draw of N(0, 1) truncated to [−τ, τ]: z = √2 erfinv((2u − 1) Z)
    z = math.sqrt(2) * torch.erfinv(((2 * u - 1) * z_mass).clamp(-1 + 1e-16, 1 - 1e-16))
    z = z.clamp(-tau, tau)
    y = alpha * to_model_space(kf, levels, scale, shift) + sigma * z
    phi = math.exp(-0.5 * tau**2) / math.sqrt(2 * math.pi)
    h1 = 0.5 * math.log(2 * math.pi * math.e) + math.log(sigma) + math.log(z_mass)
    entropy = d * (h1 - tau * phi / z_mass)
    return Dequantized(y, torch.full((b,), entropy, dtype=kf.dtype, device=kf.device))


def variational_dequantize(
    k: Tensor,
    levels: int,
    scale: float,
    shift: float,
    dequantizer: torch.nn.Module,
    *,
    generator: torch.Generator | None = None,
) -> Dequantized:
    r"""Dequantize integer data with a trained conditional flow u ~ q(· | k) and map to model
    space, y = scale·(k + u)/levels + shift (module docstring).

    Args:
        k: integer levels in {0..levels−1}, shape ``(B, C, H, W)``.
        levels: the number of levels L; must equal ``dequantizer.levels``.
        scale, shift: the map y = scale·x + shift from the unit cube to model space.
        dequantizer: a :class:`~sdelab.nets.dequantizer.Dequantizer` (any ``nn.Module`` with
            ``levels``, ``image_shape`` and ``dequantizer(k, generator) -> (u, log_q)``).
        generator: the source of the base noise.

    Returns:
        :class:`Dequantized` whose ``y`` is differentiable w.r.t. the dequantizer's parameters
        and whose ``entropy`` is the one-draw estimate −log q(u | k) + D log(scale/levels),
        ``(B,)``; so ``−log p_y(y) − entropy`` is a one-draw estimate of the bound on −log P(k)
        (nats), whose expectation over u is ≥ −log P(k).

    Raises:
        ValueError: bad data (:func:`check_levels`), bad scale/shift, or a dequantizer made for
            another level count or image shape (the message names the mismatch).
    """
    _check_map(scale, shift)
    if levels != dequantizer.levels:
        raise ValueError(
            f"the dequantizer was trained for {dequantizer.levels} levels but the data has "
            f"levels={levels}: train a dequantizer for this data"
        )
    dtype = next(dequantizer.parameters()).dtype
    kf = check_levels(k, levels, dtype)
    if tuple(kf.shape[1:]) != tuple(dequantizer.image_shape):
        raise ValueError(
            f"the dequantizer was trained on images of shape {tuple(dequantizer.image_shape)} "
            f"but the data has shape {tuple(kf.shape[1:])}: train a dequantizer for this data"
        )
    out = dequantizer(kf, generator=generator)
    d = kf[0].numel()
    y = to_model_space(kf, levels, scale, shift, out.u)
    return Dequantized(y, -out.log_q + d * math.log(scale / levels))
