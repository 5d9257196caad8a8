r"""The exact per-example log-likelihood through the probability-flow ODE, with an error bar.

The probability-flow ODE dx/dt = v(x, t) = f(t) x − ½ g(t)² s(x, t) is a continuous normalising
flow from p_{t_min} to p_T, so for every example

    log p_{t_min}(x) = log π(x_T) + ∫_{t_min}^{T} ∇·v(x_t, t) dt,

with π the schedule's prior. :func:`log_likelihood` computes it with one of three integrators
(:mod:`sdelab.likelihood.options`) and a divergence estimator (:mod:`sdelab.likelihood.divergence`),
and returns every example's value with an estimate of its error in nats:

- *per-example error control*: the step controller's norm is the worst example's, so one hard
  example cannot dilute, and easy examples cannot relax, anyone's tolerance; the two parts of
  the log-density — log π(x_t) along the path and ∫∇·v — are held in absolute nats, which is
  what keeps far-tail points (where log π is most sensitive to x) as accurate as ordinary ones;
- ``tol`` is the per-example target in nats: the per-example integrators solve each example at
  two tolerances and refine it until the two agree within ``tol``; the difference is reported
  as ``error`` (an over-estimate of the returned value's error);
- gradients flow to the score function's parameters and to ``x`` (:class:`Augmented`).

The bounds on −log p(x_0) are in :mod:`sdelab.likelihood.bounds`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn
from torchdiffeq import odeint, odeint_adjoint

from sdelab.likelihood.bounds import _decoder_gap
from sdelab.likelihood.divergence import (
    _check_batch,
    _Divergence,
    _leaf,
    _score_requires_grad,
    _tracks_grad,
    exact_trace,
    hutchinson_trace,
    sample_probes,
)
from sdelab.likelihood.forward import ForwardSolve
from sdelab.likelihood.options import (
    EXPONENTIAL_STEPS,
    Augmented,
    Exact,
    Hutchinson,
    Policy,
    Quadrature,
    Randomized,
    default_policy,
    fixed_grid,
)
from sdelab.likelihood.quadrature import divergence_integral, randomized_divergence_integral
from sdelab.sde import Schedule
from sdelab.utils import ADAPTIVE_SOLVERS, ScoreFn, randn_like

__all__ = ["LikelihoodResult", "decoder_bound", "log_likelihood", "per_example_rms_norm"]

#: tolerance ratio of the check: the second solve runs at tolerance/CHECK_RATIO.
CHECK_RATIO: float = 8.0
#: the reported error is ERROR_SAFETY × the two solves' difference (at least the last
#: tolerance): measured on the Gaussian oracle (VE, VP; D = 2, 16, 64; tol 1e-1…1e-3, tail
#: points included), it then covers the true error for ≥ 96 % of examples (1× covered 79–100 %).
ERROR_SAFETY: float = 3.0
#: the check's first solve runs at tolerance CHECK_START·tol (measured: starting at 4·tol cost
#: as much CPU on the Gaussian oracle's grid, the refinements eating the saving)
CHECK_START: float = 1.0
#: refinements of the check before an example is reported as unmet (with a warning).
CHECK_LEVELS: int = 5


def per_example_rms_norm(batch_size: int) -> Callable[[Tensor], Tensor]:
    """torchdiffeq error norm for a state of ``batch_size`` independent examples: the maximum
    over examples of each example's RMS, so a step is accepted only when *every* example meets
    the tolerance (torchdiffeq's default RMS over the whole batch lets one example's error be
    up to √B times the tolerance when the others are easy)."""

    def norm(scaled_error: Tensor) -> Tensor:
        return scaled_error.reshape(batch_size, -1).pow(2).mean(dim=1).sqrt().max()

    return norm


def _state_norm(batch_size: int, dim: int) -> Callable[[Tensor], Tensor]:
    """Norm of the augmented state [x (dim), log π(x_t), ∫∇·v (K)] per example: the worst
    example's max(RMS of its x part, largest nats column), so each log-density part meets its
    tolerance on its own rather than as one of dim + K + 1 components of an RMS."""

    def norm(scaled_error: Tensor) -> Tensor:
        e = scaled_error.reshape(batch_size, -1)
        rms = e[:, :dim].pow(2).mean(dim=1).sqrt()
        return torch.maximum(rms, e[:, dim:].abs().amax(dim=1)).max()

    return norm


class _ProbabilityFlow(nn.Module):
    """Right-hand side of the augmented ODE on the flat state [x (D), log π(x_t), ∫∇·v (K
    columns: the exact trace, or one per Hutchinson probe)] per example.

    An ``nn.Module`` holding the score function and the schedule, so ``odeint_adjoint`` finds
    their parameters. The log π(x_t) column (d/dt log π = −x·v/s²) costs no evaluation; it is
    there so that the step controller watches the latent's log-density in nats.
    """

    def __init__(
        self,
        score_fn: ScoreFn,
        schedule: Schedule,
        shape: torch.Size,
        divergence: _Divergence,
        track: bool,
        t_range: tuple[float, float],
        dtype: torch.dtype,
    ) -> None:
        super().__init__()
        self.score_fn = score_fn
        self.schedule = schedule
        self.shape = shape
        self.divergence = divergence
        self.track = track
        self.t_range = t_range
        self.dtype = dtype  # what the score function sees; the state may be wider
        self.dim = shape[1:].numel()
        self.nfe = 0

    def forward(self, t: Tensor, state: Tensor) -> Tensor:
        self.nfe += 1
        create_graph = self.track and torch.is_grad_enabled()
        b, d = self.shape[0], self.dim
        with torch.enable_grad():
            x = _leaf(state[:, :d].reshape(self.shape).to(self.dtype), create_graph)
            # only torchdiffeq's initial-step probe looks past T (steps stop at T: step_t)
            tb = t.to(x.dtype).clamp(*self.t_range).expand(b)
            v = self.schedule.probability_flow(x, tb, self.score_fn(x, tb))
            div = self.divergence.per_probe(v, x, create_graph)  # (B, K)
        v = v.reshape(b, -1).to(state.dtype)
        dprior = -(state[:, :d] * v).sum(1, keepdim=True) / self.schedule.prior_std**2
        out = torch.cat([v, dprior, div.to(state.dtype)], dim=1)  # (B, D + 1 + K)
        return out if create_graph else out.detach()


@dataclass(frozen=True)
class LikelihoodResult:
    """Per-example output of :func:`log_likelihood`; all tensors have a leading batch dim B.

    Attributes:
        logp: log p_{t_min}(x) in nats, ``(B,)`` = ``prior_logp + delta_logp``.
        prior_logp: log π(x_T), ``(B,)``.
        delta_logp: ∫_{t_min}^T ∇·v dt, ``(B,)``.
        z: the latent x_T, shaped like ``x``.
        error: each example's integration error estimate in nats, ``(B,)``: the two-tolerance
            check of :class:`Augmented` and :class:`Quadrature` (NaN with ``check=False``),
            the randomized rule's per-example spread (a standard deviation; its mean over a
            data set is unbiased), the quadrature's level difference on a fixed grid.
        probe_se: Hutchinson with K ≥ 2 probes and :class:`Augmented`: the standard error of
            the K probes' mean, ``(B,)``; ``None`` otherwise (the exact trace has none; the
            quadrature rules' ``error`` already holds their probe noise).
        nfe: evaluations of the ODE right-hand side, all solves together (augmented: each one
            score evaluation plus its divergence; quadrature rules: score evaluations only).
        divergence_evals: divergence evaluations per example, ``(B,)``.
        t_min: the time the data was placed at.
        policy: what was run (divergence, integrator, tol), after the defaults were resolved.
        density: ``"log p_t_min"`` (the model's density at t_min) or ``"log p_0 (decoder
            bound)"`` (:func:`~sdelab.likelihood.bounds.decoder_bound`).
    """

    logp: Tensor
    prior_logp: Tensor
    delta_logp: Tensor
    z: Tensor
    error: Tensor
    nfe: int
    divergence_evals: Tensor
    t_min: float
    policy: Policy
    probe_se: Tensor | None = None
    density: str = "log p_t_min"

    @property
    def nll(self) -> Tensor:
        """−log p_{t_min}(x) in nats, ``(B,)``."""
        return -self.logp


def log_likelihood(
    score_fn: ScoreFn,
    schedule: Schedule,
    x: Tensor,
    *,
    tol: float | None = None,
    divergence: Exact | Hutchinson | None = None,
    integrator: Augmented | Quadrature | Randomized | None = None,
    t_min: float | None = None,
    generator: torch.Generator | None = None,
) -> LikelihoodResult:
    r"""Per-example log-likelihood log p_{t_min}(x) through the probability-flow ODE, with an
    error estimate in nats for every example.

    Which integrator (guidance; measurements on the likelihood-speed benchmark page):

    - :class:`Augmented` (default for D ≤ 64 and whenever gradients are needed): x and ∫∇·v
      together, per-example values within ``tol``, differentiable;
    - :class:`Quadrature`: forward-only solve plus nested quadrature of the divergence, per
      example; fewer divergence evaluations on smooth problems, evaluation only;
    - :class:`Randomized` (default for D > 64 under ``torch.no_grad()``): unbiased per example
      but noisy — for data-set means such as test-set bits/dim.

    Args:
        score_fn: ``score_fn(x, t) -> (B, ...)`` with ``t`` of shape ``(B,)``; any callable or a
            :class:`~sdelab.parametrization.ScoreModel`. Examples must not interact.
        schedule: the forward process; it fixes f, g² and the prior π.
        x: data, ``(B, ...)``, floating point.
        tol: per-example target in nats (``None``: :data:`~sdelab.likelihood.options.DEFAULT_TOL`;
            unused by a fixed-grid forward solve).
        divergence: :class:`Exact` or :class:`Hutchinson` (``None``: the default policy).
        integrator: :class:`Augmented`, :class:`Quadrature` or :class:`Randomized` (``None``:
            :func:`~sdelab.likelihood.options.default_policy`).
        t_min: start time in [schedule.t_min, T) (default ``schedule.t_min``).
        generator: source of Hutchinson probes and of the randomized rule's shifts.

    Returns:
        :class:`LikelihoodResult` — ``logp``, ``error``, ``nll``, ``nfe`` and ``policy`` (what ran).
        If grad mode is on and ``x``, the score function or the schedule requires grad,
        ``logp`` is differentiable; run under ``torch.no_grad()`` for evaluation.

    Raises:
        ValueError: bad ``x`` (not floating, not a batch, NaN/inf), ``t_min`` outside
            [schedule.t_min, T), a bad ``tol`` or option object, an integrator without
            gradients when gradients are needed, or ``adjoint=True`` with a plain callable that
            closes over tensors requiring grad.

    Example::

        data = GaussianData(torch.zeros(2), torch.eye(2))
        sde = VPSchedule()
        res = log_likelihood(data.score_fn(sde), sde, data.sample(16), tol=1e-3)
        res.logp, res.error          # (16,) nats, each within ~1e-3 of the exact value
    """
    _check_batch(x)
    t0 = schedule.t_min if t_min is None else float(t_min)
    if not schedule.t_min <= t0 < schedule.T:
        raise ValueError(
            f"t_min={t0:g} must lie in [schedule.t_min={schedule.t_min:g}, T={schedule.T:g})"
        )
    track = _tracks_grad(score_fn, schedule, x)
    policy = default_policy(
        x.shape[1:], divergence=divergence, integrator=integrator, tol=tol, differentiable=track
    )
    if isinstance(policy.integrator, Augmented):
        return _augmented(score_fn, schedule, x, t0, policy, generator, track)
    div = policy.divergence
    if isinstance(policy.integrator, Quadrature):
        opts = policy.integrator
        if opts.refresh_probes and isinstance(div, Hutchinson) and opts.min_nodes != opts.max_nodes:
            raise ValueError(
                "refresh_probes=True needs a fixed rule (min_nodes == max_nodes, e.g. 16): probe "
                "noise would defeat the refinement"
            )
    probes = None
    refresh = isinstance(policy.integrator, Quadrature) and policy.integrator.refresh_probes
    if isinstance(div, Hutchinson):
        if refresh:
            # fresh probes at every node, drawn once per (node, example): the two solves of the
            # check then see the same probes, and their difference is the solve's error alone
            # rather than the probes' noise
            n_times = policy.integrator.max_nodes + 1
            probes = sample_probes(x.expand(n_times, *x.shape), div.n_probes, div.probe, generator)
            # (K, nodes + 1, B, ...)
        else:
            probes = sample_probes(x, div.n_probes, div.probe, generator)  # fixed along a path

    def solve(rows: Tensor, tau: float | None, q: Tensor | None = None) -> _Partial:
        return _forward_only(
            score_fn,
            schedule,
            x[rows],
            t0,
            policy,
            tau,
            generator,
            None if probes is None else probes[:, :, rows] if refresh else probes[:, rows],
            q,
        )

    if isinstance(policy.integrator, Randomized) or fixed_grid(policy.integrator):
        part = solve(torch.arange(x.shape[0], device=x.device), policy.tol)
        return part.result(x, t0, policy)
    return _checked(solve, x, t0, policy, schedule.prior_std)


# ---- the integrators --------------------------------------------------------------------------
@dataclass
class _Partial:
    """One solve of some rows: per-row tensors and the solve's evaluations."""

    logp: Tensor
    prior: Tensor
    delta: Tensor  # (n, K): per probe (K = 1: exact trace or the probe mean)
    z: Tensor
    nfe: int
    evals: Tensor
    error: Tensor | None = None

    def result(
        self, x: Tensor, t0: float, policy: Policy, error: Tensor | None = None
    ) -> LikelihoodResult:
        k = self.delta.shape[1]
        probe_se = self.delta.std(dim=1) / math.sqrt(k) if k > 1 else None
        err = error if error is not None else self.error
        if err is None:
            err = torch.full_like(self.logp, float("nan"))
        dt = x.dtype
        return LikelihoodResult(
            logp=self.logp.to(dt),
            prior_logp=self.prior.to(dt),
            delta_logp=self.delta.mean(dim=1).to(dt),
            z=self.z.to(dt),
            error=err.to(dt),
            nfe=self.nfe,
            divergence_evals=self.evals,
            t_min=t0,
            policy=policy,
            probe_se=None if probe_se is None else probe_se.to(dt),
        )


def _checked(
    solve: Callable[[Tensor, float, Tensor], _Partial],
    x: Tensor,
    t0: float,
    policy: Policy,
    prior_std: float,
) -> LikelihoodResult:
    """Solve every example at tolerances τ and τ/r (τ = tol, r = CHECK_RATIO); while an
    example's two values differ by more than ``tol``, solve it alone again one level tighter.
    The returned value is the tighter solve, its ``error`` the last difference (an estimate of
    the looser solve's error, so an over-estimate of the returned one's).

    ``solve(rows, τ, q)`` also takes each example's sensitivity q = max(D, |x_T|²/s²): a
    relative error δ of x_T moves log π(x_T) by ≈ q δ nats, so x is solved to τ/q. The first
    solve guesses q = D; later ones take it from the latest x_T (far-tail points have q ≫ D)."""
    tol = float(policy.tol)
    dim = x[0].numel()
    rows = torch.arange(x.shape[0], device=x.device)

    def sensitivity(z: Tensor) -> Tensor:
        q = z.detach().reshape(z.shape[0], -1).pow(2).sum(1) / prior_std**2
        return q.clamp(min=dim)

    q = torch.full((x.shape[0],), float(dim), dtype=torch.float64, device=x.device)
    if isinstance(policy.integrator, Augmented) and not policy.integrator.check:
        return solve(rows, tol / CHECK_RATIO, q).result(x, t0, policy)
    tau = tol * CHECK_START
    coarse = solve(rows, tau, q)
    q = sensitivity(coarse.z).to(q.dtype)
    tau /= CHECK_RATIO
    fine = solve(rows, tau, q)
    # the tighter solve's own estimate (a quadrature's level difference): the two solves share
    # a capped rule's truncation error, which their difference cannot see
    own = fine.error
    nfe = coarse.nfe + fine.nfe
    evals = coarse.evals + fine.evals
    error = (fine.logp - coarse.logp).abs().detach()
    floor = torch.full_like(error, tau)  # each example's last tolerance
    for _ in range(CHECK_LEVELS):
        bad = (error > tol) | ~torch.isfinite(error)
        if not bool(bad.any()):
            break
        rows = bad.nonzero().squeeze(1)
        tau /= CHECK_RATIO
        q = q.index_put((rows,), sensitivity(fine.z[rows]).to(q.dtype))
        new = solve(rows, tau, q[rows])
        nfe += new.nfe
        evals = evals.index_add(0, rows, new.evals)
        error = error.index_put((rows,), (new.logp - fine.logp[rows]).abs().detach())
        floor = floor.index_fill(0, rows, tau)
        if own is not None:
            own = own.index_put((rows,), new.error)
        fine = _Partial(
            logp=fine.logp.index_put((rows,), new.logp),
            prior=fine.prior.index_put((rows,), new.prior),
            delta=fine.delta.index_put((rows,), new.delta),
            z=fine.z.index_put((rows,), new.z),
            nfe=0,
            evals=evals,
        )
    # the difference estimates the looser solve's error (×ERROR_SAFETY: the errors are not yet
    # proportional to the tolerance at loose tol); the tighter one's tolerance is a floor
    unmet_rows = error > tol
    error = torch.maximum(ERROR_SAFETY * error, floor)
    if own is not None:
        own = torch.nan_to_num(own.to(error.dtype), nan=0.0)
        unmet_rows |= own > tol
        error = torch.maximum(error, own)
    unmet = int(unmet_rows.sum())
    if unmet:
        warnings.warn(
            f"{unmet} example(s) did not meet tol={tol:g} nats after {CHECK_LEVELS} "
            f"refinements (worst error estimate {float(error.max()):.2g} nats): their error is "
            "reported in the result's `error`",
            RuntimeWarning,
            stacklevel=3,
        )
    fine.nfe, fine.evals = nfe, evals
    return fine.result(x, t0, policy, error)


def _augmented(
    score_fn: ScoreFn,
    schedule: Schedule,
    x: Tensor,
    t0: float,
    policy: Policy,
    generator: torch.Generator | None,
    track: bool,
) -> LikelihoodResult:
    opts: Augmented = policy.integrator
    if opts.adjoint and track and not isinstance(score_fn, nn.Module):
        if _score_requires_grad(score_fn, schedule, x):
            raise ValueError(
                "Augmented(adjoint=True) cannot see tensors a plain score function closes over: "
                "wrap the score function in an nn.Module holding them as parameters (or use "
                "adjoint=False)"
            )
    div = policy.divergence
    if isinstance(div, Exact):
        cot = _Divergence.make(x, True)
    else:
        cot = _Divergence.make(x, False, div.n_probes, div.probe, generator)
    wide = opts.state_dtype or x.dtype
    dim = x[0].numel()

    def solve(rows: Tensor, tau: float, q: Tensor) -> _Partial:
        xs = x[rows]
        b = xs.shape[0]
        d = _Divergence(cot.cotangents[:, rows], cot.exact)
        func = _ProbabilityFlow(score_fn, schedule, xs.shape, d, track, (t0, schedule.T), x.dtype)
        k = d.n_columns
        state0 = torch.cat([xs.reshape(b, -1), xs.new_zeros(b, 1 + k)], dim=1).to(wide)
        ts = torch.tensor([t0, schedule.T], dtype=wide, device=x.device)
        # the log-density columns: τ nats, absolute. x: τ/q per example, relative and absolute
        # (q: the sensitivity of log π(x_T) to a relative error of x_T, _checked); with τ for
        # x, VE errors stalled at 30–250 τ (no contraction: early errors reach T whole)
        tau_x = (tau / q).to(wide)[:, None]
        rtol = torch.cat([tau_x.expand(b, dim), tau_x.new_zeros(b, 1 + k)], dim=1)
        atol = torch.cat([tau_x.expand(b, dim), tau_x.new_full((b, 1 + k), tau)], dim=1)
        options = {"norm": _state_norm(b, dim)}
        if opts.method in ADAPTIVE_SOLVERS:  # land exactly on T instead of stepping past it
            options["step_t"] = ts[1:]
        kw = dict(rtol=rtol, atol=atol, method=opts.method, options=options)
        if opts.adjoint:  # the adjoint state is a tuple: scalar tolerances there
            kw.update(adjoint_rtol=tau, adjoint_atol=tau)
        with torch.set_grad_enabled(track):
            final = (odeint_adjoint if opts.adjoint else odeint)(func, state0, ts, **kw)[-1]
            z = final[:, :dim].reshape(xs.shape)
            delta = final[:, dim + 1 :]
            # log π(x_T) as integrated along the path (the column the controller holds in
            # nats): measured 10–100× more accurate than log π of the solved x_T for VE
            prior = schedule.prior_logp(xs.to(wide)) + final[:, dim]
            logp = prior + delta.mean(dim=1)
        evals = torch.full((b,), func.nfe, dtype=torch.long, device=x.device)
        return _Partial(logp, prior, delta, z, func.nfe, evals)

    return _checked(solve, x, t0, policy, schedule.prior_std)


def _forward_only(
    score_fn: ScoreFn,
    schedule: Schedule,
    x: Tensor,
    t0: float,
    policy: Policy,
    tau: float | None,
    generator: torch.Generator | None,
    probes: Tensor | None,
    q: Tensor | None = None,
) -> _Partial:
    """One forward-only solve plus the quadrature or randomized rule for the rows ``x``;
    ``q``: their sensitivities (:func:`_checked`), which divide x's tolerance of an adaptive
    forward solve."""
    opts = policy.integrator
    randomized = isinstance(opts, Randomized)
    div = policy.divergence
    wide = opts.state_dtype or x.dtype
    if isinstance(div, Exact):
        mode = div.mode

        def trace(fn, xx, rows, nodes):
            return exact_trace(fn, xx, mode)
    elif randomized:

        def trace(fn, xx, rows, nodes):  # fresh probes at every node: independent errors
            return hutchinson_trace(fn, xx, sample_probes(xx, div.n_probes, div.probe, generator))
    elif opts.refresh_probes:

        def trace(fn, xx, rows, nodes):  # each (node, example)'s own probes, drawn once
            return hutchinson_trace(fn, xx, probes[:, nodes, rows])
    else:

        def trace(fn, xx, rows, nodes):  # the same probes at every node: a smooth integrand
            return hutchinson_trace(fn, xx, probes[:, rows])

    options: dict = {}
    if fixed_grid(opts):
        options["steps"] = opts.steps or EXPONENTIAL_STEPS
        tau = 1.0  # unused by a fixed grid
    elif opts.method in ADAPTIVE_SOLVERS:
        options["step_t"] = torch.tensor([schedule.T], dtype=wide, device=x.device)
    solve = ForwardSolve(
        method=opts.method,
        rtol=tau,
        atol=tau,
        wide=wide,
        options=options,
        prior_control=(not randomized) and opts.prior_control and not fixed_grid(opts),
        solve_in=opts.solve_in,
        step_control="batch" if randomized else opts.step_control,
        x_scale=None if fixed_grid(opts) else q,
    )
    if randomized:
        quad = randomized_divergence_integral(
            score_fn,
            schedule,
            x,
            t0,
            trace=trace,
            solve=solve,
            generator=generator,
            nodes=opts.nodes,
        )
        error = quad.error
    else:
        quad = divergence_integral(
            score_fn,
            schedule,
            x,
            t0,
            trace=trace,
            solve=solve,
            min_nodes=opts.min_nodes,
            max_nodes=opts.max_nodes,
            quad_tol=tau if not fixed_grid(opts) else (policy.tol or 1e-3),
            time_variable=opts.time_variable,
        )
        error = quad.error
    prior = schedule.prior_logp(quad.z)
    return _Partial(
        logp=prior + quad.delta,
        prior=prior,
        delta=quad.delta[:, None],
        z=quad.z,
        nfe=quad.nfe,
        evals=quad.nodes,
        error=error.to(wide),
    )


def decoder_bound(
    score_fn: ScoreFn,
    schedule: Schedule,
    x: Tensor,
    *,
    tol: float | None = None,
    divergence: Exact | Hutchinson | None = None,
    integrator: Augmented | Quadrature | Randomized | None = None,
    generator: torch.Generator | None = None,
) -> LikelihoodResult:
    """An unbiased one-sample estimate of a lower bound on log p_0(x) for continuous data.

    Draws x_ε ~ N(α x, σ² I) at t_min and returns log p_{t_min}(x_ε) + log q(x | x_ε) −
    log N(x_ε; α x, σ² I) with the Tweedie decoder q = N(x̂_0, σ²/α² I) (the bounds' boundary
    term); ``density`` is ``"log p_0 (decoder bound)"``. Arguments as :func:`log_likelihood`;
    ``generator`` also draws x_ε.

    Raises:
        ValueError: σ(t_min) = 0 (no decoder), or as :func:`log_likelihood`.
    """
    _check_batch(x)
    t0 = schedule.t_min
    if float(schedule.alpha_sigma(torch.tensor(t0, dtype=torch.float64))[1]) <= 0:
        raise ValueError("decoder_bound needs σ(t_min) > 0: build the schedule with t_min > 0")
    noise = randn_like(x, generator)
    x_eps = schedule.perturb(
        x, torch.full((x.shape[0],), t0, dtype=x.dtype, device=x.device), noise
    )
    res = log_likelihood(
        score_fn,
        schedule,
        x_eps,
        tol=tol,
        divergence=divergence,
        integrator=integrator,
        generator=generator,
    )
    with torch.set_grad_enabled(res.logp.requires_grad):
        logp = res.logp - _decoder_gap(score_fn, schedule, x, x_eps, noise, t0).to(res.logp.dtype)
    return replace(res, logp=logp, density="log p_0 (decoder bound)")
