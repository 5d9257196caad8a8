r"""The ODE log-likelihood with the divergence only where it is needed.

The probability-flow likelihood is log p_{t_min}(x) = log π(x_T) + ∫_{t_min}^T ∇·v(x_t, t) dt.
The classic design (:func:`sdelab.likelihood.log_likelihood` with ``integrator="augmented"``)
integrates x and the divergence together, so *every* step of the adaptive solver pays for the
divergence — D vector-Jacobian products for the exact trace — although the divergence never
feeds back into x. Here the two are separated:

1. solve x(t) alone (forward passes of the score, no autograd) with the same adaptive solver
   and per-example error norm, asking its dense output for x at the quadrature nodes;
2. integrate the divergence by nested Clenshaw–Curtis quadrature in a smooth time variable.
   With ``time_variable="log_snr"`` the substitution g² dt = −σ² dλ turns the integrand into
   ½ σ² tr ∂s/∂x, which for Gaussian-like data is a sum of sigmoids in λ: analytic, so the
   quadrature converges exponentially. The linear part ∇·(f x) = D f integrates in closed
   form, D log(α_T / α_{t_min}), and is not left to the quadrature.
3. Nested levels (N = 8, 16, 32, … intervals share nodes) give a per-example error estimate
   |Q_N − Q_{N/2}|; only the examples that have not met ``quad_tol`` get the next level's
   nodes, so an easy example never pays for a hard neighbour and a hard one is never
   stopped early by its neighbours.

Each node costs one divergence (exact trace or Hutchinson with fresh probes per node); the
quadrature needs ~16–64 nodes where the augmented solve takes ~100–300 steps of six stages.

The forward-only solve is torchdiffeq's adaptive solvers (:func:`forward_path`, in t or in
log-SNR, one step sequence for the batch or one per example) or a fixed-grid exponential
integrator, DPM-Solver++ run from the data to the prior (:func:`exponential_path`,
``method="dpm3m"``), whose dense output at the nodes costs no evaluation.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor
from torchdiffeq import odeint

from sdelab.batched_rk import rms_norm, solve_per_example
from sdelab.samplers.ode import dpm_update
from sdelab.sde import Schedule
from sdelab.utils import ScoreFn

#: time variables of the quadrature: ``"log_snr"`` (λ uniform) or ``"t"``.
TIME_VARIABLES: tuple[str, ...] = ("log_snr", "t")
#: exact-trace implementations: batched reverse mode (one backward pass with D cotangents)
#: or forward mode (torch.func.vmap over D Jacobian-vector products).
TRACE_MODES: tuple[str, ...] = ("reverse", "forward")
#: independent variables of the forward-only solve (:func:`forward_path`).
SOLVE_VARIABLES: tuple[str, ...] = ("t", "log_snr")
#: step controls of the forward-only solve: one sequence for the batch, or one per example.
STEP_CONTROLS: tuple[str, ...] = ("batch", "example")
#: fixed-grid exponential integrators of the forward-only solve (:func:`exponential_path`):
#: DPM-Solver++ (2M, 3M) run from the data to the prior, ``options["steps"]`` steps in λ.
EXPONENTIAL_METHODS: dict[str, int] = {"dpm2m": 2, "dpm3m": 3}
#: their default number of steps (``options["steps"]``), measured in benchmarks/RESULTS.md
EXPONENTIAL_STEPS: int = 64


def clenshaw_curtis(n: int, dtype: torch.dtype = torch.float64) -> tuple[Tensor, Tensor]:
    """Clenshaw–Curtis nodes cos(jπ/n), j = 0..n, and weights on [−1, 1] (n even).

    Exact for polynomials of degree n; for analytic integrands the error decays geometrically.
    The nodes of n are the even-indexed nodes of 2n, which makes the levels nested.
    """
    if n < 2 or n % 2:
        raise ValueError(f"Clenshaw–Curtis needs an even number of intervals >= 2, got {n}")
    j = torch.arange(n + 1, dtype=torch.float64)
    theta = math.pi * j / n
    k = torch.arange(1, n // 2 + 1, dtype=torch.float64)
    b = torch.where(k == n // 2, 1.0, 2.0)
    s = (b[None, :] / (4 * k[None, :] ** 2 - 1) * torch.cos(2 * k[None, :] * theta[:, None])).sum(1)
    c = torch.where((j == 0) | (j == n), 1.0, 2.0)
    w = c / n * (1 - s)
    return torch.cos(theta).to(dtype), w.to(dtype)


@dataclass(frozen=True)
class QuadratureGrid:
    """Nodes of the finest level in time (ascending), with each level's weights in dt.

    ``times``: ``(n_max + 1,)`` ascending, ``times[0] = t0``, ``times[-1] = T``.
    ``weights[n]``: ``(n_max + 1,)`` weights of the level with n intervals, in the t-measure
    (zero on nodes the level does not use), so Q_n = Σ_k weights[n][k] h(times[k]).
    """

    times: Tensor
    weights: dict[int, Tensor]


def quadrature_grid(
    schedule: Schedule,
    t0: float,
    levels: list[int],
    time_variable: str = "log_snr",
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> QuadratureGrid:
    """Nested Clenshaw–Curtis grids on [t0, T] in the chosen time variable (see module doc).

    ``levels`` are interval counts, each twice the previous (e.g. ``[8, 16, 32]``).
    """
    if time_variable not in TIME_VARIABLES:
        raise ValueError(
            f"unknown time_variable {time_variable!r}: choose one of {', '.join(TIME_VARIABLES)}"
        )
    for a, b in itertools.pairwise(levels):
        if b != 2 * a:
            raise ValueError(f"quadrature levels must double, got {levels}")
    n_max = levels[-1]
    u, _ = clenshaw_curtis(n_max)  # u_j = cos(jπ/n): from +1 down to −1
    u = u.flip(0)  # ascending in u ∈ [−1, 1]
    f64 = torch.float64
    T = schedule.T
    if time_variable == "t":
        times = t0 + (u + 1) * 0.5 * (T - t0)
        dt_du = torch.full_like(u, 0.5 * (T - t0))
    else:  # λ from λ(t0) (u = −1) down to λ(T) (u = +1): t increases with u
        ends = torch.tensor([t0, T], dtype=f64)
        lam0, lam1 = schedule.log_snr(ends).to(f64).tolist()
        lam = lam0 + (u + 1) * 0.5 * (lam1 - lam0)
        times = schedule.t_of_log_snr(lam).to(f64)
        times[0], times[-1] = t0, T
        dt_du = 0.5 * (lam1 - lam0) / schedule.d_log_snr(times).to(f64)
    if not bool((times[1:] > times[:-1]).all()):
        raise ValueError(
            f"{n_max} quadrature intervals are too fine for float64 time near t_min: use fewer "
            "(max_nodes) or time_variable='t'"
        )
    weights = {}
    for n in levels:
        _, w = clenshaw_curtis(n)  # symmetric, so the flip does not matter
        full = torch.zeros(n_max + 1, dtype=f64)
        full[:: n_max // n] = w
        weights[n] = full * dt_du
    dev = device if device is not None else "cpu"
    return QuadratureGrid(
        times=times.to(dtype=dtype, device=dev),
        weights={n: w.to(dtype=dtype, device=dev) for n, w in weights.items()},
    )


def exact_trace(fn: Callable[[Tensor], Tensor], x: Tensor, mode: str = "reverse") -> Tensor:
    """tr(∂fn/∂x) per example, ``(B,)``, for a per-example map ``fn: (B, ...) -> (B, ...)``.

    ``"reverse"``: one backward pass with the D unit cotangents batched (``is_grads_batched``);
    ``"forward"``: ``torch.func.vmap`` over D forward-mode Jacobian-vector products (no graph
    is stored, one pass of dual numbers per direction).
    """
    if mode not in TRACE_MODES:
        raise ValueError(f"unknown trace mode {mode!r}: choose one of {', '.join(TRACE_MODES)}")
    b, d = x.shape[0], x[0].numel()
    eye = torch.eye(d, dtype=x.dtype, device=x.device).reshape(d, 1, *x.shape[1:])
    basis = eye.expand(d, *x.shape)
    if mode == "forward":

        def jvp_row(e: Tensor) -> Tensor:
            return torch.func.jvp(fn, (x,), (e,))[1]

        rows = torch.func.vmap(jvp_row)(basis.contiguous())  # (D, B, ...)
    else:
        with torch.enable_grad():
            xl = x.detach().requires_grad_(True)
            out = fn(xl)
            rows = torch.autograd.grad(out, xl, basis, is_grads_batched=True)[0]
    return (rows * basis).reshape(d, b, -1).sum(dim=(0, 2))


def hutchinson_trace(fn: Callable[[Tensor], Tensor], x: Tensor, probes: Tensor) -> Tensor:
    """Hutchinson's estimate (1/K) Σ_k ε_kᵀ (∂fn/∂x) ε_k per example, ``(B,)``; ``probes`` is
    ``(K, *x.shape)`` with E[ε εᵀ] = I. All K products in one batched backward pass."""
    k, b = probes.shape[:2]
    with torch.enable_grad():
        xl = x.detach().requires_grad_(True)
        out = fn(xl)
        if k == 1:
            rows = torch.autograd.grad(out, xl, probes[0])[0].unsqueeze(0)
        else:
            rows = torch.autograd.grad(out, xl, probes, is_grads_batched=True)[0]
    return (rows * probes).reshape(k, b, -1).sum(dim=(0, 2)) / k


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


@dataclass(frozen=True)
class QuadratureOutput:
    """What :func:`divergence_integral` found, per example (leading dim B).

    Attributes:
        z: x_T, shaped like ``x``.
        delta: ∫_{t0}^T ∇·v dt, ``(B,)``.
        error: the quadrature's error estimate |Q_N − Q_{N/2}|, ``(B,)`` (for Hutchinson it also
            holds probe noise).
        nodes: quadrature nodes each example used, ``(B,)`` (divergence evaluations).
        nfe: right-hand-side evaluations of the forward-only solve (batched).
    """

    z: Tensor
    delta: Tensor
    error: Tensor
    nodes: Tensor
    nfe: int


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
    (:func:`sdelab.batched_rk.solve_per_example`: Dormand–Prince 5(4) with every example on
    its own step sequence — in a batch exactly as alone; ``method`` must be ``"dopri5"``).

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
    (``"norm"`` overrides the per-example norm); the rest as :func:`forward_path`."""

    method: str
    rtol: float
    atol: float
    wide: torch.dtype
    options: dict = field(default_factory=dict)
    prior_control: bool = True
    solve_in: str = "t"
    step_control: str = "batch"

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
        )


def node_divergence(
    score_fn: ScoreFn,
    schedule: Schedule,
    x: Tensor,
    path: Tensor,
    times: Tensor,
    ks: Tensor,
    rs: Tensor,
    trace: Callable[[Callable[[Tensor], Tensor], Tensor, Tensor], Tensor],
) -> Tensor:
    """∇·v − D f at the (node, example) pairs ``(ks, rs)`` of a :func:`forward_path` solve at
    ``times``, ``(len(ks),)`` in ``path.dtype``: the quadratures' integrand, whose linear part
    ∇·(f x) = D f is left to :func:`linear_part`."""
    dim = x[0].numel()
    xs = path[ks, rs].reshape(-1, *x.shape[1:]).to(x.dtype)
    tb = times[ks].to(x.dtype)

    def flow(xx: Tensor) -> Tensor:
        return schedule.probability_flow(xx, tb, score_fn(xx, tb))

    div = trace(flow, xs, rs).to(path.dtype)
    return div - dim * schedule.f(times[ks]).to(path.dtype)


def linear_part(
    schedule: Schedule, t0: float, dim: int, dtype: torch.dtype, device: torch.device
) -> Tensor:
    """∫_{t0}^T ∇·(f x) dt = D log(α_T / α_{t0}) in closed form (a scalar tensor)."""
    ends = torch.tensor([t0, schedule.T], dtype=dtype, device=device)
    log_alpha = schedule.alpha_sigma(ends)[0].to(dtype).log()
    return dim * (log_alpha[1] - log_alpha[0])


def divergence_integral(
    score_fn: ScoreFn,
    schedule: Schedule,
    x: Tensor,
    t0: float,
    *,
    trace: Callable[[Callable[[Tensor], Tensor], Tensor, Tensor], Tensor],
    solve: ForwardSolve,
    min_nodes: int = 8,
    max_nodes: int = 128,
    quad_tol: float = 1e-3,
    time_variable: str = "t",
    batch_limit: int = 256,
) -> QuadratureOutput:
    """Forward-only solve of x(t) plus nested quadrature of the divergence (module docstring).

    ``trace(fn, x, rows)`` returns tr ∂fn/∂x per example (exact or an estimate); ``rows`` are
    the indices in the batch of ``x``'s examples (for probes fixed per example). Runs without
    gradients. Levels run from ``min_nodes`` to ``max_nodes`` intervals (powers of two times
    ``min_nodes``); an example stops refining once its error estimate is ≤ ``quad_tol`` nats.
    ``solve``: how x(t) is solved (:class:`ForwardSolve`; its ``prior_control`` also
    integrates log π(x_t) and holds its local error below ``atol`` nats per example, so that a
    point far in the tail, where the latent's log-density is most sensitive to x, gets the
    steps it needs — a relative tolerance on x alone loosens exactly there).
    The divergences of a level's new nodes are evaluated together, ``batch_limit`` (node,
    example) pairs per call (at least one node for the whole batch).
    """
    if (
        isinstance(min_nodes, bool)
        or not isinstance(min_nodes, int)
        or min_nodes < 2
        or min_nodes % 2
        or max_nodes < min_nodes
    ):
        raise ValueError(
            f"need an even min_nodes >= 2 and max_nodes >= min_nodes, got {min_nodes}, {max_nodes}"
        )
    levels = [min_nodes]
    while levels[-1] * 2 <= max_nodes:
        levels.append(levels[-1] * 2)
    if levels[-1] != max_nodes:
        raise ValueError(f"max_nodes must be min_nodes times a power of two, got {max_nodes}")
    b, dim = x.shape[0], x[0].numel()
    wide = solve.wide
    grid = quadrature_grid(schedule, t0, levels, time_variable, wide, x.device)
    # (n_max + 1, B, D): the solver's dense output at every node
    path, nfe = solve.path(score_fn, schedule, x, t0, grid.times)
    n_max = levels[-1]
    h = torch.full((n_max + 1, b), float("nan"), dtype=wide, device=x.device)  # integrand
    done_idx: set[int] = set()
    active = torch.ones(b, dtype=torch.bool, device=x.device)
    q_prev = None
    delta = torch.zeros(b, dtype=wide, device=x.device)
    error = torch.full((b,), float("inf"), dtype=wide, device=x.device)
    nodes = torch.zeros(b, dtype=torch.long, device=x.device)
    for n in levels:
        idx = [k for k in range(0, n_max + 1, n_max // n) if k not in done_idx]
        rows = active.nonzero().squeeze(1)
        # every new node of this level for every active example, in chunks of one batch
        pairs = [(k, r) for k in idx for r in rows.tolist()]
        chunk = max(rows.numel(), batch_limit)
        for start in range(0, len(pairs), chunk):
            part = pairs[start : start + chunk]
            ks = torch.tensor([k for k, _ in part], device=x.device)
            rs = torch.tensor([r for _, r in part], device=x.device)
            h[ks, rs] = node_divergence(score_fn, schedule, x, path, grid.times, ks, rs, trace)
        done_idx.update(idx)
        nodes[rows] += len(idx)
        w = grid.weights[n]
        used = w != 0
        q = (w[used, None] * h[used][:, rows]).sum(0)
        delta[rows] = q
        if q_prev is not None:
            error[rows] = (q - q_prev[rows]).abs()
            still = error[rows] > quad_tol
            active[rows[~still]] = False
        q_full = torch.zeros(b, dtype=wide, device=x.device) if q_prev is None else q_prev
        q_full[rows] = q
        q_prev = q_full
        if not bool(active.any()):
            break
    if len(levels) == 1:  # one level: no estimate
        error = torch.full_like(error, float("nan"))
    delta = delta + linear_part(schedule, t0, dim, wide, x.device)
    return QuadratureOutput(
        z=path[-1].reshape(x.shape),
        delta=delta,
        error=error,
        nodes=nodes,
        nfe=nfe,
    )


def randomized_divergence_integral(
    score_fn: ScoreFn,
    schedule: Schedule,
    x: Tensor,
    t0: float,
    *,
    trace: Callable[[Callable[[Tensor], Tensor], Tensor, Tensor], Tensor],
    solve: ForwardSolve,
    generator: torch.Generator | None = None,
    nodes: int = 16,
    groups: int = 8,
    batch_limit: int = 256,
) -> QuadratureOutput:
    r"""Forward-only solve of x(t) plus a *randomly shifted* rule for ∫∇·v dt: unbiased.

    The tanh-sinh substitution u = tanh(½π sinh s), s ∈ [−L, L] (L = 3, so u reaches ±1 to
    1e-14) and t linear in u turns ∫ h dt into ∫ h(t(s)) t'(u) u'(s) ds
    whose integrand and all its derivatives vanish at ±L: a smooth periodic function of s.
    The ``nodes``-point trapezoid rule on [−L, L) shifted by U ~ U(0, 1),
    s_k = −L + 2L(k + U)/K, then has expectation exactly the integral (up to the 1e-14 cut) for
    *any* integrand, and for a smooth one its error — now zero-mean noise — decays
    exponentially in K like the fixed tanh-sinh rule's. (A shifted rule in θ of u = −cos θ,
    Clenshaw–Curtis' variable, is unbiased too but converges only as K⁻²: |sin θ| has kinks.)
    A trained network's divergence is not always smooth in t — the DDPM sinusoidal time
    embedding (scale 1000) adds oscillations of period ~2π/1000 that no few-node fixed rule
    resolves, and their aliasing error is a bias; here it becomes noise that averages out over
    a data set. Made for data-set means (bits/dim over a test set), where each example's value
    need not be exact; with Hutchinson at the nodes (fresh probes each node) the estimate is
    unbiased up to the forward solve's error. The examples are split into ``groups`` groups,
    each with its own shift (one solve serves all: the dense output is asked at every group's
    nodes).

    ``error`` holds |Q_even − Q_odd|/2 per example (the two interleaved half-rules, each itself
    unbiased): a rough per-example spread, not a bound. Arguments as
    :func:`divergence_integral`; ``generator`` draws the shifts.
    """
    if isinstance(nodes, bool) or not isinstance(nodes, int) or nodes < 2 or nodes % 2:
        raise ValueError(f"need an even number of nodes >= 2, got {nodes!r}")
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(f"need groups >= 1, got {groups!r}")
    b, dim = x.shape[0], x[0].numel()
    g = min(groups, b)
    group_of = torch.arange(b) % g  # example -> group
    shift = torch.rand(g, generator=generator, dtype=torch.float64)
    half = 3.0
    k = torch.arange(nodes, dtype=torch.float64)
    s_nodes = -half + 2 * half * (k[None, :] + shift[:, None]) / nodes  # (g, K)
    arg = 0.5 * math.pi * torch.sinh(s_nodes)
    u = torch.tanh(arg)
    du_ds = 0.5 * math.pi * torch.cosh(s_nodes) / torch.cosh(arg) ** 2
    t_nodes = t0 + (u.reshape(-1) + 1) * 0.5 * (schedule.T - t0)
    weights = (2 * half / nodes) * 0.5 * (schedule.T - t0) * du_ds.reshape(-1)  # (g·K,) in dt
    # one sorted list of distinct output times from t0 to T (a node may round onto an end)
    ends = torch.tensor([t0, schedule.T], dtype=torch.float64)
    times, inverse = torch.unique(torch.cat([ends[:1], t_nodes, ends[1:]]), return_inverse=True)
    position = inverse[1:-1]  # index in `times` of node (group, k)
    wide = solve.wide
    times = times.to(dtype=wide, device=x.device)
    path, nfe = solve.path(score_fn, schedule, x, t0, times)
    # (node, example) pairs: example r uses its group's K nodes
    node_index = position.reshape(g, nodes)[group_of]  # (B, K) rows of `path`
    w = weights.reshape(g, nodes)[group_of].to(wide).to(x.device)  # (B, K)
    h = torch.empty(b, nodes, dtype=wide, device=x.device)
    ks_all = node_index.reshape(-1).to(x.device)
    rs_all = torch.arange(b, device=x.device).repeat_interleave(nodes)
    kk_all = torch.arange(nodes, device=x.device).repeat(b)
    chunk = max(b, batch_limit)
    for start in range(0, ks_all.numel(), chunk):
        ks, rs, kk = (a[start : start + chunk] for a in (ks_all, rs_all, kk_all))
        h[rs, kk] = node_divergence(score_fn, schedule, x, path, times, ks, rs, trace)
    terms = w * h
    delta = terms.sum(1) + linear_part(schedule, t0, dim, wide, x.device)
    # the half-rules Q_even = 2 Σ_even, Q_odd = 2 Σ_odd: |Q_even − Q_odd| / 2
    error = (terms[:, 0::2].sum(1) - terms[:, 1::2].sum(1)).abs()
    return QuadratureOutput(
        z=path[-1].reshape(x.shape),
        delta=delta,
        error=error,
        nodes=torch.full((b,), nodes, dtype=torch.long, device=x.device),
        nfe=nfe,
    )
