r"""Noise schedules, which *are* the SDEs.

Every forward process in sdelab is a linear Gaussian diffusion

    x_t = α_t x_0 + σ_t ε,   ε ~ N(0, I),   t ∈ [t_min, T],

and the schedule (α_t, σ_t) fixes the Itô SDE dx = f(t) x dt + g(t) dw through

    f(t)  = d log α_t / dt,
    g(t)² = dσ_t²/dt − 2 f(t) σ_t²,

with log-SNR λ_t = log(α_t² / σ_t²) (VDM's γ_t is −λ_t). One identity ties them together
for every schedule: g²/σ² = −dλ/dt.

A schedule is a small :class:`torch.nn.Module` (so a learned schedule can carry parameters).
Calling it on a tensor of times returns a :class:`ScheduleOutput` with α, σ, their time
derivatives, f, g², λ and dλ/dt, all of the same shape as ``t``. A new schedule needs only
:meth:`Schedule.alpha_sigma`; derivatives then come from forward-mode autograd and the inverse
t(λ) from bisection. The built-in schedules override those with closed forms.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from sdelab.utils import append_dims, sum_except_batch

__all__ = [
    "SCHEDULES",
    "CosineSchedule",
    "FunctionSchedule",
    "LearnedLinearSchedule",
    "LogSNRSchedule",
    "MonotoneNetSchedule",
    "Schedule",
    "ScheduleOutput",
    "SubVPSchedule",
    "TutorialSchedule",
    "VDMLinearSchedule",
    "VESchedule",
    "VPSchedule",
    "make_schedule",
]

#: Relative slack when checking that t lies in [t_min, T] (float rounding of grid end points).
_TIME_TOL = 1e-6


@dataclass(frozen=True)
class ScheduleOutput:
    """Values of a schedule at times ``t`` (every field has ``t``'s shape).

    Attributes:
        t: the times.
        alpha, sigma: signal and noise scales, x_t = α x_0 + σ ε.
        d_alpha, d_sigma: their time derivatives.
        log_snr: λ = log(α²/σ²).  d_log_snr: dλ/dt (negative).
        f: SDE drift coefficient d log α/dt.  g2: squared diffusion coefficient g².
    """

    t: Tensor
    alpha: Tensor
    sigma: Tensor
    d_alpha: Tensor
    d_sigma: Tensor
    log_snr: Tensor
    d_log_snr: Tensor
    f: Tensor
    g2: Tensor

    @property
    def g(self) -> Tensor:
        """Diffusion coefficient g(t) = sqrt(g²)."""
        return self.g2.clamp_min(0).sqrt()


class Schedule(nn.Module):
    """Base class of all schedules / SDEs on the time interval ``[t_min, T]``.

    Subclasses implement :meth:`alpha_sigma`; everything else has a generic default that a
    subclass may override with a closed form (derivatives, log-SNR, its inverse, f, g²).
    """

    def __init__(self, t_min: float, T: float = 1.0) -> None:
        super().__init__()
        if not (math.isfinite(t_min) and math.isfinite(T)) or not 0 <= t_min < T:
            raise ValueError(f"need 0 <= t_min < T, got t_min={t_min}, T={T}")
        self.t_min = float(t_min)
        self.T = float(T)

    # ---- what a subclass must give -------------------------------------------------------
    def alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """Return (α_t, σ_t), elementwise in ``t``."""
        raise NotImplementedError  # abstract: every schedule defines its α and σ

    # ---- learned schedules ---------------------------------------------------------------
    def net_time(self, t: Tensor) -> Tensor:
        """The time input of the network at ``t`` (default: ``t`` itself).

        A learned schedule whose shape changes with its parameters overrides this with its
        normalised γ, as VDM conditions its network on γ_t, so that ε̂ is a function of the
        log-SNR and the continuous VLB depends on the shape only through the end points.
        """
        return t

    def shape_parameters(self) -> list[nn.Parameter]:
        """Parameters that change γ's shape but not its end points (default: none).

        VDM trains these by minimising the variance of the diffusion loss
        (:func:`sdelab.vdm.variance_gradient_step`); every other parameter of a schedule
        (e.g. learned end points) gets the gradient of the VLB itself.
        """
        return []

    # ---- generic defaults (override with closed forms where they exist) -------------------
    def derivatives(self, t: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Return (α, σ, dα/dt, dσ/dt); default: forward-mode autograd of :meth:`alpha_sigma`."""
        t = t.contiguous()  # jvp cannot take expanded (stride-0) tensors
        (alpha, sigma), (d_alpha, d_sigma) = torch.func.jvp(
            self.alpha_sigma, (t,), (torch.ones_like(t),)
        )
        return alpha, sigma, d_alpha, d_sigma

    def log_snr(self, t: Tensor) -> Tensor:
        """λ_t = log(α_t² / σ_t²)."""
        alpha, sigma = self.alpha_sigma(t)
        return 2 * (alpha.log() - sigma.log())

    def d_log_snr(self, t: Tensor) -> Tensor:
        """dλ/dt = 2 (α'/α − σ'/σ)."""
        alpha, sigma, d_alpha, d_sigma = self.derivatives(t)
        return 2 * (d_alpha / alpha - d_sigma / sigma)

    def t_of_log_snr(self, log_snr: Tensor) -> Tensor:
        """Inverse of λ(t) on [t_min, T]; default: vectorised bisection in float64.

        λ is strictly decreasing, so 64 halvings of [t_min, T] reach float64 resolution.
        Values outside [λ(T), λ(t_min)] are clamped to the end points.
        """
        lam = log_snr.detach().to(torch.float64)
        lo = torch.full_like(lam, self.t_min)
        hi = torch.full_like(lam, self.T)
        with torch.no_grad():
            for _ in range(64):
                mid = 0.5 * (lo + hi)
                above = self.log_snr(mid) > lam  # λ(mid) too large -> root lies later
                lo = torch.where(above, mid, lo)
                hi = torch.where(above, hi, mid)
        return (0.5 * (lo + hi)).to(log_snr.dtype)

    def f(self, t: Tensor) -> Tensor:
        """Drift coefficient f(t) = d log α / dt."""
        alpha, _, d_alpha, _ = self.derivatives(t)
        return d_alpha / alpha

    def g2(self, t: Tensor) -> Tensor:
        """Squared diffusion g(t)² = dσ²/dt − 2 f σ²."""
        alpha, sigma, d_alpha, d_sigma = self.derivatives(t)
        return 2 * sigma * d_sigma - 2 * (d_alpha / alpha) * sigma**2

    @property
    def prior_std(self) -> float:
        """Standard deviation s of the prior N(0, s² I) at time T (default: σ_T)."""
        t = torch.tensor(self.T, dtype=torch.float64)
        return float(self.alpha_sigma(t)[1])

    # ---- public API ----------------------------------------------------------------------
    def check_time(self, t: Tensor) -> None:
        """Raise ``ValueError`` if any time lies outside [t_min, T] (one host sync)."""
        if t.numel() == 0:
            return
        tol = _TIME_TOL * max(1.0, self.T)
        bad = (t < self.t_min - tol) | (t > self.T + tol) | ~torch.isfinite(t)
        if not bool(bad.any()):
            return
        if not bool(torch.isfinite(t).all()):
            raise ValueError("time contains NaN or inf: pass finite times in [t_min, T]")
        lo, hi = float(t.min()), float(t.max())
        raise ValueError(
            f"time range [{lo:.6g}, {hi:.6g}] leaves the schedule's interval "
            f"[t_min={self.t_min:.6g}, T={self.T:.6g}]: clamp t or build the schedule "
            "with a wider t_min/T"
        )

    def forward(self, t: Tensor | float) -> ScheduleOutput:
        """All schedule quantities at times ``t`` (any shape), checked to lie in [t_min, T]."""
        t = torch.as_tensor(t, dtype=torch.get_default_dtype()) if not torch.is_tensor(t) else t
        if not t.is_floating_point():
            t = t.to(torch.get_default_dtype())
        self.check_time(t)
        return self._values(t)

    def _values(self, t: Tensor) -> ScheduleOutput:
        alpha, sigma, d_alpha, d_sigma = self.derivatives(t)
        return ScheduleOutput(
            t=t,
            alpha=alpha,
            sigma=sigma,
            d_alpha=d_alpha,
            d_sigma=d_sigma,
            log_snr=self.log_snr(t),
            d_log_snr=self.d_log_snr(t),
            f=self.f(t),
            g2=self.g2(t),
        )

    def sde(self, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """Forward SDE coefficients: drift f(t)·x and diffusion g(t) broadcast to ``x``."""
        out = self(t)
        return append_dims(out.f, x.ndim) * x, append_dims(out.g, x.ndim)

    def reverse_sde(
        self, x: Tensor, t: Tensor, score: Tensor, lam: float = 0.0
    ) -> tuple[Tensor, Tensor]:
        """Drift and diffusion of the λ-family of reverse processes (sdeflow-light, App. C):

            dx = [f x − (1 − λ/2) g² s] dt + √(1 − λ) g dw̄,   time running from T to t_min.

        λ = 0 is Anderson's reverse SDE, λ = 1 the probability-flow ODE; every λ ∈ [0, 1]
        has the same marginals p_t when ``score`` is exact. Returns (drift, diffusion), both
        broadcast to ``x``; ``t`` is a scalar or ``(B,)``.
        """
        if not 0.0 <= lam <= 1.0:
            raise ValueError(f"lam must lie in [0, 1] (0: reverse SDE, 1: ODE), got {lam}")
        out = self(t)
        f, g2 = append_dims(out.f, x.ndim), append_dims(out.g2, x.ndim)
        drift = f * x - (1.0 - 0.5 * lam) * g2 * score
        return drift, ((1.0 - lam) * g2).clamp_min(0).sqrt().expand_as(x)

    def probability_flow(self, x: Tensor, t: Tensor, score: Tensor) -> Tensor:
        """Velocity of the probability-flow ODE, dx/dt = f x − ½ g² s (λ = 1 above)."""
        return self.reverse_sde(x, t, score, lam=1.0)[0]

    def marginal(self, x0: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """Mean α_t x_0 and std σ_t (broadcast to ``x0``) of p_{0t}(x_t | x_0)."""
        alpha, sigma = self.alpha_sigma(t)
        return append_dims(alpha, x0.ndim) * x0, append_dims(sigma, x0.ndim).expand_as(x0)

    def perturb(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """x_t = α_t x_0 + σ_t ε for given noise ε."""
        self.check_time(t)
        alpha, sigma = self.alpha_sigma(t)
        return append_dims(alpha, x0.ndim) * x0 + append_dims(sigma, x0.ndim) * noise

    def transition(self, s: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """Scale and std of p(x_t | x_s) for s < t: x_t = α_{t|s} x_s + σ_{t|s} ε.

        α_{t|s} = α_t/α_s and σ²_{t|s} = σ_t² − α_{t|s}² σ_s² = −σ_t² expm1(λ_t − λ_s),
        the last form being accurate when s and t are close. This is the exact discrete
        forward chain on any time grid (DDPM's β_i = 1 − α_{t|s}² for VP, SMLD's
        σ_i² − σ_{i−1}² for VE).
        """
        alpha_s, _ = self.alpha_sigma(s)
        alpha_t, sigma_t = self.alpha_sigma(t)
        var = -(sigma_t**2) * torch.expm1(self.log_snr(t) - self.log_snr(s))
        return alpha_t / alpha_s, var.clamp_min(0).sqrt()

    def prior_sample(
        self,
        shape: tuple[int, ...] | torch.Size,
        *,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> Tensor:
        """Draw from the prior N(0, prior_std² I)."""
        z = torch.randn(tuple(shape), generator=generator, device=device, dtype=dtype)
        return self.prior_std * z

    def prior_logp(self, z: Tensor) -> Tensor:
        """Per-example log-density of N(0, prior_std² I), shape ``(B,)`` in nats."""
        s2 = self.prior_std**2
        d = z[0].numel()
        return -0.5 * d * math.log(2 * math.pi * s2) - 0.5 * sum_except_batch(z**2) / s2

    def extra_repr(self) -> str:
        return f"t_min={self.t_min:g}, T={self.T:g}"


class FunctionSchedule(Schedule):
    """A user schedule from two callables ``alpha_fn(t)`` and ``sigma_fn(t)``.

    Derivatives come from autograd and t(λ) from bisection, so any differentiable pair of
    functions with decreasing log-SNR works everywhere in sdelab with no other edits.

    Example::

        ou = FunctionSchedule(lambda t: torch.exp(-t),
                              lambda t: torch.sqrt(1 - torch.exp(-2 * t)), t_min=1e-3, T=5.0)
    """

    def __init__(
        self,
        alpha_fn: Callable[[Tensor], Tensor],
        sigma_fn: Callable[[Tensor], Tensor],
        *,
        t_min: float,
        T: float = 1.0,
        prior_std: float | None = None,
    ) -> None:
        super().__init__(t_min, T)
        self.alpha_fn = alpha_fn
        self.sigma_fn = sigma_fn
        self._prior_std = prior_std

    def alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        return self.alpha_fn(t), self.sigma_fn(t)

    @property
    def prior_std(self) -> float:
        return super().prior_std if self._prior_std is None else float(self._prior_std)


class VESchedule(Schedule):
    """Variance exploding (SMLD): α = 1, σ_t = σ_min (σ_max/σ_min)^t; prior N(0, σ_max² I).

    Defaults are Score-SDE's (σ_min = 0.01, σ_max = 50, t_min = 1e-5).
    """

    def __init__(
        self, sigma_min: float = 0.01, sigma_max: float = 50.0, t_min: float = 1e-5, T: float = 1.0
    ) -> None:
        super().__init__(t_min, T)
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)
        self._log_ratio = math.log(sigma_max / sigma_min)

    def alpha_sigma(self, t):
        sigma = self.sigma_min * torch.exp(t * self._log_ratio)
        return torch.ones_like(t), sigma

    def derivatives(self, t):
        alpha, sigma = self.alpha_sigma(t)
        return alpha, sigma, torch.zeros_like(t), sigma * self._log_ratio

    def log_snr(self, t):
        return -2 * (math.log(self.sigma_min) + t * self._log_ratio)

    def d_log_snr(self, t):
        return torch.full_like(t, -2 * self._log_ratio)

    def t_of_log_snr(self, log_snr):
        return (-0.5 * log_snr - math.log(self.sigma_min)) / self._log_ratio

    def f(self, t):
        return torch.zeros_like(t)

    def g2(self, t):
        return 2 * self._log_ratio * self.alpha_sigma(t)[1] ** 2

    def discrete_sigmas(self, n: int, dtype: torch.dtype | None = None) -> Tensor:
        """SMLD's geometric noise levels σ_1 < … < σ_n from σ_min to σ_max."""
        lo, hi = math.log(self.sigma_min), math.log(self.sigma_max)
        return torch.exp(torch.linspace(lo, hi, n, dtype=dtype))

    def extra_repr(self):
        return (
            f"sigma_min={self.sigma_min:g}, sigma_max={self.sigma_max:g}, " + super().extra_repr()
        )


class TutorialSchedule(Schedule):
    """The tutorial SDE dx = s^t dw of the Score-SDE essay: α = 1,
    σ_t² = (s^{2t} − 1) / (2 log s), g² = s^{2t}; prior N(0, σ_T² I).

    ``s`` is the essay's σ (25 in Song's MNIST tutorial, 391 for the 64×64 cats-and-dogs run).
    """

    def __init__(self, s: float = 25.0, t_min: float = 1e-5, T: float = 1.0) -> None:
        super().__init__(t_min, T)
        if not s > 1:
            raise ValueError(f"the tutorial SDE needs s > 1, got s={s}")
        self.s = float(s)
        self._two_log_s = 2 * math.log(s)

    def _var(self, t):
        return torch.expm1(t * self._two_log_s) / self._two_log_s

    def alpha_sigma(self, t):
        return torch.ones_like(t), self._var(t).sqrt()

    def derivatives(self, t):
        alpha, sigma = self.alpha_sigma(t)
        return alpha, sigma, torch.zeros_like(t), self.g2(t) / (2 * sigma)

    def log_snr(self, t):
        return -self._var(t).log()

    def d_log_snr(self, t):
        return -self.g2(t) / self._var(t)

    def t_of_log_snr(self, log_snr):
        return torch.log1p(self._two_log_s * torch.exp(-log_snr)) / self._two_log_s

    def f(self, t):
        return torch.zeros_like(t)

    def g2(self, t):
        return torch.exp(t * self._two_log_s)

    def extra_repr(self):
        return f"s={self.s:g}, " + super().extra_repr()


def _linear_beta_integral(t: Tensor, beta_min: float, beta_max: float) -> Tensor:
    """B(t) = ∫_0^t β(u) du for β(u) = β_min + (β_max − β_min) u."""
    return beta_min * t + 0.5 * (beta_max - beta_min) * t**2


def _inverse_linear_beta_integral(B: Tensor, beta_min: float, beta_max: float) -> Tensor:
    """t with B(t) = B; the root of ½Δ t² + β_min t − B = 0 written without cancellation."""
    delta = beta_max - beta_min
    return 2 * B / (beta_min + torch.sqrt(beta_min**2 + 2 * delta * B))


class LogSNRSchedule(Schedule):
    """Variance-preserving family α² + σ² = 1 given by its log-SNR: α² = sigmoid(λ) = 1 − σ².

    Subclasses implement :meth:`log_snr` and :meth:`d_log_snr` (and :meth:`t_of_log_snr` if
    closed-form). Then α' = ½ α σ² λ', σ' = −½ σ α² λ', f = ½ σ² λ', g² = −σ² λ'. The prior is
    N(0, I).
    """

    def alpha_sigma(self, t):
        lam = self.log_snr(t)
        return torch.exp(0.5 * nn.functional.logsigmoid(lam)), torch.exp(
            0.5 * nn.functional.logsigmoid(-lam)
        )

    def log_snr_and_derivative(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """λ(t) and dλ/dt together (override when one pass gives both)."""
        return self.log_snr(t), self.d_log_snr(t)

    def _values(self, t: Tensor) -> ScheduleOutput:
        # everything follows from λ and λ': one evaluation of the schedule per call
        lam, d_lam = self.log_snr_and_derivative(t)
        alpha = torch.exp(0.5 * nn.functional.logsigmoid(lam))
        sigma = torch.exp(0.5 * nn.functional.logsigmoid(-lam))
        s2, a2 = sigma**2, alpha**2
        return ScheduleOutput(
            t=t,
            alpha=alpha,
            sigma=sigma,
            d_alpha=0.5 * alpha * s2 * d_lam,
            d_sigma=-0.5 * sigma * a2 * d_lam,
            log_snr=lam,
            d_log_snr=d_lam,
            f=0.5 * s2 * d_lam,
            g2=-s2 * d_lam,
        )

    def derivatives(self, t):
        alpha, sigma = self.alpha_sigma(t)
        d_lam = self.d_log_snr(t)
        return alpha, sigma, 0.5 * alpha * sigma**2 * d_lam, -0.5 * sigma * alpha**2 * d_lam

    def d_log_snr(self, t):
        t = t.contiguous()
        _, d_lam = torch.func.jvp(self.log_snr, (t,), (torch.ones_like(t),))
        return d_lam

    def f(self, t):
        return 0.5 * torch.sigmoid(-self.log_snr(t)) * self.d_log_snr(t)

    def g2(self, t):
        return -torch.sigmoid(-self.log_snr(t)) * self.d_log_snr(t)

    @property
    def prior_std(self) -> float:
        return 1.0


class _LinearBeta:
    """β(t) = β_min + (β_max − β_min) t and B(t) = ∫_0^t β, shared by VP and sub-VP."""

    beta_min: float
    beta_max: float

    def _set_beta(self, beta_min: float, beta_max: float) -> None:
        if not 0 < beta_min <= beta_max:
            raise ValueError(f"need 0 < beta_min <= beta_max, got {beta_min}, {beta_max}")
        self.beta_min, self.beta_max = float(beta_min), float(beta_max)

    def beta(self, t: Tensor) -> Tensor:
        return self.beta_min + (self.beta_max - self.beta_min) * t

    def _B(self, t: Tensor) -> Tensor:
        return _linear_beta_integral(t, self.beta_min, self.beta_max)

    def extra_repr(self) -> str:
        ends = f"beta_min={self.beta_min:g}, beta_max={self.beta_max:g}, "
        return ends + super().extra_repr()  # type: ignore[misc]


class VPSchedule(_LinearBeta, LogSNRSchedule):
    """Variance preserving (DDPM) with linear β(t) = β_min + (β_max − β_min) t:
    α_t = exp(−½ B(t)), σ_t² = 1 − exp(−B(t)), B = ∫β; f = −½β, g² = β; prior N(0, I).

    Defaults are Score-SDE's (β_min = 0.1, β_max = 20, t_min = 1e-5).
    """

    def __init__(
        self, beta_min: float = 0.1, beta_max: float = 20.0, t_min: float = 1e-5, T: float = 1.0
    ) -> None:
        super().__init__(t_min, T)
        self._set_beta(beta_min, beta_max)

    def log_snr(self, t):
        return -torch.log(torch.expm1(self._B(t)))

    def d_log_snr(self, t):
        return -self.beta(t) / -torch.expm1(-self._B(t))

    def t_of_log_snr(self, log_snr):
        B = nn.functional.softplus(-log_snr)  # B = log(1 + e^{−λ})
        return _inverse_linear_beta_integral(B, self.beta_min, self.beta_max)

    def f(self, t):
        return -0.5 * self.beta(t)

    def g2(self, t):
        return self.beta(t)

    def discrete_betas(self, n: int, dtype: torch.dtype | None = None) -> Tensor:
        """DDPM's n discrete β_i = linspace(β_min/n, β_max/n), as Score-SDE's ancestral sampler."""
        return torch.linspace(self.beta_min / n, self.beta_max / n, n, dtype=dtype)


class SubVPSchedule(_LinearBeta, Schedule):
    """Sub-VP: α_t = exp(−½B(t)) as VP, σ_t = 1 − exp(−B(t)); g² = β(1 − e^{−2B}); prior N(0, I)."""

    def __init__(
        self, beta_min: float = 0.1, beta_max: float = 20.0, t_min: float = 1e-5, T: float = 1.0
    ) -> None:
        super().__init__(t_min, T)
        self._set_beta(beta_min, beta_max)

    def alpha_sigma(self, t):
        B = self._B(t)
        return torch.exp(-0.5 * B), -torch.expm1(-B)

    def derivatives(self, t):
        B, beta = self._B(t), self.beta(t)
        alpha, sigma = torch.exp(-0.5 * B), -torch.expm1(-B)
        return alpha, sigma, -0.5 * beta * alpha, beta * torch.exp(-B)

    def log_snr(self, t):
        B = self._B(t)
        return -B - 2 * torch.log(-torch.expm1(-B))

    def d_log_snr(self, t):
        B, beta = self._B(t), self.beta(t)
        return -beta * (1 + 2 * torch.exp(-B) / -torch.expm1(-B))

    def t_of_log_snr(self, log_snr):
        # u = e^{−B} solves c(1 − u)² = u with c = e^λ; the smaller root, written stably.
        c = torch.exp(log_snr)
        u = 2 * c / ((2 * c + 1) + torch.sqrt(4 * c + 1))
        return _inverse_linear_beta_integral(-torch.log(u), self.beta_min, self.beta_max)

    def f(self, t):
        return -0.5 * self.beta(t)

    def g2(self, t):
        return self.beta(t) * -torch.expm1(-2 * self._B(t))

    @property
    def prior_std(self) -> float:
        return 1.0


class CosineSchedule(LogSNRSchedule):
    """Cosine VP (Nichol & Dhariwal): α_t = cos(φ_t)/cos(φ_0), φ_t = (t + s)/(1 + s)·π/2.

    α reaches 0 at t = 1, where λ = −∞, so the default T = 0.999 (λ_T ≈ −12.9).
    """

    def __init__(self, s: float = 0.008, t_min: float = 1e-5, T: float = 0.999) -> None:
        if T >= 1:
            raise ValueError("the cosine schedule needs T < 1 (α_1 = 0 gives log-SNR −∞)")
        super().__init__(t_min, T)
        self.s = float(s)
        self._cos_phi0 = math.cos(s / (1 + s) * math.pi / 2)
        self._dphi = math.pi / (2 * (1 + s))

    def _alpha(self, t):
        return torch.cos((t + self.s) * self._dphi) / self._cos_phi0

    def log_snr(self, t):
        a2 = self._alpha(t) ** 2
        return torch.log(a2) - torch.log1p(-a2)

    def d_log_snr(self, t):
        alpha = self._alpha(t)
        d_alpha = -torch.sin((t + self.s) * self._dphi) * self._dphi / self._cos_phi0
        return 2 * d_alpha / (alpha * (1 - alpha**2))

    def t_of_log_snr(self, log_snr):
        alpha = torch.sigmoid(log_snr).sqrt()
        phi = torch.arccos((alpha * self._cos_phi0).clamp(-1, 1))
        return phi / self._dphi - self.s

    def extra_repr(self):
        return f"s={self.s:g}, " + super().extra_repr()


class VDMLinearSchedule(LogSNRSchedule):
    """VDM's fixed schedule: γ_t = −λ_t linear from γ_min = −13.3 at t = 0 to γ_max = 5 at t = 1."""

    def __init__(
        self, gamma_min: float = -13.3, gamma_max: float = 5.0, t_min: float = 0.0, T: float = 1.0
    ) -> None:
        super().__init__(t_min, T)
        if not gamma_min < gamma_max:
            raise ValueError(f"need gamma_min < gamma_max, got {gamma_min}, {gamma_max}")
        self.gamma_min, self.gamma_max = float(gamma_min), float(gamma_max)

    def log_snr(self, t):
        return -(self.gamma_min + (self.gamma_max - self.gamma_min) * t)

    def d_log_snr(self, t):
        return torch.full_like(t, -(self.gamma_max - self.gamma_min))

    def t_of_log_snr(self, log_snr):
        return (-log_snr - self.gamma_min) / (self.gamma_max - self.gamma_min)

    def extra_repr(self):
        return (
            f"gamma_min={self.gamma_min:g}, gamma_max={self.gamma_max:g}, " + super().extra_repr()
        )


class LearnedLinearSchedule(LogSNRSchedule):
    """VDM's linear γ_t = γ_0 + (γ_1 − γ_0) t with learnable end points γ_0 < γ_1.

    The end points trade the reconstruction term (γ_0) against the prior term (γ_1) of the
    VLB; they are parameters, initialised at VDM's −13.3 and 5.
    """

    def __init__(self, gamma_min: float = -13.3, gamma_max: float = 5.0) -> None:
        super().__init__(0.0, 1.0)
        if not gamma_min < gamma_max:
            raise ValueError(f"need gamma_min < gamma_max, got {gamma_min}, {gamma_max}")
        self.gamma_0 = nn.Parameter(torch.tensor(float(gamma_min)))
        self.gamma_1 = nn.Parameter(torch.tensor(float(gamma_max)))

    def log_snr(self, t):
        return -(self.gamma_0 + (self.gamma_1 - self.gamma_0) * t)

    def d_log_snr(self, t):
        return -(self.gamma_1 - self.gamma_0).to(t.dtype).expand_as(t)

    def t_of_log_snr(self, log_snr):
        return (-log_snr - self.gamma_0) / (self.gamma_1 - self.gamma_0)


class MonotoneNetSchedule(LogSNRSchedule):
    """VDM's learned schedule γ_η(t): a monotone network rescaled to exact end points.

    γ̃(t) = l_1(t) + l_3(φ(l_2(l_1(t)))) with positive weights (softplus of free parameters),
    φ = sigmoid and ``hidden`` units in l_2 (1024 in the VDM paper). Then

        γ_η(t) = γ_min + (γ_max − γ_min) · (γ̃(t) − γ̃(0)) / (γ̃(1) − γ̃(0)),

    so γ_η(0) = γ_min and γ_η(1) = γ_max *by construction*, whatever the weights — the
    original's unnormalised network drifted off its end points during training. γ̃ is strictly
    increasing because l_1 has a positive slope and every other path has positive weights.
    ``learn_endpoints=True`` makes γ_min, γ_max parameters too.
    """

    def __init__(
        self,
        gamma_min: float = -13.3,
        gamma_max: float = 5.0,
        hidden: int = 1024,
        learn_endpoints: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__(0.0, 1.0)
        if not gamma_min < gamma_max:
            raise ValueError(f"need gamma_min < gamma_max, got {gamma_min}, {gamma_max}")
        if hidden != int(hidden) or hidden < 1 or seed != int(seed):
            raise ValueError(
                f"hidden must be a positive integer and seed an integer, got {hidden}, {seed}"
            )
        hidden, seed = int(hidden), int(seed)  # config kwargs arrive as floats
        g = torch.Generator().manual_seed(seed)
        # fixed end points stay Python floats, so they are exact in any dtype
        self.ends: nn.Parameter | tuple[float, float] = (float(gamma_min), float(gamma_max))
        if learn_endpoints:
            self.ends = nn.Parameter(torch.tensor(self.ends))
        # free parameters; the weights used are softplus(·) > 0
        self.w1 = nn.Parameter(torch.tensor(1.0))
        self.b1 = nn.Parameter(torch.tensor(0.0))
        self.w2 = nn.Parameter(torch.randn(hidden, generator=g) * 0.5)
        self.b2 = nn.Parameter(torch.randn(hidden, generator=g) * 0.5)
        self.w3 = nn.Parameter(torch.randn(hidden, generator=g) * 0.5 - 3.0)

    def _raw(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """γ̃(t) and dγ̃/dt, elementwise in t."""
        sp = nn.functional.softplus
        w1, w2, w3 = sp(self.w1), sp(self.w2), sp(self.w3) / self.w2.numel()
        u = w1 * t + self.b1  # l_1
        h = torch.sigmoid(u.unsqueeze(-1) * w2 + self.b2)  # φ(l_2(l_1 t)), (..., hidden)
        value = u + (h * w3).sum(-1)
        slope = w1 + ((h * (1 - h)) * w2 * w3).sum(-1) * w1
        return value, slope

    def gamma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """γ_η(t) and γ_η'(t)."""
        ends01 = torch.tensor([0.0, 1.0], dtype=t.dtype, device=t.device)
        raw_t, slope = self._raw(t)
        raw_ends, _ = self._raw(ends01)
        g_min, g_max = self.ends if isinstance(self.ends, tuple) else self.ends.to(t.dtype)
        scale = (g_max - g_min) / (raw_ends[1] - raw_ends[0])
        return g_min + scale * (raw_t - raw_ends[0]), scale * slope

    def log_snr(self, t):
        return -self.gamma(t)[0]

    def d_log_snr(self, t):
        return -self.gamma(t)[1]

    def net_time(self, t: Tensor) -> Tensor:
        """Normalised γ, (γ̃(t) − γ̃(0)) / (γ̃(1) − γ̃(0)) ∈ [0, 1] (independent of the end
        points): VDM's network input, so ε̂ depends on t only through the log-SNR."""
        t = torch.as_tensor(t)
        ends01 = torch.tensor([0.0, 1.0], dtype=t.dtype, device=t.device)
        raw_t, _ = self._raw(t)
        raw_ends, _ = self._raw(ends01)
        return (raw_t - raw_ends[0]) / (raw_ends[1] - raw_ends[0])

    def shape_parameters(self) -> list[nn.Parameter]:
        return [self.w1, self.b1, self.w2, self.b2, self.w3]

    def log_snr_and_derivative(self, t):
        gamma, d_gamma = self.gamma(t)
        return -gamma, -d_gamma


#: Built-in schedules by name (a plain dict: add your own entry or pass an instance).
SCHEDULES: dict[str, type[Schedule]] = {
    "ve": VESchedule,
    "vp": VPSchedule,
    "subvp": SubVPSchedule,
    "cosine": CosineSchedule,
    "tutorial": TutorialSchedule,
    "vdm": VDMLinearSchedule,
    "vdm-learned-ends": LearnedLinearSchedule,
    "vdm-learned": MonotoneNetSchedule,
}


def make_schedule(name: str, **kwargs: float) -> Schedule:
    """Build a schedule by name (``ve``, ``vp``, ``subvp``, ``cosine``, ``tutorial``, ``vdm``,
    ``vdm-learned-ends``, ``vdm-learned``).

    Raises ``ValueError`` naming the valid choices for an unknown name or a bad keyword.
    """
    key = name.lower().replace("_", "-")
    key = {"sub-vp": "subvp"}.get(key, key)
    if key not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}: choose one of {', '.join(SCHEDULES)}")
    cls = SCHEDULES[key]
    try:
        return cls(**kwargs)
    except TypeError as e:
        import inspect

        params = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
        raise ValueError(
            f"bad options {sorted(kwargs)} for schedule {key!r}: valid are {', '.join(params)}"
        ) from e
