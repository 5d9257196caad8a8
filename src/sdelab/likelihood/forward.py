r"""The forward-only solve of the probability-flow ODE: x(t) from the data to the prior.

Used by the quadrature rules (:mod:`sdelab.likelihood.quadrature`): torchdiffeq's adaptive
solvers (:func:`forward_path`, in t or in log-SNR, one step sequence for the batch or one per
example through :mod:`sdelab.likelihood.batched_rk`) or a fixed-grid exponential integrator,
DPM-Solver++ run from the data to the prior (:func:`exponential_path`, ``method="dpm3m"``),
whose dense output at the nodes costs no evaluation.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor
from torchdiffeq import odeint

from sdelab.likelihood.batched_rk import rms_norm, solve_per_example
from sdelab.samplers.ode import dpm_update
from sdelab.sde import Schedule
from sdelab.utils import ScoreFn

#: independent variables of the forward-only solve (:func:`forward_path`).
SOLVE_VARIABLES: tuple[str, ...] = ("t", "log_snr")
#: step controls of the forward-only solve: one sequence for the batch, or one per example.
STEP_CONTROLS: tuple[str, ...] = ("batch", "example")
#: fixed-grid exponential integrators of the forward-only solve (:func:`exponential_path`):
#: DPM-Solver++ (2M, 3M) run from the data to the prior, ``options["steps"]`` steps in λ.
EXPONENTIAL_METHODS: dict[str, int] = {"dpm2m": 2, "dpm3m": 3}
#: their default number of steps (``options["steps"]``), measured on docs/benchmarks/likelihood.md
EXPONENTIAL_STEPS: int = 64


def per_example_max_norm(batch_size: int, dim: int) -> Callable[[Tensor], Tensor]:
    """Error norm for a state [x (``dim`` values), one scalar] per example: the maximum over
    examples of max(RMS of the x part, |scalar|), so the scalar meets its tolerance on its own
    rather than as one of dim + 1 components of an RMS."""

    def norm(scaled_error: Tensor) -> Tensor:
        return example_errors(scaled_error.reshape(batch_size, dim + 1), dim).max()

    return norm


def example_errors(scaled_error: Tensor, dim: int) -> Tensor:
    """Per example ``(B,)`` of a ``(B, dim + 1)`` scaled error [x part, scalar]: max(RMS of the
    x part, |scalar|) — the measure :func:`per_example_max_norm` takes the maximum of."""
    rms = scaled_error[:, :dim].pow(2).mean(dim=1).sqrt()
    return torch.maximum(rms, scaled_error[:, dim].abs())


def forward_path(
    score_fn: ScoreFn,
    schedule: Schedule,
    x: Tensor,
    t0: float,
    times: Tensor,
    *,
    method: str,
    rtol: float,
    atol: float,
    options: dict,
    wide: torch.dtype,
    prior_control: bool = True,
    solve_in: str = "t",
    step_control: str = "batch",
    x_scale: Tensor | None = None,
) -> tuple[Tensor, int]:
    """x(t) of the probability-flow ODE at ``times`` (ascending, from t0) by forward passes
    alone, ``(len(times), B, D)`` in ``wide``, and the number of right-hand-side evaluations
    (batched calls).

    ``prior_control``: integrate log π(x_t) beside x (free: x·v) and make the step controller
    hold its local error below ``atol`` nats per example, so that a point far in the tail,
    where the latent's log-density is most sensitive to x, gets the steps it needs.
    ``options["norm"]`` overrides the default per-example norm (``step_control="batch"``).

    ``solve_in``: the solver's independent variable, ``"t"`` or ``"log_snr"`` (λ, descending
    from λ(t0)). Near t_min the flow expands every direction off the data at rate ≈ ½g²/σ²,
    so in t the first steps are stiff and their local errors are amplified by σ_T/σ_{t0}
    (≈ 100 for VP with t_min = 1e-3) into a *systematic* error of x_T; in λ that rate is
    ≈ ½ per unit everywhere and equal steps in λ are equally hard.

    ``step_control``: ``"batch"`` (torchdiffeq: one step sequence for the batch, accepted when
    the worst example meets the tolerance; any of its methods) or ``"example"``
    (:func:`sdelab.likelihood.batched_rk.solve_per_example`: Dormand–Prince 5(4) with every
    example on its own step sequence — in a batch exactly as alone; ``method`` must be
    ``"dopri5"``).

    ``x_scale``: ``(B,)`` per-example divisors of x's ``rtol`` and ``atol`` (the log π column
    keeps ``atol`` nats): the sensitivity of log π(x_T) to a relative error of x_T, so that a
    far-tail point's x is solved as much tighter as its log-density needs (``None``: 1).

    ``method="dpm2m"`` or ``"dpm3m"``: no adaptive solver but :func:`exponential_path` with
    ``options["steps"]`` equal steps in λ (no step control: ``rtol``, ``atol`` and
    ``prior_control`` play no part; ``solve_in`` must be ``"log_snr"``)."""
    if method in EXPONENTIAL_METHODS:
        if solve_in != "log_snr" or step_control != "batch":
            raise ValueError(
                f"method={method!r} steps on a fixed grid in λ: pass solve_in='log_snr' and "
                f"step_control='batch' (got {solve_in!r}, {step_control!r})"
            )
        steps = options.get("steps")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 2:
            raise ValueError(
                f"method={method!r} needs options={{'steps': N}} with an integer N >= 2 "
                f"(got {steps!r})"
            )
        return exponential_path(
            score_fn, schedule, x, t0, times, steps=steps, order=EXPONENTIAL_METHODS[method],
            wide=wide,
        )  # fmt: skip
    if solve_in not in SOLVE_VARIABLES:
        raise ValueError(
            f"unknown solve_in {solve_in!r}: choose one of {', '.join(SOLVE_VARIABLES)}"
        )
    if step_control not in STEP_CONTROLS:
        raise ValueError(
            f"unknown step_control {step_control!r}: choose one of {', '.join(STEP_CONTROLS)}"
        )
    if step_control == "example" and method != "dopri5":
        raise ValueError(
            f"step_control='example' is Dormand–Prince 5(4): pass method='dopri5', not {method!r}"
        )
    b, dim = x.shape[0], x[0].numel()
    calls = [0]
    inv_s2 = 1.0 / schedule.prior_std**2
    lam_range = None
    if solve_in == "log_snr":
        ends = schedule.log_snr(torch.tensor([t0, schedule.T], dtype=torch.float64))
        lam_range = (float(ends[1]), float(ends[0]))  # λ(T) < λ(t0)

    def rhs(u: Tensor, y: Tensor) -> Tensor:
        """dy/du at ``u`` (the solver's variable, ``(1,)`` or ``(b,)``) for the rows ``y``."""
        calls[0] += 1
        n = y.shape[0]
        if lam_range is None:
            tt = u.to(torch.float64).clamp(t0, schedule.T)
        else:  # a trial step may overshoot λ(T) (the first step's guess can be huge)
            lam = u.to(torch.float64).clamp(*lam_range)
            tt = schedule.t_of_log_snr(lam).clamp(t0, schedule.T)
        tt = tt.to(x.dtype)
        coef = schedule(tt)  # f and g² (one time for the batch, or one per example)
        xx = y[:, :dim].reshape(n, *x.shape[1:]).to(x.dtype)
        s = score_fn(xx, tt.expand(n)).reshape(n, -1)
        v = coef.f.reshape(-1, 1) * xx.reshape(n, -1) - 0.5 * coef.g2.reshape(-1, 1) * s
        v = v.to(y.dtype)  # f x − ½ g² s
        if prior_control:
            # d/dt log π(x_t) = ∇log π · v = −x·v / s²: watched by the step controller in nats
            dp = -(y[:, :dim] * v).sum(1, keepdim=True) * inv_s2
            v = torch.cat([v, dp], dim=1)
        if lam_range is not None:
            v = v / coef.d_log_snr.reshape(-1, 1).to(y.dtype)
        return v

    y0 = x.reshape(b, -1).to(wide)
    rtol_t, atol_t = rtol, atol
    if prior_control:
        y0 = torch.cat([y0, y0.new_zeros(b, 1)], dim=1)
        rtol_t = torch.full((dim + 1,), rtol, dtype=wide, device=x.device)
        rtol_t[-1] = 0.0  # the log-density is controlled in absolute nats
    if x_scale is not None:  # per example: (B, dim [+ 1]) tolerances, x's divided by x_scale
        inv = 1.0 / x_scale.to(device=x.device, dtype=wide).reshape(b, 1)
        rtol_t = (torch.as_tensor(rtol_t, dtype=wide, device=x.device) * inv).expand(b, y0.shape[1])
        atol_t = torch.full_like(y0, float(atol))
        atol_t[:, :dim] = atol * inv
        rtol_t = rtol_t.contiguous()
    # the solver's output points: t, or the distinct λ of the times, descending (times that
    # round onto one λ share it)
    if lam_range is None:
        grid, inverse = times, None
    else:
        lam_all = schedule.log_snr(times.to(torch.float64)).to(wide)
        lam_all[0] = lam_range[1]
        grid, inverse = torch.unique(lam_all, return_inverse=True)
        grid = grid.flip(0)
        inverse = grid.numel() - 1 - inverse
    with torch.no_grad():
        if step_control == "example":
            sol = solve_per_example(
                lambda u, y, rows: rhs(u, y),
                y0,
                float(grid[0]),
                grid[1:],
                rtol=rtol_t,
                atol=atol_t,
                norm=(lambda e: example_errors(e, dim)) if prior_control else rms_norm,
            )
            path = torch.cat([y0[None], sol.ys], dim=0)
        else:
            opts = dict(options)
            if prior_control:
                opts.setdefault("norm", per_example_max_norm(b, dim))
            if lam_range is not None and "step_t" in opts:  # stop times in t: take them to λ
                opts["step_t"] = schedule.log_snr(
                    torch.as_tensor(opts["step_t"]).to(torch.float64)
                ).to(wide)

            def rhs_shared(u: Tensor, y: Tensor) -> Tensor:
                return rhs(u.reshape(1), y)

            path = odeint(
                rhs_shared, y0, grid, rtol=rtol_t, atol=atol_t, method=method, options=opts
            )
    if inverse is not None:
        path = path[inverse]
    return path[..., :dim], calls[0]


def exponential_path(
    score_fn: ScoreFn,
    schedule: Schedule,
    x: Tensor,
    t0: float,
    times: Tensor,
    *,
    steps: int,
    order: int = 2,
    wide: torch.dtype = torch.float64,
) -> tuple[Tensor, int]:
    r"""x(t) of the probability-flow ODE at ``times`` (ascending, from t0 to T) by
    DPM-Solver++ run *forward*, from the data to the prior: ``steps`` equal steps in
    ℓ = λ/2 = log(α/σ), ``(len(times), B, D)`` in ``wide``, and the number of score evaluations.

    The exact step from ℓ_i to ℓ is x(ℓ) = (σ/σ_i) x_i + α ∫_{ℓ_i}^{ℓ} e^{−(ℓ−m)} x̂_0(m) dm with
    the data prediction x̂_0 = (x + σ² s)/α; the multistep rule of order ``order`` (2: 2M, 3: 3M)
    puts the polynomial through the last ``order`` x̂_0 values into that integral. 2M starts
    with one first-order step (its O(h²) local error keeps global order 2); 3M starts with a
    midpoint step (one more evaluation, at ℓ_0 + h/2, whose x̂_0 joins the history: NFE =
    steps + 1), as the sampler's 3M does. The linear part — the expansion at
    rate ≈ ½g²/σ² that makes t_min stiff for a Runge–Kutta solver in t — is integrated exactly,
    so the error comes from x̂_0's variation alone. The same formula with ℓ anywhere inside a
    step is the dense output at no extra evaluation: every output time is served by the step
    that contains it. No error control: the accuracy is the user's to check against a tight
    adaptive solve (``benchmarks/bench_likelihood_speed.py``, table 5, measures the bias).
    """
    if order not in (1, 2, 3):
        raise ValueError(f"order must be 1, 2 or 3, got {order!r}")
    b, dim = x.shape[0], x[0].numel()
    f64 = torch.float64
    t_end = torch.tensor([t0, schedule.T], dtype=f64)
    ell_end = 0.5 * schedule.log_snr(t_end)
    ell_grid = torch.linspace(float(ell_end[0]), float(ell_end[1]), steps + 1, dtype=f64)
    t_grid = schedule.t_of_log_snr(2 * ell_grid).to(f64).clamp(t0, schedule.T)
    t_grid[0], t_grid[-1] = t0, schedule.T
    alpha_g, sigma_g = (v.to(f64) for v in schedule.alpha_sigma(t_grid))
    t_out = times.to(f64).cpu()
    alpha_o, sigma_o = (v.to(f64) for v in schedule.alpha_sigma(t_out))
    ell_out = 0.5 * schedule.log_snr(t_out).to(f64)
    ell_out[t_out <= t0] = ell_grid[0]  # the start is the grid's start exactly
    y = x.reshape(b, -1).to(wide)
    out = torch.empty(t_out.numel(), b, dim, dtype=wide, device=x.device)
    hist: list[tuple[Tensor, float]] = []  # (x̂_0, ℓ) of the previous steps, newest last
    start: tuple[Tensor, float] | None = None  # 3M's midpoint (x̂_0, ℓ) in the first step
    nfe = 0

    def data_prediction(y: Tensor, t: Tensor, alpha: float, sigma: float) -> Tensor:
        tt = t.to(x.dtype).to(x.device).expand(b)
        s = score_fn(y.reshape(x.shape).to(x.dtype), tt).reshape(b, -1).to(wide)
        return (y + sigma**2 * s) / alpha

    def advance(y: Tensor, x0: Tensor, i: int, ell: float, alpha: float, sigma: float) -> Tensor:
        """The multistep update from grid point i to ℓ (any ℓ inside the step)."""
        ell_i = float(ell_grid[i])
        h = ell - ell_i
        if h == 0.0:
            return y
        ratio = sigma / float(sigma_g[i])
        if start is None:
            return dpm_update(y, x0, hist[len(hist) - (order - 1) :], ell_i, h, ratio, alpha)
        # 3M's first step: x̂_0 linear through ℓ_0 and the midpoint (local error O(h³))
        x0_m, ell_m = start
        slope = (x0_m - x0) / (ell_m - ell_i)
        return ratio * y - alpha * math.expm1(-h) * x0 + alpha * (math.expm1(-h) + h) * slope

    j = 0
    with torch.no_grad():
        for i in range(steps):
            x0 = data_prediction(y, t_grid[i], float(alpha_g[i]), float(sigma_g[i]))
            nfe += 1
            if order == 3 and i == 0:
                ell_m = float(ell_grid[0] + 0.5 * (ell_grid[1] - ell_grid[0]))
                t_m = schedule.t_of_log_snr(torch.tensor([2 * ell_m], dtype=f64)).to(f64)
                a_m, s_m = (float(v) for v in schedule.alpha_sigma(t_m))
                ell_0 = float(ell_grid[0])
                y_m = dpm_update(y, x0, [], ell_0, ell_m - ell_0, s_m / float(sigma_g[0]), a_m)
                start = (data_prediction(y_m, t_m[0], a_m, s_m), ell_m)
                nfe += 1
            last = i == steps - 1
            # the outputs inside this step (ℓ decreasing); the last step takes the rest
            while j < t_out.numel() and (last or ell_out[j] > ell_grid[i + 1]):
                out[j] = advance(y, x0, i, float(ell_out[j]), float(alpha_o[j]), float(sigma_o[j]))
                j += 1
            y = advance(y, x0, i, float(ell_grid[i + 1]), float(alpha_g[i + 1]),
                        float(sigma_g[i + 1]))  # fmt: skip
            hist = [*hist[-1:], (x0, float(ell_grid[i]))]
            if start is not None:  # the midpoint's x̂_0 is the next step's newest value
                hist, start = [hist[-1], start], None
    if t_out.numel() and t_out[-1] >= schedule.T:
        out[-1] = y  # T exactly: the last grid point
    return out, nfe


@dataclass(frozen=True)
class ForwardSolve:
    """How the quadrature rules solve x(t): :func:`forward_path`'s settings, given once.

    ``wide`` is the dtype of the integrated state; ``options`` go to torchdiffeq
    (``"norm"`` overrides the per-example norm); ``x_scale`` (per example, for the rows of
    the ``x`` it is used with) and the rest as :func:`forward_path`."""

    method: str
    rtol: float
    atol: float
    wide: torch.dtype
    options: dict = field(default_factory=dict)
    prior_control: bool = True
    solve_in: str = "t"
    step_control: str = "batch"
    x_scale: Tensor | None = None

    def path(
        self, score_fn: ScoreFn, schedule: Schedule, x: Tensor, t0: float, times: Tensor
    ) -> tuple[Tensor, int]:
        """:func:`forward_path` with these settings."""
        return forward_path(
            score_fn,
            schedule,
            x,
            t0,
            times,
            method=self.method,
            rtol=self.rtol,
            atol=self.atol,
            options=self.options,
            wide=self.wide,
            prior_control=self.prior_control,
            solve_in=self.solve_in,
            step_control=self.step_control,
            x_scale=self.x_scale,
        )
