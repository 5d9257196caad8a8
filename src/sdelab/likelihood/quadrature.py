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
from dataclasses import dataclass

import torch
from torch import Tensor

from sdelab.likelihood.forward import ForwardSolve
from sdelab.sde import Schedule
from sdelab.utils import ScoreFn

#: time variables of the quadrature: ``"log_snr"`` (λ uniform) or ``"t"``.
TIME_VARIABLES: tuple[str, ...] = ("log_snr", "t")


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

    div = trace(flow, xs, rs, ks).to(path.dtype)
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

    ``trace(fn, x, rows, nodes)`` returns tr ∂fn/∂x per example (exact or an estimate); ``rows``
    are the indices in the batch of ``x``'s examples and ``nodes`` those of their times in the
    solve's output times (for probes fixed per example, or per node and example). Runs without
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
