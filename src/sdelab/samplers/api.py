"""The one entry point :func:`sample` (the samplers it runs: :mod:`~sdelab.samplers.registry`)."""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch import Tensor

from sdelab.samplers.defaults import default_grid, resolve_options
from sdelab.samplers.grids import time_grid
from sdelab.samplers.registry import COMMON_OPTIONS, SAMPLERS, sampler_options
from sdelab.samplers.stochastic import Constraint, ScoreFn, denoise
from sdelab.sde import Schedule
from sdelab.utils import make_generator

__all__ = ["SampleResult", "sample"]


@dataclass
class SampleResult:
    """What :func:`sample` returns.

    Attributes:
        samples: ``(B, ...)`` the final samples (after the optional denoising step).
        nfe: number of ``score_fn`` calls, each on the whole batch.
        trajectory: ``None``, or ``(n_saved, B, ...)`` states at ``times`` (from x_T at T to
            the state at t_min, before denoising) when ``return_trajectory=True``.
        times: ``None`` or ``(n_saved,)`` the matching times.
        grid: name of the time grid used (``"uniform"``, ``"logsnr"``, ``"edm"``, or
            ``"custom"`` for a tensor of times), the sampler's default when none was given.
        grid_times: ``(steps + 1,)`` the grid's times, from T down to t_min.
        options: every option the sampler ran with, defaults filled in, including the
            common ``denoise`` and ``rho``; for ``dpm_solver`` the resolved ``order`` and
            ``step_orders``, the order of each step (3M's first step, the midpoint start,
            counts as 2).
    """

    samples: Tensor
    nfe: int
    trajectory: Tensor | None = None
    times: Tensor | None = None
    grid: str | None = None
    grid_times: Tensor | None = None
    options: dict | None = None
    log_probs: Tensor | None = None
    path_log_prob: Tensor | None = None


class _CountingScore:
    """Wraps a score function and counts its calls (the NFE)."""

    def __init__(self, score_fn: ScoreFn) -> None:
        self.score_fn = score_fn
        self.calls = 0

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        self.calls += 1
        return self.score_fn(x, t)


def sample(
    score_fn: ScoreFn,
    schedule: Schedule,
    shape: tuple[int, ...] | torch.Size | None,
    *,
    sampler: str = "euler_maruyama",
    steps: int = 1000,
    grid: str | Tensor | None = None,
    generator: torch.Generator | int | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    x_init: Tensor | None = None,
    return_trajectory: bool = False,
    return_log_probs: bool = False,
    constraint: Constraint | None = None,
    **options,
) -> SampleResult:
    """Draw samples by integrating a reverse-time process from T to t_min.

    Args:
        score_fn: ``score_fn(x, t) -> ∇_x log p_t(x)``, ``t`` of shape ``(B,)``; a plain
            callable, the Gaussian oracle's ``score_fn(schedule)`` or a ``ScoreModel``.
        schedule: the forward process (any :class:`~sdelab.sde.Schedule`).
        shape: ``(B, ...)`` of the samples; may be ``None`` when ``x_init`` is given.
        sampler: a name in ``SAMPLERS``:

            - ``euler_maruyama``: reverse SDE, Euler–Maruyama (Song et al. 2021).
            - ``reverse_diffusion``: Score-SDE's reverse-diffusion predictor.
            - ``ancestral``: exact chain posterior, DDPM (Ho et al. 2020) / SMLD for VP / VE.
            - ``pc``: predictor–corrector (Song et al. 2021), options ``predictor``
              (``reverse_diffusion``, ``euler_maruyama``, ``ancestral``, ``none``),
              ``corrector`` (``langevin``, ``ald``, ``none``), ``snr`` = 0.16,
              ``n_corrector_steps`` = 1.
            - ``annealed_langevin``: NCSN's ALD (Song & Ermon 2019), ``snr``,
              ``n_corrector_steps``.
            - ``lambda``: the λ-family reverse SDE (Huang et al. 2021), ``lam`` ∈ [0, 1].
            - ``ode``: probability-flow ODE, ``method`` (``euler``, ``heun``, ``midpoint``,
              ``rk4``, ``dopri5``, ``dopri8``, ``bosh3``, ``fehlberg2``, ``adaptive_heun``),
              ``rtol``, ``atol`` for the adaptive ones.
            - ``dpm_solver``: DPM-Solver++ in log-SNR time (Lu et al. 2022), ``order``
              (``None``: 2M below 15 NFE, 3M from 15), ``lower_order_final`` = True (8 to 14
              steps: the last steps lower their order), ``min_step_ratio`` = 0.2 (a
              step whose step-size ratio h_prev/h is smaller drops an order).

        steps: number of grid intervals N (for adaptive ODE solvers: output times only).
        grid: ``"uniform"`` in t, ``"logsnr"``, ``"edm"`` (option ``rho`` = 7), or a
            decreasing tensor of times; see :func:`~sdelab.samplers.time_grid`. ``None``
            (default): the sampler's measured default (``DEFAULT_GRIDS``): ``"logsnr"`` for
            ``dpm_solver``, ``"edm"`` for ``annealed_langevin`` and adaptive ODE solvers, and
            for the others (up to 200 NFE) whichever of ``"edm"``, ``"logsnr"``,
            ``"uniform"`` is most accurate for this sampler and schedule on Gaussian test
            data (:func:`~sdelab.samplers.linear_probe`). ``SampleResult.grid`` says which.
        generator: a ``torch.Generator`` or an integer seed; the same seed gives the same
            samples. ``None`` uses torch's global generator.
        device, dtype: of the samples (default: ``x_init``'s, else CPU and torch's default).
        x_init: ``(B, ...)`` state at T replacing the prior draw.
        return_trajectory: also return the state at every grid time.
        return_log_probs: also return every stochastic step's log-probability and the path's
            (``SampleResult.log_probs``, ``path_log_prob``). For samplers whose steps are
            Gaussian given the current state: ``euler_maruyama``, ``reverse_diffusion``,
            ``ancestral``, ``lambda`` with ``lam`` < 1, ``pc`` with a named predictor and the
            ``ald`` corrector or none, ``annealed_langevin``. The samples are the same as
            without it.
        constraint: ``constraint(x, t) -> x`` applied after every step of a stepping sampler
            (predictor and corrector steps alike), e.g. to clamp known pixels for inpainting.
        **options: the sampler's options above, plus ``denoise`` (default ``False``: end with
            Tweedie's denoising step x̂_0 = (x + σ² s)/α at t_min, one more NFE, as
            Score-SDE) and ``rho`` for ``grid="edm"``. ``sampler_options(name)`` lists them.

    Returns:
        :class:`SampleResult` with ``samples``, ``nfe``, the ``grid``, ``grid_times`` and
        ``options`` actually used, and optionally ``trajectory``/``times``.

    Warns:
        UserWarning: for a combination measured to go wrong (docs/benchmarks/samplers.md):
            DPM-Solver++(3M) below 15 NFE, a grid whose step-size ratios make DPM-Solver lower
            its order, or an ``ode`` (fixed-step), ``dpm_solver``, ``euler_maruyama`` or
            ``lambda`` run whose output law on Gaussian test data misses the exact one by more
            than 0.5 standard deviations (:func:`~sdelab.samplers.linear_probe`: too few
            steps for this grid and schedule).

    Raises:
        ValueError: unknown sampler, unknown option (the message lists the valid ones), an
            option out of range, ``x_init`` whose shape differs from ``shape``, or
            ``return_log_probs`` with a sampler or option whose steps are not Gaussian (``ode``,
            ``dpm_solver``, ``lam=1``, the Langevin corrector, a custom predictor) or with a
            ``constraint``.

    Example::

        data = GaussianData(torch.zeros(2), torch.eye(2))
        sde = VPSchedule()
        res = sample(data.score_fn(sde), sde, (512, 2), sampler="dpm_solver", steps=20,
                     generator=0)
        res.samples.shape, res.nfe, res.grid, res.options["order"]   # (512, 2), 21, logsnr, 3
    """
    valid = sampler_options(sampler)
    if return_log_probs and "log_probs" not in inspect.signature(SAMPLERS[sampler]).parameters:
        raise ValueError(
            f"return_log_probs needs a sampler with Gaussian steps: {sampler!r} is deterministic; "
            "use euler_maruyama, reverse_diffusion, ancestral, lambda (lam < 1) or pc"
        )
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(
            f"unknown option(s) {', '.join(unknown)} for sampler {sampler!r}: "
            f"valid are {', '.join(valid)}"
        )
    do_denoise = bool(options.pop("denoise", False))
    rho = options.pop("rho", None)

    if x_init is not None:
        if shape is not None and tuple(x_init.shape) != tuple(shape):
            raise ValueError(f"x_init has shape {tuple(x_init.shape)}, expected {tuple(shape)}")
        device = x_init.device if device is None else device
        dtype = x_init.dtype if dtype is None else dtype
    elif shape is None:
        raise ValueError("pass the sample shape (B, ...) or an x_init")
    dtype = dtype or torch.get_default_dtype()
    probed: dict = {}  # probe scores of the grids default_grid tried
    if grid is None:  # rho belongs to the edm grid; otherwise the sampler's measured default
        own = {**{k: v for k, v in valid.items() if k not in COMMON_OPTIONS}, **options}
        if rho is not None:
            grid = "edm"
        else:
            grid = default_grid(sampler, schedule, steps, own, errors=probed)
    grid_name = "custom" if torch.is_tensor(grid) else grid
    ts = time_grid(schedule, steps, grid, rho=rho, device=device, dtype=dtype)
    run_options, record = resolve_options(sampler, schedule, ts, grid_name, options, errors=probed)
    record.update(denoise=do_denoise, rho=7.0 if rho is None and grid_name == "edm" else rho)
    gen = make_generator(generator, device or "cpu")
    if x_init is not None:
        x = x_init.detach().to(device=device, dtype=dtype).clone()
    else:
        x = schedule.prior_sample(shape, generator=gen, device=device, dtype=dtype)

    counted = _CountingScore(score_fn)
    saved: list[Tensor] = [x.clone()] if return_trajectory else []
    callback = (lambda x_t, t: saved.append(x_t.clone())) if return_trajectory else None
    steps_lp: list[Tensor] | None = [] if return_log_probs else None
    plumbing = {"log_probs": steps_lp} if return_log_probs else {}
    x_T = x
    with torch.no_grad():
        x = SAMPLERS[sampler](
            counted,
            schedule,
            x,
            ts,
            generator=gen,
            constraint=constraint,
            callback=callback,
            **plumbing,
            **run_options,
        )
        if do_denoise:
            x = denoise(counted, schedule, x, ts[-1])
        log_probs = path_log_prob = None
        if steps_lp is not None:
            log_probs = torch.stack(steps_lp) if steps_lp else x.new_zeros(0, x.shape[0])
            path_log_prob = schedule.prior_logp(x_T).to(x.dtype) + log_probs.sum(0)
    return SampleResult(
        samples=x,
        nfe=counted.calls,
        trajectory=torch.stack(saved) if return_trajectory else None,
        times=ts if return_trajectory else None,
        grid=grid_name,
        grid_times=ts,
        options=record,
        log_probs=log_probs,
        path_log_prob=path_log_prob,
    )
