r"""Data-set likelihood: dequantize, estimate, account — nats and bits/dim with an error bar.

This module composes the maths below it: :mod:`sdelab.likelihood.dequantization` (levels, the
map to model space, the dequantization densities), :mod:`sdelab.likelihood.ode` and
:mod:`sdelab.likelihood.bounds` (the estimators) and :mod:`sdelab.distributed` (splitting a test
set over launched processes).

What to compute is said with small frozen objects, checked when built:

- the estimator: :class:`ODE` (the probability-flow density; its unset options are resolved by
  :func:`~sdelab.likelihood.options.default_policy`, the one place defaults live), :class:`ELBO`
  or :class:`ScoreFlow` (upper bounds on −log p);
- discrete data: :class:`Levels` (L levels and the affine map y = scale·(k + u)/L + shift to
  model space) and :class:`Dequantization` (the density of u and its repeats).

The entry points:

- :func:`bits_per_dim` — per-example bits/dim of integer data k: dequantize, evaluate the
  model density, subtract the dequantization entropy:
  bpd = (E_q[−log p(y)] − H(q(·|k))) / (D log 2).
- :func:`evaluate_likelihood` — a whole data set, batch by batch: :class:`EvaluationResult`
  with per-example values, their mean, its standard error split by source and a bound on the
  solver's bias.
- :func:`evaluate_sharded` — the same, batch i with a generator seeded by (seed, i), split over
  the processes of a group when one is given: the numbers do not depend on the group's size.

**The error bar of a data-set mean** (nats; ×1/(D log 2) for bits/dim). The standard error of
the mean over N examples, ``nll_se``, holds every random source; it is split into

- ``se_images``: the spread of the examples themselves (what remains with exact estimators);
- ``se_probes``: the estimator's own noise on the fixed data, √(Σ_i s_i²)/N from each example's
  standard error s_i (Hutchinson with K ≥ 2 probes: the probes' SE; the randomized rule: its
  per-example spread; the bounds: their Monte-Carlo SE; exact trace: 0; one probe with a
  per-example integrator: unknown, NaN);
- ``se_dequantization``: the dequantization draws' part (0 for continuous data);
- ``se_repeats``: with R > 1 repeats per example, the within-example part (dequantization and
  probes together), from the random-effects split of :mod:`sdelab.likelihood.repeats`.

With R > 1: se² = se_images² + se_repeats² and se_repeats² = se_probes² + se_dequantization²
(each wherever the variance estimate is not clipped at 0). With R = 1 the dequantization draw
cannot be told apart from the example (both are one draw per example): se² = se_images² +
se_probes², se_images includes the dequantization noise, and se_dequantization and se_repeats
are NaN.

``bias_bound`` bounds the solver's bias of the mean (nats), which no standard error shows:

- per-example integrators (:class:`~sdelab.likelihood.options.Augmented`, adaptive
  :class:`~sdelab.likelihood.options.Quadrature`): the mean of the examples' ``error``. Each
  example lies within its error, so the mean's bias is at most the mean error.
- a fixed-grid forward solve (:class:`~sdelab.likelihood.options.Randomized`'s default
  DPM-Solver++(3M) on N steps, or a ``dpm`` Quadrature) and the randomized rule with an
  adaptive solve: the first batch's first :data:`BIAS_CHECK_EXAMPLES` examples are solved again
  from the same generator state (the same dequantization, node shifts and probes) on 2N steps
  (or at tol/8); the paired difference d_i of the two solves cancels all that randomness and
  leaves the solver error. DPM-Solver++(3M) is third order, so the 2N solve's bias is 1/8 of the
  N solve's and E d = (7/8)·bias(N); the bound is |mean d|·8/7 + 2·SE(d) (Richardson's
  estimate of bias(N) plus two standard errors; ratio 4 for the second-order ``dpm2m``, 8 for
  tol/8). A Quadrature on a fixed grid adds its mean ``error`` (the quadrature part).
- the bounds (ELBO, ScoreFlow) are unbiased Monte-Carlo estimates of themselves: 0.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, replace
from typing import ClassVar, Literal

import torch
from torch import Tensor
from tqdm.auto import tqdm

from sdelab import distributed
from sdelab.likelihood.bounds import elbo, scoreflow_bound
from sdelab.likelihood.dequantization import (
    DEQUANTIZATIONS,
    _check_map,
    dequantize,
    nats_to_bpd,
    variational_dequantize,
)
from sdelab.likelihood.ode import CHECK_RATIO, log_likelihood
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
from sdelab.likelihood.repeats import repeat_statistics
from sdelab.progress import Progress, TimeProgress
from sdelab.sde import Schedule
from sdelab.utils import ScoreFn, check_int, chunk_generator, mean_se, mean_se_float

__all__ = [
    "BIAS_CHECK_EXAMPLES",
    "ELBO",
    "LIKELIHOOD_STREAM",
    "ODE",
    "BPDResult",
    "Dequantization",
    "Estimator",
    "EvaluationResult",
    "Levels",
    "ScoreFlow",
    "bits_per_dim",
    "evaluate_likelihood",
    "evaluate_sharded",
]

#: Seed stream of likelihood batch i > 0: ``derive_seed(seed, LIKELIHOOD_STREAM, i)``.
LIKELIHOOD_STREAM = 21
#: examples of the first batch solved again on a refined grid to bound the solver bias.
BIAS_CHECK_EXAMPLES = 32
TIME_SAMPLINGS: tuple[str, ...] = ("uniform", "importance")
_NAN = float("nan")


def _fail(msg: str) -> None:
    raise ValueError(msg)


# ---- what to compute ------------------------------------------------------------------------
@dataclass(frozen=True)
class ODE:
    """The probability-flow ODE density (:func:`~sdelab.likelihood.log_likelihood`).

    Attributes:
        tol: per-example target in nats (``None``: the default policy's).
        divergence: :class:`~sdelab.likelihood.options.Exact` or
            :class:`~sdelab.likelihood.options.Hutchinson` (``None``: the default policy's).
        integrator: :class:`~sdelab.likelihood.options.Augmented`, ``Quadrature`` or
            ``Randomized`` (``None``: the default policy's, which depends on the examples' shape:
            :func:`~sdelab.likelihood.options.default_policy`).
    """

    name: ClassVar[str] = "ode"
    tol: float | None = None
    divergence: Exact | Hutchinson | None = None
    integrator: Augmented | Quadrature | Randomized | None = None

    def __post_init__(self) -> None:  # default_policy checks tol and both option types
        default_policy(1, divergence=self.divergence, integrator=self.integrator, tol=self.tol)

    def policy(self, shape: int | tuple[int, ...]) -> Policy:
        """What runs on examples of this shape, or vectors of this dimension
        (:func:`default_policy`)."""
        return default_policy(
            shape, divergence=self.divergence, integrator=self.integrator, tol=self.tol
        )

    @property
    def tag(self) -> str:
        parts = [o.tag for o in (self.integrator, self.divergence) if o is not None]
        if self.tol is not None:
            parts.append(f"tol{self.tol:g}")
        return "_".join(["ode", *parts])

    def record(self) -> dict:
        return {
            "kind": "ODE",
            "tol": self.tol,
            "divergence": None if self.divergence is None else self.divergence.record(),
            "integrator": None if self.integrator is None else self.integrator.record(),
            "tag": self.tag,
        }


def _check_samples(n_samples: int, time_sampling: str) -> None:
    check_int("n_samples", n_samples, 2, " (for a standard error)")
    if time_sampling not in TIME_SAMPLINGS:
        _fail(f"unknown time_sampling {time_sampling!r}: choose one of {', '.join(TIME_SAMPLINGS)}")


@dataclass(frozen=True)
class ELBO:
    """The continuous-time ELBO (:func:`~sdelab.likelihood.elbo`), an upper bound on −log p.

    Attributes:
        n_samples: Monte-Carlo time draws per example (≥ 2, for a standard error).
        divergence: the estimator of its divergence term (``None``: one Hutchinson probe).
        time_sampling: ``"uniform"`` or ``"importance"``.
    """

    name: ClassVar[str] = "elbo"
    n_samples: int = 16
    divergence: Exact | Hutchinson | None = None
    time_sampling: Literal["uniform", "importance"] = "uniform"

    def __post_init__(self) -> None:
        _check_samples(self.n_samples, self.time_sampling)
        if self.divergence is not None and not isinstance(self.divergence, Exact | Hutchinson):
            _fail(f"divergence must be Exact() or Hutchinson(), got {self.divergence!r}")

    @property
    def tag(self) -> str:
        div = (self.divergence or Hutchinson()).tag
        return f"elbo{self.n_samples}_{self.time_sampling}_{div}"

    def record(self) -> dict:
        return {
            "kind": "ELBO",
            "n_samples": self.n_samples,
            "divergence": (self.divergence or Hutchinson()).record(),
            "time_sampling": self.time_sampling,
            "tag": self.tag,
        }


@dataclass(frozen=True)
class ScoreFlow:
    """ScoreFlow's bound (:func:`~sdelab.likelihood.scoreflow_bound`), an upper bound on −log p.

    Attributes:
        n_samples: Monte-Carlo time draws per example (≥ 2, for a standard error).
        time_sampling: ``"importance"`` (ScoreFlow's) or ``"uniform"``.
    """

    name: ClassVar[str] = "scoreflow"
    n_samples: int = 16
    time_sampling: Literal["uniform", "importance"] = "importance"

    def __post_init__(self) -> None:
        _check_samples(self.n_samples, self.time_sampling)

    @property
    def tag(self) -> str:
        return f"scoreflow{self.n_samples}_{self.time_sampling}"

    def record(self) -> dict:
        return {**asdict(self), "kind": "ScoreFlow", "tag": self.tag}


Estimator = ODE | ELBO | ScoreFlow


@dataclass(frozen=True)
class Levels:
    """Discrete data: ``num_levels`` levels k ∈ {0..L−1} per dimension and the affine map
    y = scale·(k + u)/L + shift of the unit cube to the model's space.

    Attributes:
        num_levels: L (256 for 8-bit pixels; any integer ≥ 2).
        scale, shift: explicit (``scale=2, shift=-1`` for a model on [−1, 1], ``1, 0`` for
            [0, 1]).
    """

    num_levels: int
    scale: float
    shift: float

    def __post_init__(self) -> None:
        check_int("num_levels", self.num_levels, 2, " (e.g. 256 for 8-bit data)")
        if isinstance(self.scale, bool) or isinstance(self.shift, bool):
            _fail(f"scale and shift must be numbers, got {self.scale!r}, {self.shift!r}")
        _check_map(float(self.scale), float(self.shift))

    @property
    def tag(self) -> str:
        return f"levels{self.num_levels}_scale{self.scale:g}_shift{self.shift:g}"

    def record(self) -> dict:
        return {**asdict(self), "kind": "Levels", "tag": self.tag}


DEQUANTIZATION_KINDS: tuple[str, ...] = (*DEQUANTIZATIONS, "variational")


@dataclass(frozen=True)
class Dequantization:
    """How discrete data becomes continuous (formulas in :mod:`sdelab.likelihood.dequantization`).

    Attributes:
        kind: ``"uniform"``, ``"truncated_normal"`` (i-DODE; needs the schedule) or
            ``"variational"`` (a trained flow q(u | k), ``dequantizer``).
        dequantizer: the :class:`~sdelab.nets.dequantizer.Dequantizer` of ``"variational"``.
        n_repeats: draws per example (dequantization and probes), averaged (ScoreFlow's
            ``num_repeats``); with ≥ 2 the results split their standard error by source.
    """

    kind: Literal["uniform", "truncated_normal", "variational"] = "uniform"
    dequantizer: torch.nn.Module | None = None
    n_repeats: int = 1

    def __post_init__(self) -> None:
        if self.kind not in DEQUANTIZATION_KINDS:
            _fail(
                f"unknown dequantization {self.kind!r}: choose one of "
                f"{', '.join(DEQUANTIZATION_KINDS)}"
            )
        if (self.kind == "variational") != (self.dequantizer is not None):
            _fail(
                "kind='variational' needs dequantizer=... (a trained flow), and a dequantizer "
                "needs kind='variational'"
            )
        check_int("n_repeats", self.n_repeats, 1)

    @property
    def tag(self) -> str:
        return self.kind + (f"_x{self.n_repeats}" if self.n_repeats > 1 else "")

    def record(self) -> dict:
        return {
            "kind": self.kind,
            "dequantizer": None if self.dequantizer is None else type(self.dequantizer).__name__,
            "n_repeats": self.n_repeats,
            "tag": self.tag,
        }


def _check_estimator(estimator: object) -> Estimator:
    if estimator is None:
        return ODE()
    if not isinstance(estimator, ODE | ELBO | ScoreFlow):
        _fail(f"estimator must be ODE(), ELBO() or ScoreFlow(), got {estimator!r}")
    return estimator


# ---- one estimate of a batch ----------------------------------------------------------------
@dataclass
class _Estimate:
    nll: Tensor  # (B,) nats
    error: Tensor  # (B,) nats (NaN where none)
    probe_se: Tensor | None  # (B,) the estimator's own noise on this data; None: unknown
    nfe: int
    record: dict  # the resolved estimator's record


def _estimate(
    model: Callable,
    schedule: Schedule | None,
    y: Tensor,
    estimator: Estimator | None,
    generator: torch.Generator | None,
) -> _Estimate:
    """−log p(y) per example by the estimator (``schedule=None``: ``model`` is a log-density)."""
    if schedule is None:
        nll = -model(y)
        zero = torch.zeros_like(nll)
        return _Estimate(nll, zero, zero, 0, {"kind": "density", "tag": "density"})
    estimator = _check_estimator(estimator)
    if isinstance(estimator, ODE):
        res = log_likelihood(
            model,
            schedule,
            y,
            tol=estimator.tol,
            divergence=estimator.divergence,
            integrator=estimator.integrator,
            generator=generator,
        )
        pol = res.policy
        if res.probe_se is not None:
            probe_se = res.probe_se
        elif isinstance(pol.integrator, Randomized):
            probe_se = res.error  # the rule's per-example spread (probes and shift)
        elif isinstance(pol.divergence, Exact):
            probe_se = torch.zeros_like(res.logp)
        else:
            probe_se = None  # one probe along a fixed path: its noise is not measured
        return _Estimate(res.nll, res.error, probe_se, res.nfe, pol.record())
    if isinstance(estimator, ELBO):
        out = elbo(
            model,
            schedule,
            y,
            n_samples=estimator.n_samples,
            divergence=estimator.divergence,
            time_sampling=estimator.time_sampling,
            generator=generator,
        )
    else:
        out = scoreflow_bound(
            model,
            schedule,
            y,
            n_samples=estimator.n_samples,
            time_sampling=estimator.time_sampling,
            generator=generator,
        )
    nan = torch.full_like(out.nll_bound, _NAN)
    return _Estimate(out.nll_bound, nan, out.se, 0, estimator.record())


# ---- bits/dim of integer data ---------------------------------------------------------------
@dataclass(frozen=True)
class BPDResult:
    """Per-example bits/dim of integer data.

    Attributes:
        bpd: bound on −log2 P(k) / D, ``(B,)``, averaged over the dequantization repeats.
        nll: the same in nats (not per dimension), ``(B,)``.
        se: standard error of ``bpd`` over repeats, ``(B,)`` (NaN when ``n_repeats == 1``).
        nfe: total ODE function evaluations (0 for a plain log-density and the bounds).
        levels: the :class:`Levels` used.
        dequantization: its kind (``"uniform"``, ``"truncated_normal"``, ``"variational"``).
        per_repeat: ``(R, B)`` nats of every repeat (for
            :func:`sdelab.likelihood.repeats.repeat_statistics` of ``per_repeat.T``).
        error: each example's integration error estimate in nats, ``(B,)`` (the mean over
            repeats of :attr:`LikelihoodResult.error`; 0 for a plain log-density, NaN for the
            bounds).
        probe_se: the estimator's own standard error per example in nats, ``(B,)``, for the
            repeat mean; ``None`` when not measured (module docstring).
        policy: the resolved estimator's record (``Policy.record()`` for the ODE).
    """

    bpd: Tensor
    nll: Tensor
    se: Tensor
    nfe: int
    levels: Levels
    dequantization: str
    per_repeat: Tensor
    error: Tensor
    probe_se: Tensor | None
    policy: dict


def bits_per_dim(
    model: Callable[[Tensor], Tensor] | Callable[[Tensor, Tensor], Tensor],
    k: Tensor,
    levels: Levels,
    *,
    schedule: Schedule | None = None,
    estimator: ODE | ELBO | ScoreFlow | None = None,
    dequantization: Dequantization | None = None,
    generator: torch.Generator | None = None,
) -> BPDResult:
    r"""Bits/dim of INTEGER data: dequantize, evaluate the model density, do the accounting.

    bpd = (E_q[−log p(y)] − H(q(·|k))) / (D log 2), which for uniform dequantization is
    (E_u[−log p_y(y)] − D log a + D log L) / (D log 2)
    (:mod:`sdelab.likelihood.dequantization`).

    Args:
        model: with ``schedule=None``, a log-density ``logp_fn(y) -> (B,)`` in model space; with
            a schedule, a score function ``score_fn(x, t)``.
        k: integer levels in {0..L−1}, shape ``(B, ...)``; the dequantized data takes ``k``'s
            dtype if it is floating (integral values), else torch's default dtype.
        levels: :class:`Levels` — L and the map to model space.
        schedule: see ``model``; required for the truncated normal and for every estimator.
        estimator: :class:`ODE` (``None``: ``ODE()``, the default policy), :class:`ELBO` or
            :class:`ScoreFlow`; only with a schedule.
        dequantization: :class:`Dequantization` (``None``: uniform, one draw).
        generator: randomness for dequantization, probes and the bounds' draws.

    Returns:
        :class:`BPDResult` (per-example ``bpd``, ``nll`` in nats, ``se``, ``error``,
        ``probe_se``, ``nfe`` and the accounting and policy used).

    Raises:
        ValueError: non-integer data (e.g. already scaled to [0, 1]), values outside
            [0, L − 1], NaN, a bad option object, an estimator without a schedule, the truncated
            normal without a schedule; each message names the fix.
    """
    if not isinstance(levels, Levels):
        _fail(f"levels must be Levels(num_levels, scale, shift), got {levels!r}")
    deq = Dequantization() if dequantization is None else dequantization
    if not isinstance(deq, Dequantization):
        _fail(f"dequantization must be Dequantization(...), got {dequantization!r}")
    if schedule is None and estimator is not None:
        _fail(
            "an estimator applies to a score function: pass schedule=... with a score function, "
            "or drop estimator for a plain log-density"
        )
    dtype = k.dtype if torch.is_tensor(k) and k.is_floating_point() else None
    L, a, b = levels.num_levels, float(levels.scale), float(levels.shift)
    nlls, errors, probe_vars, nfe, est = [], [], [], 0, None
    for _ in range(deq.n_repeats):
        if deq.dequantizer is not None:
            with torch.no_grad():
                dq = variational_dequantize(k, L, a, b, deq.dequantizer, generator=generator)
        else:
            dq = dequantize(
                k,
                L,
                a,
                b,
                method=deq.kind,
                schedule=schedule,
                generator=generator,
                dtype=dtype,
            )
        est = _estimate(model, schedule, dq.y, estimator, generator)
        nfe += est.nfe
        nlls.append(est.nll - dq.entropy)
        errors.append(est.error)
        probe_vars.append(None if est.probe_se is None else est.probe_se**2)
    d = dq.y[0].numel()
    per_repeat = torch.stack(nlls)  # (R, B)
    nll, se = mean_se(per_repeat, dim=0)
    r = deq.n_repeats
    probe_se = None
    if all(v is not None for v in probe_vars):
        probe_se = torch.stack(probe_vars).sum(0).sqrt() / r
    return BPDResult(
        bpd=nats_to_bpd(nll, d),
        nll=nll,
        se=nats_to_bpd(se, d),
        nfe=nfe,
        levels=levels,
        dequantization=deq.kind,
        per_repeat=per_repeat,
        error=torch.stack(errors).mean(0),
        probe_se=probe_se,
        policy=est.record,
    )


# ---- data sets ------------------------------------------------------------------------------
@dataclass(frozen=True)
class EvaluationResult:
    """Likelihood of a data set: per-example values, the mean, its error bar split by source.

    All standard errors and ``bias_bound`` are in nats (of the mean of ``nll``); divide by
    D log 2 for bits/dim (:meth:`se_split` with ``bpd=True``, :attr:`bias_bound_bpd`). How they
    are estimated: the module docstring.

    Attributes:
        nll: per-example negative log-likelihood (or its bound) in nats, ``(N,)``.
        bpd: per-example bits/dim, ``(N,)``.
        nll_mean, nll_se, bpd_mean, bpd_se: mean and standard error over examples (all sources).
        estimator: ``"ode"``, ``"elbo"``, ``"scoreflow"`` (or ``"density"``).
        dequantization: ``"uniform"``, ``"truncated_normal"``, ``"variational"``, or ``"none"``
            for continuous data (then bpd is nats / (D log 2) of a density, not of a discrete
            law).
        nfe: total ODE function evaluations, the bias check's included (0 for the bounds).
        per_repeat: ``(R, N)`` nats of each of the R dequantization/probe repeats of discrete
            data (``nll`` is their mean), ``None`` for continuous data.
        policy: the resolved estimator's record (the ODE's ``Policy.record()``: divergence,
            integrator, tol, tag; a bound's ``record()``).
        error: per-example integration error estimate in nats, ``(N,)`` (NaN for the bounds;
            for the randomized rule its per-example spread).
        probe_se: per-example standard error of the estimator's own noise, ``(N,)``, or
            ``None`` where it is not measured.
        se_images, se_probes, se_dequantization, se_repeats: the split of ``nll_se`` (NaN where
            a source cannot be told apart).
        grid_check: the refined-solve estimate of the forward solve's bias in nats (first
            batch; 0 where the integrator needs none, NaN in a later batch's own result).
        bias_bound: a bound on the solver bias of ``nll_mean`` in nats.
        dim: D, the data's dimension.
    """

    nll: Tensor
    bpd: Tensor
    nll_mean: float
    nll_se: float
    bpd_mean: float
    bpd_se: float
    estimator: str
    dequantization: str
    nfe: int
    per_repeat: Tensor | None = None
    policy: dict | None = None
    error: Tensor | None = None
    probe_se: Tensor | None = None
    se_images: float = _NAN
    se_probes: float = _NAN
    se_dequantization: float = _NAN
    se_repeats: float = _NAN
    grid_check: float = _NAN
    bias_bound: float = _NAN
    dim: int = 0

    @property
    def bias_bound_bpd(self) -> float:
        """:attr:`bias_bound` in bits/dim."""
        return nats_to_bpd(self.bias_bound, self.dim) if self.dim else _NAN

    @property
    def tag(self) -> str:
        """The resolved policy's tag (e.g. ``randomized32_dpm3m64_hutchinson1``)."""
        return (self.policy or {}).get("tag", self.estimator)

    def se_split(self, bpd: bool = False) -> dict[str, float]:
        """The standard error's parts by source, in nats (``bpd=True``: bits/dim)."""
        parts = {
            "images": self.se_images,
            "probes": self.se_probes,
            "dequantization": self.se_dequantization,
            "repeats": self.se_repeats,
        }
        if bpd:
            parts = {k: nats_to_bpd(v, self.dim) if self.dim else _NAN for k, v in parts.items()}
        return parts

    def __str__(self) -> str:
        split = ", ".join(
            f"{k} {'n/a' if math.isnan(v) else f'{v:.4f}'}" for k, v in self.se_split(True).items()
        )
        return (
            f"{self.bpd_mean:.4f} ± {self.bpd_se:.4f} bits/dim ({self.nll_mean:.4f} ± "
            f"{self.nll_se:.4f} nats) over {self.nll.numel()} examples "
            f"[{self.tag}, dequantization: {self.dequantization}]\n"
            f"  SE by source (bits/dim): {split}; solver bias ≤ {self.bias_bound_bpd:.4f} "
            f"bits/dim ({self.bias_bound:.4g} nats)"
        )


def _batch(
    score_fn: ScoreFn,
    schedule: Schedule,
    data: Tensor,
    estimator: Estimator,
    levels: Levels | None,
    dequantization: Dequantization | None,
    generator: torch.Generator | None,
) -> tuple[_Estimate, Tensor | None]:
    """One batch: (estimate with nll the accounted nats, per-repeat nats or None)."""
    if levels is not None:
        res = bits_per_dim(
            score_fn,
            data,
            levels,
            schedule=schedule,
            estimator=estimator,
            dequantization=dequantization,
            generator=generator,
        )
        est = _Estimate(res.nll, res.error, res.probe_se, res.nfe, res.policy)
        return est, res.per_repeat
    return _estimate(score_fn, schedule, data, estimator, generator), None


def _refined(policy: Policy) -> tuple[ODE, float] | None:
    """The refined estimator of the bias check and the Richardson factor r/(r − 1), or None
    when the policy's solver bias is covered by its per-example ``error``."""
    integ = policy.integrator
    if fixed_grid(integ):
        ratio = 8.0 if integ.method == "dpm3m" else 4.0  # 2^order of DPM-Solver++(3M)/(2M)
        finer = replace(integ, steps=2 * (integ.steps or EXPONENTIAL_STEPS))
        return ODE(tol=None, divergence=policy.divergence, integrator=finer), ratio / (ratio - 1)
    if isinstance(integ, Randomized):  # an adaptive forward solve: error ∝ tol
        tol = policy.tol / CHECK_RATIO
        return ODE(tol=tol, divergence=policy.divergence, integrator=integ), CHECK_RATIO / (
            CHECK_RATIO - 1
        )
    return None


def _clone(generator: torch.Generator, state: Tensor) -> torch.Generator:
    g = torch.Generator(device=generator.device)
    g.set_state(state)
    return g


def _evaluate_batch(
    score_fn: ScoreFn,
    schedule: Schedule,
    data: Tensor,
    estimator: Estimator,
    levels: Levels | None,
    dequantization: Dequantization | None,
    generator: torch.Generator,
    check: bool,
) -> EvaluationResult:
    """One batch's :class:`EvaluationResult`; with ``check``, also the refined-grid solve of
    its first examples from the same generator state (the bias check)."""
    state = generator.get_state()
    est, per_repeat = _batch(score_fn, schedule, data, estimator, levels, dequantization, generator)
    nfe, dim = est.nfe, data[0].numel()
    policy = estimator.policy(data.shape[1:]) if isinstance(estimator, ODE) else None
    refined = None if policy is None else _refined(policy)
    if refined is None:
        grid = 0.0
    elif not check:
        grid = _NAN
    else:
        finer, factor = refined
        sub = data[:BIAS_CHECK_EXAMPLES]
        if len(sub) == len(data):
            coarse_nll = est.nll
        else:
            same = ODE(tol=policy.tol, divergence=policy.divergence, integrator=policy.integrator)
            coarse = _batch(
                score_fn, schedule, sub, same, levels, dequantization, _clone(generator, state)
            )[0]
            coarse_nll, nfe = coarse.nll, nfe + coarse.nfe
        fine = _batch(
            score_fn, schedule, sub, finer, levels, dequantization, _clone(generator, state)
        )[0]
        nfe += fine.nfe
        diff = (coarse_nll - fine.nll).double()
        m, se = mean_se_float(diff)
        grid = factor * abs(m) + (2 * se if math.isfinite(se) else 0.0)
    return _summarise(
        [est.nll],
        [per_repeat] if per_repeat is not None else None,
        [est.error],
        [est.probe_se],
        est.record,
        estimator.name,
        "none" if levels is None else (dequantization or Dequantization()).kind,
        nfe,
        grid,
        dim,
    )


def _summarise(
    nlls: list[Tensor],
    repeats: list[Tensor] | None,
    errors: list[Tensor],
    probe_ses: list[Tensor | None],
    policy: dict,
    estimator: str,
    dequantization: str,
    nfe: int,
    grid_check: float,
    dim: int,
) -> EvaluationResult:
    """Mean, its SE split by source and the bias bound of per-example values (module docstring)."""
    nll = torch.cat(nlls)
    n = nll.numel()
    per_repeat = torch.cat(repeats, dim=1) if repeats is not None else None
    error = torch.cat(errors)
    probe_se = None if any(p is None for p in probe_ses) else torch.cat(probe_ses)
    nll_mean, nll_se = mean_se_float(nll)
    se_probes = _NAN if probe_se is None else float(probe_se.double().pow(2).sum().sqrt()) / n
    se_images = se_rep = _NAN
    se_deq = 0.0 if dequantization == "none" else _NAN
    r = 1 if per_repeat is None else per_repeat.shape[0]
    if r > 1 and n >= 2 and bool(torch.isfinite(per_repeat).all()):
        stats = repeat_statistics(per_repeat.T)
        se_images, se_rep = stats.se_images, stats.se_repeats
        if math.isfinite(se_probes):
            se_deq = math.sqrt(max(se_rep**2 - se_probes**2, 0.0))
    elif r == 1 and math.isfinite(se_probes) and math.isfinite(nll_se):
        se_images = math.sqrt(max(nll_se**2 - se_probes**2, 0.0))
    kind = ((policy or {}).get("integrator") or {}).get("kind")
    bias = grid_check
    if kind in ("Augmented", "Quadrature"):
        bias = bias + float(error.double().mean())
    return EvaluationResult(
        nll=nll,
        bpd=nats_to_bpd(nll, dim),
        nll_mean=nll_mean,
        nll_se=nll_se,
        bpd_mean=nats_to_bpd(nll_mean, dim),
        bpd_se=nats_to_bpd(nll_se, dim),
        estimator=estimator,
        dequantization=dequantization,
        nfe=nfe,
        per_repeat=per_repeat,
        policy=policy,
        error=error,
        probe_se=probe_se,
        se_images=se_images,
        se_probes=se_probes,
        se_dequantization=se_deq,
        se_repeats=se_rep,
        grid_check=grid_check,
        bias_bound=bias,
        dim=dim,
    )


def _combine(parts: list[EvaluationResult]) -> EvaluationResult:
    """One result from per-batch ones in data order; the bias check is the first batch's."""
    p0 = parts[0]
    has_repeats = p0.per_repeat is not None
    return _summarise(
        [p.nll for p in parts],
        [p.per_repeat for p in parts] if has_repeats else None,
        [p.error if p.error is not None else torch.full_like(p.nll, _NAN) for p in parts],
        [p.probe_se for p in parts],
        p0.policy,
        p0.estimator,
        p0.dequantization,
        sum(p.nfe for p in parts),
        p0.grid_check,
        p0.dim,
    )


def _check_data_options(
    estimator: object, levels: object, dequantization: object
) -> tuple[Estimator, Dequantization | None]:
    estimator = _check_estimator(estimator)
    if levels is None:
        if dequantization is not None:
            _fail(
                "dequantization applies to discrete data: pass levels=Levels(num_levels, scale, "
                "shift) with integer data, or drop dequantization for continuous data"
            )
        return estimator, None
    if not isinstance(levels, Levels):
        _fail(f"levels must be Levels(num_levels, scale, shift), got {levels!r}")
    if dequantization is not None and not isinstance(dequantization, Dequantization):
        _fail(f"dequantization must be Dequantization(...), got {dequantization!r}")
    return estimator, dequantization or Dequantization()


def evaluate_likelihood(
    score_fn: ScoreFn,
    schedule: Schedule,
    batches: Iterable[Tensor | tuple | list],
    *,
    estimator: ODE | ELBO | ScoreFlow | None = None,
    levels: Levels | None = None,
    dequantization: Dequantization | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> EvaluationResult:
    """Evaluate a data set batch by batch: per-example values, mean ± SE split by source, and a
    bound on the solver bias (module docstring).

    Two kinds of data:

    - **discrete** (``levels`` given): each batch holds integer levels k ∈ {0..L−1}; they are
      dequantized and mapped to model space by :func:`bits_per_dim`, whose accounting gives a
      bound on −log P(k).
    - **continuous** (``levels`` None): each batch is model-space data; the result is the
      density's −log p(x) and bpd = nats / (D log 2) (``dequantization="none"``).

    Args:
        score_fn, schedule: the model.
        batches: an iterable of tensors ``(B, ...)`` or of tuples/lists whose first element is
            the data (a ``DataLoader`` with labels works).
        estimator: :class:`ODE` (``None``: ``ODE()``, the default policy for the data's
            dimension), :class:`ELBO` or :class:`ScoreFlow`.
        levels: :class:`Levels` of discrete data (``None``: continuous data).
        dequantization: :class:`Dequantization` of discrete data (``None``: uniform, one draw).
        generator: randomness (dequantization noise, probes, bound samples); ``None``: a
            generator seeded from torch's global RNG.
        device: move each batch there first (default: leave it).
        progress: show a tqdm bar.

    Returns:
        :class:`EvaluationResult`.

    Raises:
        ValueError: a bad option object, an empty data set, dequantization of continuous data,
            or bad data (see :func:`bits_per_dim`).
    """
    estimator, dequantization = _check_data_options(estimator, levels, dequantization)
    parts = []
    total = len(batches) if hasattr(batches, "__len__") else None
    with torch.no_grad():
        for batch in tqdm(batches, total=total, disable=not progress, desc="likelihood"):
            data = batch[0] if isinstance(batch, tuple | list) else batch
            if device is not None:
                data = data.to(device)
            if generator is None:
                seed = int(torch.randint(0, 2**62, (1,)))
                generator = torch.Generator(device=data.device).manual_seed(seed)
            parts.append(
                _evaluate_batch(
                    score_fn,
                    schedule,
                    data,
                    estimator,
                    levels,
                    dequantization,
                    generator,
                    check=not parts,
                )
            )
    if not parts:
        _fail("the data set is empty: batches yielded nothing")
    return _combine(parts)


def evaluate_sharded(
    score_fn: ScoreFn,
    schedule: Schedule,
    data: Tensor,
    *,
    estimator: ODE | ELBO | ScoreFlow | None = None,
    levels: Levels | None = None,
    dequantization: Dequantization | None = None,
    batch_size: int = 1000,
    seed: int = 0,
    device: torch.device | str = "cpu",
    progress: bool = False,
    cached: Callable[[int], EvaluationResult | None] | None = None,
    on_batch: Callable[[int, EvaluationResult], None] | None = None,
    group: distributed.DistInfo | None = None,
) -> EvaluationResult:
    """:func:`evaluate_likelihood` of ``data`` ``(N, ...)`` in batches of ``batch_size``, batch
    i with a generator seeded by (seed, i) (:data:`LIKELIHOOD_STREAM`), so the result does not
    depend on how the batches are shared out.

    Without ``group`` this process evaluates every batch: a library call never shards because a
    process group happens to exist. With ``group`` (the caller's
    :func:`sdelab.distributed.get_info`), batch i is evaluated by rank i mod N alone and no
    collective runs until every rank has finished its batches (batches needing very different
    numbers of adaptive steps cannot deadlock); every rank returns the full result, per-example
    values in data order, equal to the single-process one.

    Args:
        score_fn, schedule, estimator, levels, dequantization: as :func:`evaluate_likelihood`.
        data: the whole data set on any device, ``(N, ...)``.
        batch_size: examples per batch (the bias check uses the first batch's first
            :data:`BIAS_CHECK_EXAMPLES`).
        seed: the seed of batch 0 (batch i > 0: derived from (seed, i)).
        device: where batches are evaluated.
        progress: an examples progress bar (on rank 0).
        cached: ``cached(i)`` may return batch i's result from an earlier, interrupted
            evaluation (not recomputed); batch i's randomness depends only on (seed, i), so a
            resumed evaluation gives exactly the per-example values of an uninterrupted one.
        on_batch: called as ``on_batch(i, result)`` (on the CPU) after batch i is computed.
        group: a :class:`~sdelab.distributed.DistInfo` to shard over, or ``None``.

    Returns:
        :class:`EvaluationResult` of the whole data set.

    Raises:
        ValueError: as :func:`evaluate_likelihood`; ``batch_size`` < 1.
    """
    estimator, dequantization = _check_data_options(estimator, levels, dequantization)
    check_int("batch_size", batch_size, 1)
    info = distributed.DistInfo() if group is None else group
    batches = data.split(batch_size)
    if not batches:
        _fail("the data set is empty: no examples to evaluate")
    mine = distributed.shard(len(batches), info)
    local = []
    total = sum(len(batches[i]) for i in mine)
    bar = Progress(total, "likelihood", "examples", enabled=progress and info.is_main)
    with torch.no_grad(), bar:  # inference: the estimators enable grad internally where needed
        for i in mine:
            done = bar.n
            res = cached(i) if cached is not None else None
            if res is None:
                scored = score_fn
                if isinstance(estimator, ODE):  # the ODE runs from t_min to T
                    scored = TimeProgress(
                        score_fn, bar, done, len(batches[i]), schedule.t_min, schedule.T
                    )
                res = _to_cpu(
                    _evaluate_batch(
                        scored,
                        schedule,
                        batches[i].to(device),
                        estimator,
                        levels,
                        dequantization,
                        chunk_generator(seed, LIKELIHOOD_STREAM, i, torch.device(device)),
                        check=i == 0,
                    )
                )
                if on_batch is not None:
                    on_batch(i, res)
            local.append((i, res))
            bar.set(done + len(batches[i]))
    return _combine(distributed.gather_indexed(local, info))


def _to_cpu(res: EvaluationResult) -> EvaluationResult:
    def cpu(t: Tensor | None) -> Tensor | None:
        return None if t is None else t.cpu()

    return replace(
        res,
        nll=res.nll.cpu(),
        bpd=res.bpd.cpu(),
        per_repeat=cpu(res.per_repeat),
        error=cpu(res.error),
        probe_se=cpu(res.probe_se),
    )
