r"""Likelihood you can trust: the exact ODE log-likelihood and two variational bounds.

**ODE log-likelihood.** The probability-flow ODE dx/dt = v(x, t) = f(t) x − ½ g(t)² s(x, t) is a
continuous normalising flow from p_{t_min} to p_T, so for every example

    log p_{t_min}(x) = log π(z_T) + ∫_{t_min}^{T} ∇·v(x_t, t) dt,     z_T = x_T,

with π the schedule's prior (VE: N(0, σ_max² I); VP, sub-VP: N(0, I)). :func:`log_likelihood`
integrates x and the divergence integral together with torchdiffeq on the tensors' device, in
one batch, with three things the reference implementations get wrong:

- *per-example error control*: the adaptive step uses the norm ``max_b RMS_b(err)`` (see
  :func:`per_example_rms_norm`), so every example meets rtol/atol on its own — one hard example
  in a batch cannot dilute, and easy examples cannot relax, anyone's tolerance;
- the divergence is the exact trace (D vector-Jacobian products, vectorised in one batched
  backward pass) or Hutchinson's estimator with ``n_probes`` Gaussian or Rademacher probes, drawn
  once per trajectory so that the estimate of the integral is unbiased;
- gradients flow to the score function's parameters and to ``x`` (plain backpropagation through
  the solver, or the adjoint method with ``adjoint=True``).

The bounds on −log p(x_0) are in :mod:`sdelab.likelihood.bounds`.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

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
from sdelab.likelihood.forward import EXPONENTIAL_METHODS, EXPONENTIAL_STEPS, ForwardSolve
from sdelab.likelihood.quadrature import divergence_integral, randomized_divergence_integral
from sdelab.sde import Schedule
from sdelab.utils import (
    ADAPTIVE_SOLVERS,
    ScoreFn,
    randn_like,
)

__all__ = ["LikelihoodResult", "log_likelihood", "per_example_rms_norm"]

INTEGRATORS: tuple[str, ...] = ("quadrature", "randomized", "augmented")
BOUNDARIES: tuple[str, ...] = ("none", "decoder")


# ---- ODE log-likelihood ---------------------------------------------------------------------
def per_example_rms_norm(batch_size: int) -> Callable[[Tensor], Tensor]:
    """torchdiffeq error norm for a state of ``batch_size`` independent examples.

    torchdiffeq accepts a step when ``norm(err / (atol + rtol·|y|)) <= 1``. Its default RMS over
    the whole flattened batch lets one example's error be up to √B times the tolerance when the
    others are easy, so results depend on who shares the batch. This norm is the maximum over
    examples of each example's RMS: a step is accepted only when *every* example meets the
    tolerance, so each result is as accurate as if it were solved alone (a harder neighbour
    only makes the steps smaller). Works for the adjoint pass too (torchdiffeq applies it to
    the state and its adjoint, both shaped like the state).
    """

    def norm(scaled_error: Tensor) -> Tensor:
        return scaled_error.reshape(batch_size, -1).pow(2).mean(dim=1).sqrt().max()

    return norm


class _ProbabilityFlow(nn.Module):
    """Right-hand side of the augmented ODE on the flat state [x (D values), ∫∇·v] per example.

    An ``nn.Module`` holding the score function and the schedule, so ``odeint_adjoint`` finds
    their parameters.
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
        self.nfe = 0

    def forward(self, t: Tensor, state: Tensor) -> Tensor:
        self.nfe += 1
        create_graph = self.track and torch.is_grad_enabled()
        b = self.shape[0]
        with torch.enable_grad():
            x = _leaf(state[:, :-1].reshape(self.shape).to(self.dtype), create_graph)
            # only torchdiffeq's initial-step probe looks past T (steps stop at T: step_t)
            tb = t.to(x.dtype).clamp(*self.t_range).expand(b)
            v = self.schedule.probability_flow(x, tb, self.score_fn(x, tb))
            div = self.divergence(v, x, create_graph)
        out = torch.cat([v.reshape(b, -1), div[:, None]], dim=1).to(state.dtype)  # (B, D + 1)
        return out if create_graph else out.detach()


@dataclass(frozen=True)
class LikelihoodResult:
    """Per-example output of :func:`log_likelihood`; all tensors have a leading batch dim B.

    Attributes:
        logp: log p_{t_min}(x) in nats, ``(B,)`` = ``prior_logp + delta_logp``.
        prior_logp: log π(z_T), ``(B,)``.
        delta_logp: ∫_{t_min}^T ∇·v dt, ``(B,)``.
        z: the latent x_T, shaped like ``x``.
        nfe: number of evaluations of the ODE right-hand side in the forward solve (augmented:
            each one score evaluation plus its divergence; quadrature: score evaluations only).
        t_min: the time the data was placed at.
        density: what ``logp`` is: ``"log p_t_min"`` (the model's density at t_min, evaluated
            at x) or ``"log p_0 (decoder bound)"`` (``boundary="decoder"``: a one-sample
            estimate of a lower bound on log p_0(x)).
        integrator: ``"augmented"`` or ``"quadrature"``.
        divergence_evals: divergence evaluations per example, ``(B,)`` (augmented: ``nfe``
            for everyone; quadrature: the nodes each example needed).
        quad_error: the quadrature's per-example error estimate in nats, ``(B,)`` (NaN where
            there is none: the augmented integrator or a single quadrature level).
    """

    logp: Tensor
    prior_logp: Tensor
    delta_logp: Tensor
    z: Tensor
    nfe: int
    t_min: float
    density: str = "log p_t_min"
    integrator: str = "augmented"
    divergence_evals: Tensor | None = None
    quad_error: Tensor | None = None

    @property
    def nll(self) -> Tensor:
        """−log p_{t_min}(x) in nats, ``(B,)``."""
        return -self.logp


def log_likelihood(
    score_fn: ScoreFn,
    schedule: Schedule,
    x: Tensor,
    *,
    divergence: Literal["exact", "hutchinson"] = "exact",
    n_probes: int = 1,
    probe: Literal["rademacher", "gaussian"] = "rademacher",
    method: str | None = None,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    t_min: float | None = None,
    generator: torch.Generator | None = None,
    adjoint: bool = False,
    options: dict | None = None,
    solver_dtype: torch.dtype | None = torch.float64,
    integrator: Literal["quadrature", "randomized", "augmented"] = "augmented",
    time_variable: Literal["t", "log_snr"] = "t",
    quad_tol: float = 3e-3,
    min_nodes: int = 4,
    max_nodes: int = 128,
    trace_mode: Literal["reverse", "forward"] = "reverse",
    boundary: Literal["none", "decoder"] = "none",
    refresh_probes: bool = False,
    nodes: int = 16,
    prior_control: bool | None = None,
    solve_in: Literal["t", "log_snr"] | None = None,
    step_control: Literal["batch", "example"] | None = None,
) -> LikelihoodResult:
    r"""Exact per-example log-likelihood log p_{t_min}(x) through the probability-flow ODE.

    Three integrators for log p_{t_min}(x) = log π(x_T) + ∫_{t_min}^T ∇·v dt:

    - ``"quadrature"`` (opt-in, evaluation only): solve dx/dt = f x − ½ g² s(x, t) with
      forward passes only, then integrate the divergence by nested Clenshaw–Curtis quadrature
      on the solver's dense output, refining each example until its error estimate is below
      ``quad_tol`` (:mod:`sdelab.likelihood.quadrature`). The divergence is paid at ~9–33 nodes instead
      of at every stage of every step.
    - ``"randomized"`` (evaluation only, for data-set means; ``sdelab likelihood``'s choice for
      image runs): the forward-only solve (in log-SNR, dopri5), then a randomly shifted
      ``nodes``-point rule for the divergence
      (:func:`sdelab.likelihood.quadrature.randomized_divergence_integral`): unbiased for any integrand,
      so a divergence that oscillates in t (the DDPM time embedding) adds variance, not bias;
      Hutchinson probes are drawn fresh at every node.
    - ``"augmented"`` (default): integrate x and ∫∇·v together (the classic design);
      differentiable. It stays the default because on trained models (a 2-D toy, the digits
      U-Net) the divergence is so sharp near t_min that the quadrature did not meet its
      tolerance with 128 intervals (it warns; benchmarks/RESULTS.md, issue 17).

    The result is the density at ``t_min`` (``result.density``); ``boundary="decoder"`` turns
    it into an estimate of a lower bound on log p_0(x) for continuous data (below).

    Args:
        score_fn: ``score_fn(x, t) -> (B, ...)`` with ``t`` of shape ``(B,)``; any callable or a
            :class:`~sdelab.parametrization.ScoreModel`. Examples must not interact.
        schedule: the forward process; it fixes f, g² and the prior π.
        x: data, shape ``(B, ...)``, floating point (float64 for tolerances below ~1e-7).
        divergence: ``"exact"`` (trace from D vector-Jacobian products in one batched backward;
            cost grows with D, use for small D) or ``"hutchinson"`` (unbiased estimate).
        n_probes: Hutchinson probes per example (variance ∝ 1/n_probes); drawn once and kept
            fixed along the trajectory.
        probe: ``"rademacher"`` or ``"gaussian"`` probe entries.
        method: a torchdiffeq solver name (``dopri5``, ``dopri8``, ``bosh3``, ``rk4`` …; fixed
            step solvers need ``options=dict(step_size=...)``). Default: ``dopri8`` for the
            quadrature (its stages are forward passes only; measured 10–80× smaller error than
            dopri5 at the same tolerance and CPU time), ``dopri5`` for the augmented solve and
            the randomized rule. The quadrature rules also take ``"dpm3m"`` / ``"dpm2m"``:
            DPM-Solver++ run from the data to the prior on ``options["steps"]`` equal steps
            in λ (default 64; :func:`sdelab.likelihood.quadrature.exponential_path`), with dense output
            at no extra evaluation — no step control, so ``rtol``/``atol`` play no part;
            ``sdelab likelihood`` uses 3M with 64 steps for image runs (its bias measured
            ≤ 0.001 bpd on the trained digits and Fashion-MNIST U-Nets).
        rtol, atol: tolerances, met by *every* example (per-example error norm,
            :func:`per_example_rms_norm`).
        t_min: start time, in [schedule.t_min, T); default ``schedule.t_min``.
        generator: source of the Hutchinson probes.
        adjoint: use ``torchdiffeq.odeint_adjoint`` (memory O(1) in the number of steps).
            Gradients then reach ``x``, the schedule's parameters and, when ``score_fn`` is an
            ``nn.Module``, its parameters.
        options: extra solver options (a ``norm`` given here replaces the per-example norm).
        solver_dtype: dtype of the integrated state (x and the running ∫∇·v); the score
            function still sees ``x.dtype``. float64 (default) keeps a float32 model's result
            accurate to the tolerance — a float32 state accumulates ~1e-4 nats of rounding over
            a hundred steps; ``None`` integrates in ``x.dtype`` (e.g. on devices without float64).
        integrator: ``"augmented"`` (default), ``"quadrature"`` (no gradients; warns when an
            example misses ``quad_tol`` at ``max_nodes``) or ``"randomized"`` (no gradients;
            unbiased per example, exact only on average: for test-set means).
        nodes: the randomized rule's number of nodes per example (even). Its estimator noise
            falls as 1/√nodes at the cost of one divergence per node, while the forward solve
            is paid once: measured on the digits U-Net, 16–64 nodes (benchmarks/RESULTS.md).
        prior_control: quadrature rules only: also integrate log π(x_t) and hold its local
            error to ``atol`` nats per example (the tail-point fix of the per-example
            ``"quadrature"``, its default); ``None``: on for ``"quadrature"``, off for
            ``"randomized"`` (a data-set mean needs no per-example guarantee, and the forward
            solve takes ≈ 2× fewer evaluations without it at loose tolerances).
        solve_in: the forward-only solve's independent variable, ``"t"`` or ``"log_snr"``
            (:func:`sdelab.likelihood.quadrature.forward_path`); ``None``: ``"t"`` for ``"quadrature"``,
            ``"log_snr"`` for ``"randomized"`` (on the digits U-Net the solve in t carries a
            systematic error of x_T ≈ 700× its tolerance, +0.007 bpd at 1e-5, the one in λ
            ≈ 70×; on Fashion-MNIST λ at 1e-5 leaves +0.0003 bpd).
        time_variable: the quadrature's variable, ``"t"`` (default: measured best on VP and VE
            here) or ``"log_snr"`` (λ uniform).
        quad_tol: per-example bound on the quadrature's error estimate |Q_N − Q_{N/2}| (nats);
            the estimate is pessimistic (the error of Q_{N/2}), the answer is Q_N.
        min_nodes, max_nodes: the first and finest quadrature level (intervals; the levels
            double). Equal values: a fixed rule, no refinement.
        refresh_probes: Hutchinson with the quadrature only. ``False`` (default): each
            example's probes are drawn once and reused at every node, so the integrand
            εᵀ(∂v/∂x)ε is smooth in t and the refinement controls its quadrature error (the
            variance is that of probes fixed along the path). ``True``: fresh probes at every
            node — independent errors, several times less variance on smooth problems — but
            only with a fixed rule (``min_nodes == max_nodes``), whose quadrature error is then
            the user's to check (it is a bias: measured −0.1 nats with 16 intervals on a
            trained 2-D checkerboard model).
        step_control: quadrature rules only: ``"batch"`` (default: one step sequence for
            the batch, accepted when the worst example meets the tolerance) or ``"example"``
            (every example on its own Dormand–Prince 5(4) step sequence,
            :mod:`sdelab.likelihood.batched_rk`; needs ``method="dopri5"``): an example's result in a
            batch is then exactly its result alone, at any tolerance.
        trace_mode: the exact trace at a quadrature node by one batched backward pass
            (``"reverse"``, faster here) or by vmapped forward-mode products (``"forward"``).
        boundary: ``"none"`` (log p_{t_min}(x)) or ``"decoder"``: draw x_ε ~ N(α x, σ² I) at
            t_min, and return log p_{t_min}(x_ε) + log q(x | x_ε) − log N(x_ε; α x, σ² I) with
            the Tweedie decoder q = N(x̂_0, σ²/α² I) — an unbiased one-sample estimate of a
            lower bound on log p_0(x) (the bounds' boundary term; uses ``generator``).

    Returns:
        :class:`LikelihoodResult` (``logp``, ``prior_logp``, ``delta_logp``, ``z``, ``nfe``,
        ``nll``). If grad mode is on and ``x``, the score function or the schedule requires
        grad, ``logp`` is differentiable; run under ``torch.no_grad()`` for evaluation.

    Raises:
        ValueError: bad ``x`` (not floating, not a batch, NaN/inf), unknown ``divergence`` /
            ``probe`` / ``integrator`` / ``time_variable`` / ``boundary``, ``n_probes < 1``,
            ``t_min`` outside [schedule.t_min, T), ``integrator="quadrature"`` with gradients
            or ``adjoint=True``, or ``adjoint=True`` with a plain callable that closes over
            tensors requiring grad.

    Example::

        data = GaussianData(torch.zeros(2), torch.eye(2))
        sde = VPSchedule()
        res = log_likelihood(data.score_fn(sde), sde, data.sample(16))
        res.logp, res.nfe            # (16,) nats and the solver's work
    """
    _check_batch(x)
    t0 = schedule.t_min if t_min is None else float(t_min)
    if not schedule.t_min <= t0 < schedule.T:
        raise ValueError(
            f"t_min={t0:g} must lie in [schedule.t_min={schedule.t_min:g}, T={schedule.T:g})"
        )
    if integrator not in INTEGRATORS:
        raise ValueError(
            f"unknown integrator {integrator!r}: choose one of {', '.join(INTEGRATORS)}"
        )
    if boundary not in BOUNDARIES:
        raise ValueError(f"unknown boundary {boundary!r}: choose one of {', '.join(BOUNDARIES)}")
    div = _Divergence.make(x, divergence, n_probes, probe, generator)  # validates the options
    track = _tracks_grad(score_fn, schedule, x)
    if method is None:
        method = "dopri8" if integrator == "quadrature" else "dopri5"
    if integrator == "augmented" and (step_control is not None or solve_in is not None):
        raise ValueError(
            "step_control and solve_in belong to the forward-only solve of "
            "integrator='quadrature' or 'randomized', not to the augmented solve"
        )
    exponential = method in EXPONENTIAL_METHODS
    if exponential and integrator == "augmented":
        raise ValueError(
            f"method={method!r} is a fixed-grid forward-only solve: use it with "
            "integrator='randomized' or 'quadrature'"
        )
    if prior_control is None:  # the measured defaults of each integrator (issue 17)
        prior_control = integrator == "quadrature" and not exponential
    if solve_in is None:
        solve_in = "log_snr" if integrator == "randomized" or exponential else "t"
    if integrator != "augmented" and (track or adjoint):
        raise ValueError(
            f"integrator={integrator!r} computes no gradients: use integrator='augmented' (or run "
            "under torch.no_grad() for evaluation)"
        )
    if adjoint and track and not isinstance(score_fn, nn.Module):
        if _score_requires_grad(score_fn, schedule, x):
            raise ValueError(
                "adjoint=True cannot see tensors a plain score function closes over: wrap the "
                "score function in an nn.Module holding them as parameters (or use adjoint=False)"
            )
    x_data = x
    if boundary == "decoder":
        if float(schedule.alpha_sigma(torch.tensor(t0, dtype=torch.float64))[1]) <= 0:
            raise ValueError("boundary='decoder' needs σ(t_min) > 0: pass t_min > 0")
        noise = randn_like(x, generator)
        x = schedule.perturb(
            x, torch.full((x.shape[0],), t0, dtype=x.dtype, device=x.device), noise
        )
    b = x.shape[0]
    wide = solver_dtype or x.dtype
    ts = torch.tensor([t0, schedule.T], dtype=wide, device=x.device)
    opts = {"norm": per_example_rms_norm(b), **(options or {})}
    if method in ADAPTIVE_SOLVERS:  # land exactly on T instead of stepping past it
        opts.setdefault("step_t", ts[1:])
    if integrator != "augmented":
        fresh = integrator == "randomized" or refresh_probes
        if integrator == "randomized" and time_variable != "t":
            raise ValueError(
                "integrator='randomized' integrates in t (its tanh-sinh map already crowds the "
                "nodes at both ends): drop time_variable"
            )
        if (
            refresh_probes
            and integrator == "quadrature"
            and divergence != "exact"
            and (min_nodes != max_nodes)
        ):
            raise ValueError(
                "refresh_probes=True needs a fixed rule (min_nodes == max_nodes, e.g. 16): "
                "probe noise would defeat the refinement"
            )
        # its own default norm also watches log π(x_t) (quadrature.per_example_max_norm)
        quad_opts = dict(options or {})
        if method in ADAPTIVE_SOLVERS:
            quad_opts.setdefault("step_t", ts[1:])
        if exponential:
            quad_opts.setdefault("steps", EXPONENTIAL_STEPS)
        if divergence == "exact":

            def trace(fn, xx, rows):
                return exact_trace(fn, xx, trace_mode)
        elif fresh:

            def trace(fn, xx, rows):  # fresh probes at every node: independent errors
                return hutchinson_trace(fn, xx, sample_probes(xx, n_probes, probe, generator))
        else:
            fixed = sample_probes(x, n_probes, probe, generator)  # one set per example

            def trace(fn, xx, rows):  # the same probes at every node: a smooth integrand
                return hutchinson_trace(fn, xx, fixed[:, rows])

        solve = ForwardSolve(
            method=method,
            rtol=rtol,
            atol=atol,
            wide=wide,
            options=quad_opts,
            prior_control=prior_control,
            solve_in=solve_in,
            step_control=step_control or "batch",
        )
        common = dict(trace=trace, solve=solve)
        if integrator == "randomized":
            quad = randomized_divergence_integral(
                score_fn, schedule, x, t0, generator=generator, nodes=nodes, **common
            )
        else:
            quad = divergence_integral(
                score_fn,
                schedule,
                x,
                t0,
                min_nodes=min_nodes,
                max_nodes=max_nodes,
                quad_tol=quad_tol,
                time_variable=time_variable,
                **common,
            )
        z, delta, nfe = quad.z, quad.delta, quad.nfe
        evals, quad_error = quad.nodes, quad.error.to(x.dtype)
        # NaN (a fixed rule) compares False; the randomized rule's spread is not a tolerance
        unmet = int((quad_error > quad_tol).sum()) if integrator == "quadrature" else 0
        if unmet:
            warnings.warn(
                f"{unmet} example(s) did not meet quad_tol={quad_tol:g} with max_nodes="
                f"{max_nodes} (worst error estimate {float(quad_error.max()):.2g} nats): raise "
                "max_nodes or use integrator='augmented'",
                RuntimeWarning,
                stacklevel=2,
            )
        prior = schedule.prior_logp(z)
        logp = prior + delta
    else:
        func = _ProbabilityFlow(score_fn, schedule, x.shape, div, track, (t0, schedule.T), x.dtype)
        state0 = torch.cat([x.reshape(b, -1), x.new_zeros(b, 1)], dim=1).to(wide)
        solve = odeint_adjoint if adjoint else odeint
        with torch.set_grad_enabled(track):
            final = solve(func, state0, ts, rtol=rtol, atol=atol, method=method, options=opts)[-1]
            z = final[:, :-1].reshape(x.shape)
            delta = final[:, -1]
            prior = schedule.prior_logp(z)
            logp = prior + delta
        nfe = func.nfe
        evals = torch.full((b,), nfe, dtype=torch.long, device=x.device)
        quad_error = torch.full((b,), float("nan"), dtype=x.dtype, device=x.device)
    density = "log p_t_min"
    if boundary == "decoder":
        with torch.set_grad_enabled(track):
            logp = logp.to(x.dtype) - _decoder_gap(score_fn, schedule, x_data, x, noise, t0)
        density = "log p_0 (decoder bound)"
    return LikelihoodResult(
        logp=logp.to(x.dtype),
        prior_logp=prior.to(x.dtype),
        delta_logp=delta.to(x.dtype),
        z=z.to(x.dtype),
        nfe=nfe,
        t_min=t0,
        density=density,
        integrator=integrator,
        divergence_evals=evals,
        quad_error=quad_error,
    )
