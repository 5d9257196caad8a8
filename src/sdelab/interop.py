r"""Models trained elsewhere: diffusers and k-diffusion models as ``(score_fn, schedule)``.

Everything in sdelab meets at a plain ``score_fn(x, t)`` and a :class:`~sdelab.sde.Schedule`,
so a foreign model needs two things: its noise schedule as a continuous-time schedule, and its
network's output converted to a score. Then every sampler, the ODE likelihood, bits/dim and the
variational bounds run on it unchanged.

**diffusers DDPM/DDIM models** (:func:`from_diffusers`). A discrete chain with N training steps
has ᾱ_n = ∏_{i≤n} (1 − β_i), n = 0 … N−1. As Score-SDE does for its discrete DDPM models, step n
sits at time t_n = n/(N − 1) ∈ [0, 1] and the network's timestep input is t·(N − 1). The
continuous schedule is :class:`DiscreteVPSchedule`: B(t) = −log ᾱ(t) through the knots
(t_n, −log ᾱ_n) by monotone cubic (PCHIP) interpolation, α = e^{−B/2}, σ² = 1 − e^{−B}. So it
equals the scheduler's ``alphas_cumprod`` at every integer step (to float64 rounding), is C¹
with a strictly decreasing log-SNR, and its exact chain between two steps,
:meth:`DiscreteVPSchedule.transition`, is DDPM's: α_{t|s}² = ᾱ_t/ᾱ_s = 1 − β. sdelab's
``ancestral`` sampler on the times of ``scheduler.timesteps`` with ``denoise=True`` is then
``DDPMScheduler.step``'s chain (``variance_type="fixed_small"``, no clipping).

Why this interpolation (``benchmarks/bench_interop.py`` measures it): built from the even steps
of the 1000-step schedules and compared at the odd ones, PCHIP in log ᾱ errs by max|Δᾱ| =
6e-7 (linear β), 7e-8 (scaled_linear), 1e-6 (squaredcos_cap_v2); piecewise-linear log ᾱ
(constant β within a step) by 1e-5, 3e-6, 2e-6; interpolating the log-SNR instead is 20–3000×
worse on the first two. A linear-β VP fitted by least squares to −log ᾱ_n misses the integer
steps themselves by 2e-3 (linear), 6e-2 (scaled_linear), 0.46 (cosine), so it is no option.
Being C¹, the PCHIP schedule also costs an adaptive ODE solver 25 % fewer steps than the
piecewise-linear one on a trained model (same bits/dim).

The smallest noise level is step 0's, σ_0 = √β_0 (0.01 for the standard linear schedule): the
schedule starts at t_min = 0 there, and ODE likelihoods are of x at step 0 (a valid density;
its bits/dim bound −log P(k) as usual).

**diffusers VE models** (``ScoreSdeVeScheduler``): the network takes σ_t and returns the score,
as in diffusers' Score-SDE VE pipeline; the schedule is sdelab's :class:`~sdelab.sde.VESchedule`
with the scheduler's σ_min, σ_max and ``sampling_eps`` as t_min.

**k-diffusion / EDM denoisers** (:func:`from_k_diffusion`): any callable D(x, σ) ≈ E[x_0 | x_σ]
with x_σ = x_0 + σ ε. The score is (D(x, σ) − x)/σ², the schedule a VE with σ from σ_min at
t = 0 to σ_max at t = 1 (the probability-flow ODE does not depend on how σ is parametrised by t).

:func:`load_diffusers` reads a ``save_pretrained`` folder from disk (never downloads).
diffusers is an optional extra: ``pip install 'sdelab[diffusers]'``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from sdelab.parametrization import ScoreModel
from sdelab.sde import LogSNRSchedule, Schedule, VESchedule
from sdelab.utils import append_dims, batch_time

__all__ = [
    "DiffusersModel",
    "DiscreteVPSchedule",
    "from_diffusers",
    "from_k_diffusion",
    "load_diffusers",
]

D64 = torch.float64

#: diffusers' prediction_type -> sdelab's output kind (the converter in parametrization.py).
PREDICTION_KINDS: dict[str, str] = {"epsilon": "eps", "sample": "x0", "v_prediction": "v"}
#: Scheduler classes by name (their config's ``_class_name``): discrete VP chains and VE.
VP_SCHEDULERS: tuple[str, ...] = ("DDPMScheduler", "DDIMScheduler")
VE_SCHEDULERS: tuple[str, ...] = ("ScoreSdeVeScheduler",)


class DiscreteVPSchedule(LogSNRSchedule):
    r"""Variance-preserving schedule through a discrete chain's ᾱ_0 > … > ᾱ_{N−1} > 0.

    Step n sits at t_n = n/(N − 1); between steps, B(t) = −log ᾱ(t) is the monotone cubic
    (Fritsch–Carlson PCHIP) interpolant of the knots (t_n, −log ᾱ_n), or with
    ``interpolation="linear"`` the piecewise-linear one (β constant within a step). Then
    α_t = e^{−B/2}, σ_t² = 1 − e^{−B}, λ = −log(e^B − 1), prior N(0, I). All values are computed
    in float64 and returned in ``t``'s dtype.

    Args:
        alphas_cumprod: ``(N,)`` the chain's ᾱ_n (e.g. a diffusers scheduler's
            ``alphas_cumprod``), strictly decreasing in (0, 1), N ≥ 2.
        interpolation: ``"pchip"`` (default; C¹, third order) or ``"linear"``.
        t_min: first time (default 0 = step 0, σ = √(1 − ᾱ_0)).

    Raises:
        ValueError: ᾱ not strictly decreasing in (0, 1) (e.g. zero terminal SNR), fewer than two
            steps, or an unknown interpolation.
    """

    def __init__(
        self,
        alphas_cumprod: Tensor | np.ndarray | list[float],
        interpolation: str = "pchip",
        t_min: float = 0.0,
    ) -> None:
        super().__init__(t_min, 1.0)
        ac = torch.as_tensor(alphas_cumprod).detach().to("cpu", D64).reshape(-1)
        if ac.numel() < 2:
            raise ValueError(f"a discrete chain needs >= 2 steps, got {ac.numel()}")
        if not bool(((ac > 0) & (ac < 1)).all()):
            raise ValueError(
                "alphas_cumprod must lie in (0, 1): a zero terminal SNR (ᾱ_{N-1} = 0, e.g. "
                "rescale_betas_zero_snr=True) has log-SNR −∞ at T; build the scheduler without it"
            )
        if not bool((ac[1:] < ac[:-1]).all()):
            raise ValueError("alphas_cumprod must be strictly decreasing (every β_n > 0)")
        if interpolation not in ("pchip", "linear"):
            raise ValueError(f"unknown interpolation {interpolation!r}: choose pchip or linear")
        self.interpolation = interpolation
        self.num_steps = int(ac.numel())
        knots_t = torch.arange(self.num_steps, dtype=D64) / (self.num_steps - 1)
        knots_B = -torch.log(ac)
        self.register_buffer("alphas_cumprod", ac, persistent=False)
        self.register_buffer("knots_t", knots_t, persistent=False)
        # coefficients of B on each interval in the local variable u = t − t_n: c0 u³ + … + c3
        self.register_buffer("coeffs", _piecewise_cubic(knots_t, knots_B, interpolation), False)

    # ---- B(t) = −log ᾱ(t) and its derivative, in float64 --------------------------------------
    def _B(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """B(t) and dB/dt in float64, shaped like ``t``."""
        tt = t.to(D64)
        flat = tt.reshape(-1)
        knots = self.knots_t.to(flat.device)
        coeffs = self.coeffs.to(flat.device)
        i = (torch.searchsorted(knots, flat.detach().contiguous(), right=True) - 1).clamp(
            0, knots.numel() - 2
        )
        u = flat - knots[i]
        c0, c1, c2, c3 = coeffs[:, i]
        B = ((c0 * u + c1) * u + c2) * u + c3
        dB = (3 * c0 * u + 2 * c1) * u + c2
        return B.reshape(tt.shape), dB.reshape(tt.shape)

    def alpha_sigma(self, t):
        B, _ = self._B(t)
        return torch.exp(-0.5 * B).to(t.dtype), (-torch.expm1(-B)).sqrt().to(t.dtype)

    def log_snr(self, t):
        B, _ = self._B(t)
        return (-torch.log(torch.expm1(B))).to(t.dtype)

    def d_log_snr(self, t):
        B, dB = self._B(t)
        return (-dB / -torch.expm1(-B)).to(t.dtype)

    def log_snr_and_derivative(self, t):
        B, dB = self._B(t)
        return (-torch.log(torch.expm1(B))).to(t.dtype), (-dB / -torch.expm1(-B)).to(t.dtype)

    def t_of_log_snr(self, log_snr):
        # B = log(1 + e^{−λ}) is increasing in t: bisect on B, which is exact at the knots
        target = nn.functional.softplus(-log_snr.detach().to(D64))
        lo = torch.full_like(target, self.t_min)
        hi = torch.full_like(target, self.T)
        for _ in range(64):
            mid = 0.5 * (lo + hi)
            below = self._B(mid)[0] < target
            lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
        return (0.5 * (lo + hi)).to(log_snr.dtype)

    def transition(self, s: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """The chain between s < t: α_{t|s} = √(ᾱ_t/ᾱ_s) and σ_{t|s}² = 1 − ᾱ_t/ᾱ_s (DDPM's
        1 − α_t/α_{t−1} = β between adjacent steps), in float64 then ``t``'s dtype."""
        dB = self._B(t)[0] - self._B(s)[0]
        dtype = torch.promote_types(torch.as_tensor(s).dtype, torch.as_tensor(t).dtype)
        return torch.exp(-0.5 * dB).to(dtype), (-torch.expm1(-dB)).clamp_min(0).sqrt().to(dtype)

    # ---- the network's time and the chain's steps ---------------------------------------------
    def net_time(self, t: Tensor) -> Tensor:
        """The network's timestep input t·(N − 1) (Score-SDE's labels for discrete models)."""
        return torch.as_tensor(t) * (self.num_steps - 1)

    def step_times(self, steps: Tensor | list[int] | np.ndarray) -> Tensor:
        """Float64 times t_n = n/(N − 1) of integer steps n, e.g. ``scheduler.timesteps`` (a
        decreasing list gives a sampler grid; ``sample(..., grid=schedule.step_times(...))``)."""
        n = torch.as_tensor(np.asarray(steps)).to(D64)
        if bool(((n < 0) | (n > self.num_steps - 1) | (n != n.round())).any()):
            raise ValueError(f"steps must be integers in [0, {self.num_steps - 1}]")
        return n / (self.num_steps - 1)

    def extra_repr(self):
        return f"steps={self.num_steps}, interpolation={self.interpolation}, t_min={self.t_min:g}"


def _piecewise_cubic(x: Tensor, y: Tensor, kind: str) -> Tensor:
    """``(4, N−1)`` float64 local power-basis coefficients of the PCHIP (or linear) interpolant."""
    if kind == "linear":
        slope = (y[1:] - y[:-1]) / (x[1:] - x[:-1])
        zero = torch.zeros_like(slope)
        return torch.stack([zero, zero, slope, y[:-1]])
    from scipy.interpolate import PchipInterpolator  # Fritsch–Carlson, monotone

    pp = PchipInterpolator(x.numpy(), y.numpy())
    return torch.from_numpy(np.ascontiguousarray(pp.c)).to(D64)


# ---- diffusers ------------------------------------------------------------------------------
def _config(obj: Any) -> dict:
    cfg = getattr(obj, "config", None)
    if cfg is None:
        raise ValueError(f"{type(obj).__name__} has no .config: pass a diffusers model/scheduler")
    return dict(cfg)


def _is_vp_chain(scheduler: Any) -> bool:
    """A DDPM/DDIM scheduler, or one diffusers declares compatible with DDPMScheduler (the same
    β chain, another sampler: PNDM, Euler, DPM-Solver, …) that carries ``alphas_cumprod``."""
    name = type(scheduler).__name__
    if name in VP_SCHEDULERS:
        return True
    compatible = getattr(scheduler, "_compatibles", None) or []
    return (
        "DDPMScheduler" in compatible
        and not name.startswith("EDM")  # EDM schedulers are σ-parametrised, not a β chain
        and getattr(scheduler, "alphas_cumprod", None) is not None
    )


class DiffusersUNet(nn.Module):
    """A diffusers ``UNet2DModel`` as ``net(x, τ) -> (B, C, H, W)``: its ``.sample``, with the
    learned-variance half of the channels dropped, at the UNet's dtype, returned in ``x``'s dtype.
    ``snap=True`` rounds τ to the nearest integer step (for integer-only time embeddings)."""

    def __init__(self, unet: nn.Module, *, drop_variance: bool = False, snap: bool = False):
        super().__init__()
        self.unet = unet
        self.drop_variance = drop_variance
        self.snap = snap

    def forward(self, x: Tensor, tau: Tensor) -> Tensor:
        dtype = next(self.unet.parameters()).dtype
        tau = tau.round().long() if self.snap else tau.to(dtype)
        out = self.unet(x.to(dtype), tau).sample
        if self.drop_variance:
            out = out[:, : x.shape[1]]
        return out.to(x.dtype)


class _VEScoreNet(nn.Module):
    """Score of a diffusers VE UNet: ``unet(x, σ_t).sample`` as in diffusers' Score-SDE VE
    pipeline (with ``time_embedding_type="fourier"`` the UNet divides its output by σ)."""

    def __init__(self, unet: nn.Module, schedule: Schedule) -> None:
        super().__init__()
        self.unet = unet
        self.schedule = schedule

    def forward(self, x: Tensor, t: Tensor | float) -> Tensor:
        t = batch_time(t, x)
        dtype = next(self.unet.parameters()).dtype
        sigma = self.schedule.alpha_sigma(t)[1]
        return self.unet(x.to(dtype), sigma.to(dtype)).sample.to(x.dtype)


def from_diffusers(
    unet: nn.Module,
    scheduler: Any,
    *,
    snap_to_steps: bool = False,
    interpolation: str = "pchip",
) -> tuple[nn.Module, Schedule]:
    """A diffusers ``UNet2DModel`` and its scheduler as sdelab's ``(score_fn, schedule)``.

    Supports ``DDPMScheduler`` / ``DDIMScheduler`` and the β-chain schedulers diffusers declares
    DDPM-compatible (PNDM, Euler, DPM-Solver, …: same chain, another sampler), with
    ``beta_schedule`` linear, scaled_linear,
    squaredcos_cap_v2 or ``trained_betas``: whatever gives its ``alphas_cumprod``;
    ``prediction_type`` epsilon, sample or v_prediction; UNets with 2C output channels for a
    learned variance have that half dropped: sdelab's ancestral step uses DDPM's fixed β̃) and
    ``ScoreSdeVeScheduler`` (VE). See the module docstring for the time map t_n = n/(N − 1)
    and the schedule. diffusers' ``clip_sample`` and thresholding clip x̂_0 inside its
    sampler; they are not part of the model and are not applied here.

    Args:
        unet: a ``UNet2DModel`` (or a module with its call ``unet(x, timestep).sample`` and its
            ``config``), in eval mode on the device you will use.
        scheduler: the model's scheduler (its config is read; it is not stepped).
        snap_to_steps: for time embeddings that accept integers only
            (``time_embedding_type="learned"``): feed the network round(t·(N − 1)). Exact on
            integer-step grids (the DDPM/DDIM chains); off the grid the network sees a noise
            level up to half a step away from x's, which biases ODE likelihoods (measured in
            ``benchmarks/bench_interop.py``). Refused for VE models.
        interpolation: ``"pchip"`` or ``"linear"`` in log ᾱ (:class:`DiscreteVPSchedule`).

    Returns:
        ``(score_fn, schedule)``: ``score_fn(x, t)`` with x of shape ``(B, C, H, W)`` and t a
        scalar or ``(B,)`` (an ``nn.Module``; for VP models a
        :class:`~sdelab.parametrization.ScoreModel`, so ``score_fn.predict(x, t, "x0")`` works),
        and a :class:`DiscreteVPSchedule` or :class:`~sdelab.sde.VESchedule`.

    Raises:
        ValueError: an unsupported scheduler or prediction type, output channels that are
            neither C nor 2C, or an integer-only time embedding without ``snap_to_steps=True``.

    Example::

        unet = UNet2DModel.from_pretrained(path, subfolder="unet", local_files_only=True)
        sched = DDPMScheduler.from_pretrained(path, subfolder="scheduler", local_files_only=True)
        score_fn, schedule = from_diffusers(unet.eval(), sched)
        res = sample(score_fn, schedule, (16, 3, 32, 32), sampler="dpm_solver", steps=20)
    """
    ucfg, scfg = _config(unet), _config(scheduler)
    name = type(scheduler).__name__
    embedding = ucfg.get("time_embedding_type", "positional")
    c_in = int(ucfg.get("in_channels", 3))
    c_out = int(ucfg.get("out_channels", c_in))
    if name in VE_SCHEDULERS:
        if embedding == "learned":
            raise ValueError(
                "a VE model conditions on σ, a real number: an integer-only (learned) time "
                "embedding cannot be used with ScoreSdeVeScheduler"
            )
        if c_out != c_in:
            raise ValueError(f"a VE score UNet must return {c_in} channels, its config has {c_out}")
        schedule = VESchedule(
            float(scfg["sigma_min"]), float(scfg["sigma_max"]), t_min=float(scfg["sampling_eps"])
        )
        return _VEScoreNet(unet, schedule), schedule
    if not _is_vp_chain(scheduler):
        raise ValueError(
            f"unsupported scheduler {name}: sdelab reads {', '.join(VP_SCHEDULERS + VE_SCHEDULERS)}"
            " and the β-chain schedulers diffusers lists as DDPM-compatible (PNDM, Euler, …)"
        )
    prediction = scfg.get("prediction_type", "epsilon")
    if prediction not in PREDICTION_KINDS:
        raise ValueError(
            f"unsupported prediction_type {prediction!r}: choose one of "
            f"{', '.join(PREDICTION_KINDS)}"
        )
    if embedding == "learned" and not snap_to_steps:
        raise ValueError(
            "this UNet's time embedding (time_embedding_type='learned') accepts integer steps "
            "only: pass snap_to_steps=True to round t·(N-1) (exact on integer-step grids)"
        )
    if c_out not in (c_in, 2 * c_in):
        raise ValueError(
            f"the UNet returns {c_out} channels for {c_in} input channels: expected {c_in} "
            f"(a prediction) or {2 * c_in} (prediction and learned variance)"
        )
    schedule = DiscreteVPSchedule(scheduler.alphas_cumprod, interpolation=interpolation)
    net = DiffusersUNet(unet, drop_variance=c_out == 2 * c_in, snap=snap_to_steps)
    return ScoreModel(net, schedule, parametrization=PREDICTION_KINDS[prediction]), schedule


# ---- k-diffusion / EDM ------------------------------------------------------------------------
class _DenoiserScore(nn.Module):
    """Score (D(x, σ) − x)/σ² of a denoiser D on the VE schedule x_σ = x_0 + σ ε."""

    def __init__(self, denoiser: Callable[[Tensor, Tensor], Tensor], schedule: Schedule) -> None:
        super().__init__()
        self.denoiser = denoiser
        self.schedule = schedule

    def forward(self, x: Tensor, t: Tensor | float) -> Tensor:
        sigma = self.schedule.alpha_sigma(batch_time(t, x))[1]
        s = append_dims(sigma, x.ndim)
        return (self.denoiser(x, sigma) - x) / s**2


def from_k_diffusion(
    denoiser: Callable[[Tensor, Tensor], Tensor],
    sigma_min: float,
    sigma_max: float,
) -> tuple[nn.Module, VESchedule]:
    """A k-diffusion / EDM denoiser D(x, σ) as ``(score_fn, schedule)``; no k-diffusion needed.

    Args:
        denoiser: any callable ``D(x, sigma) -> x̂_0`` with x of shape ``(B, ...)`` and sigma of
            shape ``(B,)`` (k-diffusion's ``Denoiser``/``VDenoiser`` wrappers, EDM's
            ``EDMPrecond``, a plain function), for x_σ = x_0 + σ ε.
        sigma_min, sigma_max: the noise range to use; the model is run on σ ∈ [σ_min, σ_max].

    Returns:
        ``(score_fn, schedule)``: the score (D(x, σ_t) − x)/σ_t² (an ``nn.Module``; a module
        denoiser's parameters are its own) and ``VESchedule(sigma_min, sigma_max, t_min=0)``,
        σ_t = σ_min (σ_max/σ_min)^t, prior N(0, σ_max² I).

    Raises:
        ValueError: unless 0 < sigma_min < sigma_max, or if ``denoiser`` is not callable.
    """
    if not callable(denoiser):
        raise ValueError("denoiser must be a callable D(x, sigma) -> denoised x")
    if not (math.isfinite(sigma_min) and math.isfinite(sigma_max) and 0 < sigma_min < sigma_max):
        raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
    schedule = VESchedule(float(sigma_min), float(sigma_max), t_min=0.0)
    return _DenoiserScore(denoiser, schedule), schedule


# ---- loading a save_pretrained folder ------------------------------------------------------
@dataclass
class DiffusersModel:
    """A diffusers model read from disk by :func:`load_diffusers`.

    Attributes:
        score_fn, schedule: the model in sdelab's terms (see :func:`from_diffusers`).
        image_shape: ``(C, H, W)`` of one sample.
        data_range: ``(-1.0, 1.0)``: diffusers image models work on pixels mapped to [−1, 1].
        scale, shift: the map y = scale·x + shift from [0, 1] to model space (2 and −1), as
            :func:`~sdelab.likelihood.dequantization.bits_per_dim` takes it.
        kind: ``"vp"`` (DDPM/DDIM chain) or ``"ve"``.
        num_train_timesteps: N of the chain (VE: the scheduler's ``num_train_timesteps``).
        prediction_type: diffusers' ``prediction_type`` (``"score"`` for VE).
        unet, scheduler: the diffusers objects.
        path: the folder read.
    """

    score_fn: nn.Module
    schedule: Schedule
    image_shape: tuple[int, int, int]
    data_range: tuple[float, float]
    scale: float
    shift: float
    kind: str
    num_train_timesteps: int
    prediction_type: str
    unet: nn.Module
    scheduler: Any
    path: Path

    @property
    def channels(self) -> int:
        return self.image_shape[0]

    def describe(self) -> str:
        """One line for logs and reports."""
        c, h, w = self.image_shape
        return (
            f"diffusers {type(self.unet).__name__} + {type(self.scheduler).__name__} from "
            f"{self.path} ({self.kind}, {self.prediction_type}, N={self.num_train_timesteps}, "
            f"{c}x{h}x{w}, data in [{self.data_range[0]:g}, {self.data_range[1]:g}])"
        )


def _import_diffusers():
    try:
        import diffusers
    except ImportError as e:
        raise ImportError(
            "reading diffusers models needs the optional extra: pip install 'sdelab[diffusers]'"
        ) from e
    return diffusers


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {path}: {e}") from e


def _scheduler_dir(path: Path, scheduler: str | Path | None) -> Path:
    """The folder (or JSON file) holding the scheduler's config."""
    if scheduler is not None:
        p = Path(scheduler)
        if p.is_dir() and (p / "scheduler_config.json").is_file():
            return p
        if p.is_file() and p.suffix == ".json":
            return p
        raise ValueError(
            f"scheduler {p} is neither a folder with scheduler_config.json nor a JSON file"
        )
    for candidate in (path / "scheduler", path):
        if (candidate / "scheduler_config.json").is_file():
            return candidate
    raise ValueError(
        f"no scheduler config under {path}: expected scheduler/scheduler_config.json (a pipeline "
        "folder) or scheduler_config.json beside the UNet's config.json; or pass scheduler=PATH"
    )


def load_diffusers(
    path: str | Path,
    *,
    scheduler: str | Path | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    snap_to_steps: bool = False,
    interpolation: str = "pchip",
) -> DiffusersModel:
    """Read a diffusers ``save_pretrained`` folder from disk as an sdelab model (no download).

    Accepted layouts:

    - a pipeline folder (``DDPMPipeline.save_pretrained``): ``unet/`` with ``config.json`` and
      weights, ``scheduler/scheduler_config.json`` (``model_index.json`` is not needed);
    - a bare UNet folder (``UNet2DModel.save_pretrained``) with ``scheduler_config.json`` beside
      its ``config.json``, or any scheduler given by ``scheduler=``.

    Args:
        path: the folder.
        scheduler: a scheduler folder or ``scheduler_config.json`` file, overriding the one found
            in ``path``.
        device, dtype: where and in which dtype to put the UNet (default: CPU, its saved dtype).
        snap_to_steps, interpolation: see :func:`from_diffusers`.

    Returns:
        :class:`DiffusersModel` with ``score_fn``, ``schedule``, ``image_shape`` ``(C, H, W)``,
        ``data_range`` (−1, 1), ``scale``/``shift`` (2, −1) for bits/dim, and the diffusers
        objects. The UNet is in eval mode.

    Raises:
        ImportError: diffusers is not installed (the message names the extra).
        ValueError: a missing folder or config, a model other than ``UNet2DModel``, an
            unsupported scheduler, weights that cannot be read (truncated, damaged) or are not
            finite, or any error of :func:`from_diffusers`.
    """
    diffusers = _import_diffusers()
    path = Path(path).expanduser()
    if not path.is_dir():
        raise ValueError(f"{path} is not a folder: pass a diffusers save_pretrained directory")
    unet_dir = path / "unet" if (path / "unet" / "config.json").is_file() else path
    if not (unet_dir / "config.json").is_file():
        raise ValueError(
            f"no UNet config under {path}: expected unet/config.json (a pipeline folder) or "
            "config.json (a UNet2DModel.save_pretrained folder)"
        )
    model_class = _read_json(unet_dir / "config.json").get("_class_name")
    if model_class != "UNet2DModel":
        raise ValueError(
            f"{unet_dir} holds a {model_class}: sdelab reads unconditional pixel-space "
            "UNet2DModel models only"
        )
    sched_loc = _scheduler_dir(path, scheduler)
    sched_cfg = _read_json(
        sched_loc if sched_loc.is_file() else sched_loc / "scheduler_config.json"
    )
    sched_name = sched_cfg.get("_class_name")
    sched_cls = getattr(diffusers, str(sched_name), None)
    if sched_cls is None or not hasattr(sched_cls, "from_config"):
        raise ValueError(
            f"unknown scheduler class {sched_name!r} in {sched_loc}: expected a diffusers "
            f"scheduler such as {', '.join(VP_SCHEDULERS + VE_SCHEDULERS)}"
        )
    if sched_loc.is_file():
        sched = sched_cls.from_config(sched_cfg)
    else:
        sched = sched_cls.from_pretrained(sched_loc, local_files_only=True)
    try:
        unet = diffusers.UNet2DModel.from_pretrained(
            unet_dir, local_files_only=True, low_cpu_mem_usage=False, torch_dtype=dtype
        )
    except (ImportError, MemoryError):
        raise
    except Exception as e:  # a truncated or damaged weights file: diffusers' own error types
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise ValueError(
            f"cannot read the UNet weights in {unet_dir} ({type(e).__name__}: {first}): the "
            "file is truncated or damaged; save or download the model again"
        ) from None
    bad = sum(int((~torch.isfinite(p)).sum()) for p in unet.parameters())
    if bad:
        total = sum(p.numel() for p in unet.parameters())
        raise ValueError(
            f"{bad:,} of the {total:,} UNet weights in {unet_dir} are NaN or inf: the weights "
            "file is damaged (or saved from a diverged model); save or download it again"
        )
    if device is not None:
        unet = unet.to(device)
    unet = unet.eval().requires_grad_(False)  # evaluation only
    score_fn, schedule = from_diffusers(
        unet, sched, snap_to_steps=snap_to_steps, interpolation=interpolation
    )
    if device is not None:  # the schedule's knot tables too (they live in float64)
        score_fn, schedule = score_fn.to(device), schedule.to(device)
    cfg = dict(unet.config)
    size = cfg.get("sample_size") or 32
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    kind = "ve" if sched_name in VE_SCHEDULERS else "vp"
    return DiffusersModel(
        score_fn=score_fn,
        schedule=schedule,
        image_shape=(int(cfg.get("in_channels", 3)), int(h), int(w)),
        data_range=(-1.0, 1.0),
        scale=2.0,
        shift=-1.0,
        kind=kind,
        num_train_timesteps=(
            schedule.num_steps if kind == "vp" else int(sched.config.num_train_timesteps)
        ),
        prediction_type="score" if kind == "ve" else sched.config.prediction_type,
        unet=unet,
        scheduler=sched,
        path=path,
    )
