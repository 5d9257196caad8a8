r"""Time grids for the reverse-time samplers: ``steps + 1`` times from T down to t_min.

Every grid is built in float64 on the CPU through the schedule's own λ(t) and t(λ), so it
works for any schedule (closed-form inverses where they exist, bisection otherwise):

- ``uniform``: equal steps in t (Score-SDE).
- ``logsnr``: equal steps in log-SNR λ (DPM-Solver's recommended grid).
- ``edm``: Karras et al. (2022)'s ρ-ramp in the noise-to-signal ratio σ/α = e^{−λ/2},
  mapped back to t through t(λ); ρ = 7 by default.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from sdelab.sde import Schedule
from sdelab.utils import check_int

__all__ = ["GRIDS", "time_grid"]

D64 = torch.float64


def _log_snr_ends(schedule: Schedule) -> tuple[Tensor, Tensor]:
    """λ(T) and λ(t_min) as float64 scalars."""
    ends = torch.tensor([schedule.T, schedule.t_min], dtype=D64)
    lam = schedule.log_snr(ends)
    return lam[0], lam[1]


def uniform_grid(schedule: Schedule, steps: int) -> Tensor:
    """Equal steps in t from T to t_min."""
    return torch.linspace(schedule.T, schedule.t_min, steps + 1, dtype=D64)


def logsnr_grid(schedule: Schedule, steps: int) -> Tensor:
    """Equal steps in λ from λ(T) to λ(t_min), mapped through t(λ)."""
    lam_T, lam_min = _log_snr_ends(schedule)
    return schedule.t_of_log_snr(torch.linspace(float(lam_T), float(lam_min), steps + 1, dtype=D64))


def edm_grid(schedule: Schedule, steps: int, rho: float = 7.0) -> Tensor:
    """Karras et al. (2022), Eq. 5, in the noise-to-signal ratio r = σ/α = e^{−λ/2}:
    r_i = (r_max^{1/ρ} + i/N (r_min^{1/ρ} − r_max^{1/ρ}))^ρ, then t_i = t(−2 log r_i)."""
    lam_T, lam_min = _log_snr_ends(schedule)
    # r^{1/ρ} = e^{−λ/(2ρ)}: work with it directly so huge or tiny ratios do not overflow.
    a, b = torch.exp(-lam_T / (2 * rho)), torch.exp(-lam_min / (2 * rho))
    ramp = torch.linspace(0, 1, steps + 1, dtype=D64)
    lam = -2 * rho * torch.log(a + ramp * (b - a))
    return schedule.t_of_log_snr(lam)


#: Grid builders by name, each ``(schedule, steps, **options) -> (steps + 1,)`` float64 times.
GRIDS: dict[str, Callable[..., Tensor]] = {
    "uniform": uniform_grid,
    "logsnr": logsnr_grid,
    "edm": edm_grid,
}


def time_grid(
    schedule: Schedule,
    steps: int,
    kind: str | Tensor = "uniform",
    *,
    rho: float | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """Decreasing sampling times ``(steps + 1,)`` from T to t_min (both end points exact).

    Args:
        schedule: the schedule whose λ(t) and t(λ) define the ``logsnr`` and ``edm`` grids.
        steps: number of steps N ≥ 1.
        kind: ``"uniform"`` (in t), ``"logsnr"`` (in λ), ``"edm"`` (Karras et al. 2022, ρ-ramp
            in σ/α), or a 1-D tensor of your own decreasing times in [t_min, T] (``steps`` is
            then ignored).
        rho: the ``edm`` grid's ρ (default 7); an error for other grids.

    Raises:
        ValueError: for an unknown grid name, ``rho`` with a grid that has none, steps < 1,
            or a custom grid that is not strictly decreasing inside [t_min, T].
    """
    dtype = dtype or torch.get_default_dtype()
    if torch.is_tensor(kind):
        ts = kind.detach().to(D64).cpu()
        if ts.ndim != 1 or ts.numel() < 2 or not bool((ts[1:] < ts[:-1]).all()):
            raise ValueError("a custom grid must be a 1-D tensor of >= 2 strictly decreasing times")
        schedule.check_time(ts)
        return ts.to(device=device, dtype=dtype)
    if kind not in GRIDS:
        raise ValueError(f"unknown grid {kind!r}: choose one of {', '.join(GRIDS)}")
    check_int("steps", steps, 1)
    if rho is not None and kind != "edm":
        raise ValueError(f"rho is an option of grid='edm' only, not of grid={kind!r}")
    if rho is not None and not rho > 0:
        raise ValueError(f"rho must be > 0, got {rho}")
    options = {} if rho is None else {"rho": float(rho)}
    with torch.no_grad():
        ts = GRIDS[kind](schedule, steps, **options)
    ts = ts.clamp(schedule.t_min, schedule.T)
    ts[0], ts[-1] = schedule.T, schedule.t_min  # round-trip errors of t(λ(t)) at the ends
    return ts.to(device=device, dtype=dtype)
