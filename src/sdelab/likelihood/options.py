r"""What :func:`~sdelab.likelihood.log_likelihood` is asked to do, as small frozen objects.

A family's knobs live on the object they belong to and are checked when it is built, so the
front door stays small (as diffrax's ``diffeqsolve(solver=..., stepsize_controller=...)``):

- the divergence estimator: :class:`Exact` or :class:`Hutchinson`;
- the integrator of log p = log π(x_T) + ∫ ∇·v dt: :class:`Augmented` (x and the divergence
  together; per-example, differentiable), :class:`Quadrature` (forward-only solve, nested
  Clenshaw–Curtis rule of the divergence; per-example, evaluation only) or :class:`Randomized`
  (forward-only solve, randomly shifted rule with fresh probes; unbiased for data-set means);
- :func:`default_policy`: the one place where ``None`` becomes a choice. The library, the run
  layer, the CLI, the training hook and models loaded from diffusers all call it.

Every object has a ``tag`` — a short, stable string naming it with every setting that changes a
number (result files are named by it, so a name and its computation cannot disagree) — and a
``record()`` dict that results store.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Literal

import torch

from sdelab.likelihood.divergence import PROBES, TRACE_MODES
from sdelab.likelihood.forward import (
    EXPONENTIAL_METHODS,
    EXPONENTIAL_STEPS,
    SOLVE_VARIABLES,
    STEP_CONTROLS,
)
from sdelab.likelihood.quadrature import TIME_VARIABLES
from sdelab.utils import ADAPTIVE_SOLVERS, check_int

__all__ = [
    "DEFAULT_TOL",
    "EXACT_MAX_DIM",
    "RANDOMIZED_NODES",
    "Augmented",
    "Divergence",
    "Exact",
    "Hutchinson",
    "Integrator",
    "Policy",
    "Quadrature",
    "Randomized",
    "default_policy",
]

#: per-example tolerance in nats when none is given (the per-example integrators).
DEFAULT_TOL: float = 1e-2
#: largest dimension whose default divergence is the exact trace (D products per evaluation);
#: above it the default is one Hutchinson probe and the randomized rule (data-set means).
EXACT_MAX_DIM: int = 64
#: the randomized rule's node count when none is given: (dimension from which the second count
#: applies, nodes below it, nodes from it on). Measured on trained U-Nets against Score-SDE's
#: own likelihood.py at SE ≤ 0.005 and solver bias ≤ 0.002 bpd: at D = 64 (digits) 32 nodes
#: reach the SE in one pass; at D = 784 (Fashion-MNIST) one pass is far below it either way
#: and 16 nodes are 5.7× cheaper than the peer where 32 are 4.0× (docs/benchmarks/likelihood.md).
RANDOMIZED_NODES: tuple[int, int, int] = (256, 32, 16)
_DTYPES = {None: "native", torch.float64: "f64", torch.float32: "f32"}


def _fail(msg: str) -> None:
    raise ValueError(msg)


def _choice(name: str, value: object, choices) -> None:
    if value not in choices:
        _fail(f"unknown {name} {value!r}: choose one of {', '.join(map(str, choices))}")


def _solver_name(method: str, forward_only: bool) -> None:
    allowed = (*ADAPTIVE_SOLVERS, *EXPONENTIAL_METHODS) if forward_only else ADAPTIVE_SOLVERS
    if method not in allowed:
        where = "the forward-only solve" if forward_only else "the augmented solve"
        _fail(f"unknown method {method!r} for {where}: choose one of {', '.join(allowed)}")


def _record(obj) -> dict:
    out = {"kind": type(obj).__name__}
    for k, v in asdict(obj).items():
        out[k] = _DTYPES.get(v, str(v)) if isinstance(v, torch.dtype) or v is None else v
    return out


# ---- divergence estimators ------------------------------------------------------------------
@dataclass(frozen=True)
class Exact:
    """The exact trace of ∂v/∂x: D vector-Jacobian products per evaluation (small D).

    Attributes:
        mode: at the quadrature rules' nodes, one batched backward pass (``"reverse"``) or
            vmapped forward-mode products (``"forward"``; falls back to reverse where a network
            has no forward-mode rule).
    """

    mode: Literal["reverse", "forward"] = "reverse"

    def __post_init__(self) -> None:
        _choice("trace mode", self.mode, TRACE_MODES)

    @property
    def tag(self) -> str:
        return "exact" if self.mode == "reverse" else "exact-fwd"

    def record(self) -> dict:
        return _record(self)


@dataclass(frozen=True)
class Hutchinson:
    """Hutchinson's unbiased estimate (1/K) Σ_k ε_kᵀ (∂v/∂x) ε_k with E[ε εᵀ] = I.

    Attributes:
        n_probes: K, probes per example (variance ∝ 1/K). With K ≥ 2 the results carry the
            probes' standard error per example (:attr:`LikelihoodResult.probe_se`).
        probe: ``"rademacher"`` (±1 entries, lower variance) or ``"gaussian"``.
    """

    n_probes: int = 1
    probe: Literal["rademacher", "gaussian"] = "rademacher"

    def __post_init__(self) -> None:
        check_int("n_probes", self.n_probes, 1)
        _choice("probe", self.probe, PROBES)

    @property
    def tag(self) -> str:
        return f"hutchinson{self.n_probes}" + ("" if self.probe == "rademacher" else "g")

    def record(self) -> dict:
        return _record(self)


Divergence = Exact | Hutchinson


# ---- integrators ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Augmented:
    """Integrate x and ∫∇·v together (the classic design); per-example, differentiable.

    The step controller holds, per example, the local error of x (relative and absolute
    ``tol``-scaled) and of the two log-density parts — log π(x_t) along the path and ∫∇·v — in
    absolute nats. With ``check=True`` each example is solved at two tolerances and refined
    until their difference is below ``tol``; that difference is its ``error``.

    Attributes:
        method: a torchdiffeq adaptive solver (``dopri5``, ``dopri8``, ``bosh3``, …).
        adjoint: gradients by ``torchdiffeq.odeint_adjoint`` (memory O(1) in the steps).
        check: the two-tolerance check that gives ``error`` (``False``: one solve, ``error``
            NaN — e.g. when training through the likelihood).
        state_dtype: dtype of the integrated state (float64 keeps a float32 model's result
            accurate to the tolerance); ``None`` integrates in the data's dtype.
    """

    method: str = "dopri5"
    adjoint: bool = False
    check: bool = True
    state_dtype: torch.dtype | None = torch.float64

    def __post_init__(self) -> None:
        _solver_name(self.method, forward_only=False)

    @property
    def tag(self) -> str:
        return f"augmented_{self.method}" + ("" if self.check else "_nocheck")

    def record(self) -> dict:
        return _record(self)


@dataclass(frozen=True)
class Quadrature:
    """Forward-only solve of x(t), then nested Clenshaw–Curtis quadrature of the divergence,
    refined per example; evaluation only (no gradients). An adaptive forward solve holds x to
    tol over each example's sensitivity max(D, |x_T|²/s²), as :class:`Augmented` does, and
    the tolerance check runs as there.

    Attributes:
        method: the forward solve: an adaptive torchdiffeq solver (default ``dopri8``) or
            ``"dpm3m"``/``"dpm2m"`` (DPM-Solver++ on ``steps`` equal steps in λ).
        steps: steps of a ``dpm`` forward solve (``None``: 64).
        time_variable: the quadrature's variable, ``"t"`` or ``"log_snr"``.
        min_nodes, max_nodes: coarsest and finest level (intervals; levels double).
        prior_control: integrate log π(x_t) beside x and hold its error in nats.
        solve_in: the forward solve's independent variable, ``"t"`` or ``"log_snr"``.
        step_control: ``"batch"`` (one step sequence) or ``"example"`` (one per example:
            a result is then exactly the same in any batch).
        refresh_probes: Hutchinson only: fresh probes at every node (needs a fixed rule).
        state_dtype: dtype of the integrated state.
    """

    method: str = "dopri8"
    steps: int | None = None
    time_variable: Literal["t", "log_snr"] = "t"
    min_nodes: int = 4
    max_nodes: int = 128
    prior_control: bool = True
    solve_in: Literal["t", "log_snr"] = "t"
    step_control: Literal["batch", "example"] = "batch"
    refresh_probes: bool = False
    state_dtype: torch.dtype | None = torch.float64

    def __post_init__(self) -> None:
        _solver_name(self.method, forward_only=True)
        _choice("time_variable", self.time_variable, TIME_VARIABLES)
        _choice("solve_in", self.solve_in, SOLVE_VARIABLES)
        _choice("step_control", self.step_control, STEP_CONTROLS)
        check_int("min_nodes", self.min_nodes, 2)
        check_int("max_nodes", self.max_nodes, self.min_nodes)
        _check_steps(self.method, self.steps, self.solve_in, self.step_control)

    @property
    def tag(self) -> str:
        return f"quadrature_{_solver_tag(self.method, self.steps)}"

    def record(self) -> dict:
        return _record(self)


@dataclass(frozen=True)
class Randomized:
    """Forward-only solve, then a randomly shifted ``nodes``-point rule for the divergence with
    fresh Hutchinson probes at every node: unbiased per example, exact only on average — the
    choice for data-set means of large images. Evaluation only.

    Attributes:
        nodes: nodes per example (even); the estimator's noise falls as 1/√nodes. ``None``:
            :func:`default_policy` picks 32 for examples of fewer than 256 values and 16 from
            256 on (:data:`RANDOMIZED_NODES`).
        method: ``"dpm3m"`` (default: DPM-Solver++(3M) on ``steps`` equal steps in λ),
            ``"dpm2m"``, or an adaptive torchdiffeq solver (then ``tol`` sets its tolerance).
        steps: steps of a ``dpm`` forward solve (``None``: 64).
        solve_in: the forward solve's variable (``"log_snr"``; ``dpm`` methods need it).
        state_dtype: dtype of the integrated state.
    """

    nodes: int | None = None
    method: str = "dpm3m"
    steps: int | None = None
    solve_in: Literal["t", "log_snr"] = "log_snr"
    state_dtype: torch.dtype | None = torch.float64

    def __post_init__(self) -> None:
        if self.nodes is not None:
            check_int("nodes", self.nodes, 2)
            if self.nodes % 2:
                _fail(f"nodes must be even (the rule's two half-rules), got {self.nodes}")
        _solver_name(self.method, forward_only=True)
        _choice("solve_in", self.solve_in, SOLVE_VARIABLES)
        _check_steps(self.method, self.steps, self.solve_in, "batch")

    @property
    def tag(self) -> str:
        nodes = "auto" if self.nodes is None else self.nodes
        return f"randomized{nodes}_{_solver_tag(self.method, self.steps)}"

    def record(self) -> dict:
        return _record(self)


Integrator = Augmented | Quadrature | Randomized


def _check_steps(method: str, steps: int | None, solve_in: str, step_control: str) -> None:
    if method in EXPONENTIAL_METHODS:
        if steps is not None:
            check_int("steps", steps, 2)
        if solve_in != "log_snr" or step_control != "batch":
            _fail(
                f"method={method!r} steps on a fixed grid in λ: use solve_in='log_snr' and "
                "step_control='batch'"
            )
    elif steps is not None:
        _fail(f"steps applies to the fixed-grid methods ({', '.join(EXPONENTIAL_METHODS)})")


def _solver_tag(method: str, steps: int | None) -> str:
    if method in EXPONENTIAL_METHODS:
        return f"{method}{steps or EXPONENTIAL_STEPS}"
    return method


def fixed_grid(integrator: Integrator) -> bool:
    """Whether the integrator's forward solve is a fixed grid (no tolerance applies)."""
    return getattr(integrator, "method", "") in EXPONENTIAL_METHODS


# ---- the default policy -----------------------------------------------------------------------
@dataclass(frozen=True)
class Policy:
    """A resolved choice: what :func:`log_likelihood` will run (recorded in every result)."""

    divergence: Exact | Hutchinson
    integrator: Augmented | Quadrature | Randomized
    tol: float | None  # None: the integrator takes no tolerance (a fixed grid)

    @property
    def tag(self) -> str:
        tol = "" if self.tol is None else f"_tol{self.tol:g}"
        return f"{self.integrator.tag}_{self.divergence.tag}{tol}"

    def record(self) -> dict:
        return {
            "divergence": self.divergence.record(),
            "integrator": self.integrator.record(),
            "tol": self.tol,
            "tag": self.tag,
        }


def default_policy(
    shape: int | tuple[int, ...] | torch.Size,
    *,
    divergence: Exact | Hutchinson | None = None,
    integrator: Augmented | Quadrature | Randomized | None = None,
    tol: float | None = None,
    differentiable: bool = False,
) -> Policy:
    """The one place where unset likelihood options become choices.

    ``shape`` is one example's shape (``x.shape[1:]``), or an int D for vectors of D values.

    - vectors with D ≤ EXACT_MAX_DIM (toys, tabular data), or gradients needed: per-example
      values — the exact trace (Hutchinson when D is larger) and :class:`Augmented` with the
      tolerance check, ``tol = DEFAULT_TOL`` nats;
    - images (an example of rank ≥ 2, e.g. ``(C, H, W)``) and vectors with D > EXACT_MAX_DIM,
      evaluation: data-set means — one Hutchinson probe and :class:`Randomized` (DPM-Solver++(3M),
      64 steps in λ; 32 nodes below 256 values per example, 16 from 256 on), ≥ 5× cheaper than
      Score-SDE's likelihood code at equal data-set accuracy (docs/benchmarks/likelihood.md).

    An explicit ``divergence`` or ``integrator`` is kept; the other part is filled in to fit it
    (Hutchinson with the randomized rule, whose per-node probes are part of its design).

    Raises:
        ValueError: a non-positive or non-finite ``tol``; gradients with an integrator that
            has none.
    """
    if isinstance(shape, int) and not isinstance(shape, bool):
        dim, image = shape, False
    else:
        shape = tuple(int(s) for s in shape)
        if not shape or min(shape) < 1:
            _fail(f"shape must be one example's shape, e.g. (C, H, W), got {shape!r}")
        dim, image = math.prod(shape), len(shape) >= 2
    check_int("dim", dim, 1)
    if tol is not None:
        if (
            isinstance(tol, bool)
            or not isinstance(tol, int | float)
            or not (0 < tol < float("inf"))
        ):
            _fail(f"tol must be a positive number of nats, got {tol!r}")
        tol = float(tol)
    if integrator is not None and not isinstance(integrator, Augmented | Quadrature | Randomized):
        _fail(f"integrator must be Augmented(), Quadrature() or Randomized(), got {integrator!r}")
    if divergence is not None and not isinstance(divergence, Exact | Hutchinson):
        _fail(f"divergence must be Exact() or Hutchinson(), got {divergence!r}")
    if differentiable and integrator is not None and not isinstance(integrator, Augmented):
        _fail(
            f"{type(integrator).__name__} computes no gradients: use Augmented() (or run under "
            "torch.no_grad() for evaluation)"
        )
    large = image or dim > EXACT_MAX_DIM
    if integrator is None:
        if differentiable or not large:
            integrator = Augmented()
        elif isinstance(divergence, Exact):
            integrator = Augmented()
        else:
            integrator = Randomized()
    if isinstance(integrator, Randomized) and integrator.nodes is None:
        cut, small_nodes, large_nodes = RANDOMIZED_NODES
        integrator = replace(integrator, nodes=small_nodes if dim < cut else large_nodes)
    if divergence is None:
        if isinstance(integrator, Randomized) or large:
            divergence = Hutchinson()
        else:
            divergence = Exact()
    if fixed_grid(integrator) and isinstance(integrator, Randomized):
        tol = None  # a fixed rule on a fixed grid: nothing for a tolerance to set
    elif tol is None:
        tol = DEFAULT_TOL
    return Policy(divergence=divergence, integrator=integrator, tol=tol)
