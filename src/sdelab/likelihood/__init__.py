"""Likelihood: the exact ODE log-likelihood, bounds, dequantization and bits/dim in one package.

Layers inside the package (imports point down; ``lint-imports`` checks them):

- composition: :mod:`~sdelab.likelihood.bpd` (bits/dim of integer data, data-set evaluation),
  :mod:`~sdelab.likelihood.dequantizer` (training a variational dequantizer),
  :mod:`~sdelab.likelihood.objectives` (maximum-likelihood training of the ODE),
  :mod:`~sdelab.likelihood.ood` (out-of-distribution scores: AUROC, input complexity, the
  likelihood ratio across noise levels);
- the ODE: :mod:`~sdelab.likelihood.ode` (:func:`log_likelihood`, its integrators and their
  option objects), :mod:`~sdelab.likelihood.quadrature` (nested and randomized rules),
  :mod:`~sdelab.likelihood.forward` (the forward-only solve), :mod:`~sdelab.likelihood.bounds`
  (ELBO, ScoreFlow bound);
- ground: :mod:`~sdelab.likelihood.divergence` (exact trace, Hutchinson),
  :mod:`~sdelab.likelihood.batched_rk` (per-example Dormand–Prince),
  :mod:`~sdelab.likelihood.dequantization` (levels ↔ model space, the one ``nats_to_bpd``),
  :mod:`~sdelab.likelihood.terms` (:class:`VLBResult`, the terms of every variational bound),
  :mod:`~sdelab.likelihood.repeats` (standard errors of repeated estimates).
"""

from sdelab.likelihood.bounds import BoundResult, elbo, scoreflow_bound
from sdelab.likelihood.bpd import (
    ELBO,
    ODE,
    BPDResult,
    Dequantization,
    EvaluationResult,
    Levels,
    ScoreFlow,
    bits_per_dim,
    evaluate_likelihood,
    evaluate_sharded,
)
from sdelab.likelihood.dequantization import dequantize, nats_to_bpd, to_model_space
from sdelab.likelihood.objectives import ode_nll_loss
from sdelab.likelihood.ode import LikelihoodResult, decoder_bound, log_likelihood
from sdelab.likelihood.options import (
    Augmented,
    Exact,
    Hutchinson,
    Policy,
    Quadrature,
    Randomized,
    default_policy,
)
from sdelab.likelihood.terms import VLBResult

__all__ = [
    "ELBO",
    "ODE",
    "Augmented",
    "BPDResult",
    "BoundResult",
    "Dequantization",
    "EvaluationResult",
    "Exact",
    "Hutchinson",
    "Levels",
    "LikelihoodResult",
    "Policy",
    "Quadrature",
    "Randomized",
    "ScoreFlow",
    "VLBResult",
    "bits_per_dim",
    "decoder_bound",
    "default_policy",
    "dequantize",
    "elbo",
    "evaluate_likelihood",
    "evaluate_sharded",
    "log_likelihood",
    "nats_to_bpd",
    "ode_nll_loss",
    "scoreflow_bound",
    "to_model_space",
]
