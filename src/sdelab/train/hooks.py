"""Evaluation hooks for :func:`sdelab.train.loop.train`: test-set likelihood during training."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from sdelab.evaluation import evaluate_likelihood
from sdelab.likelihood import elbo, log_likelihood
from sdelab.train.build import dequantization_options
from sdelab.train.loop import EvalContext

__all__ = ["likelihood_hook"]


def likelihood_hook(ctx: EvalContext) -> Mapping[str, float]:
    """Test NLL of the EMA model through the probability-flow ODE, and the sdeflow ELBO.

    Uses the first ``eval.options.n_eval`` (default 1000) held-out points. The ODE uses the
    exact trace for D ≤ 16 and Hutchinson (one Rademacher probe) above; tolerances
    ``eval.options.rtol`` / ``atol`` (default 1e-4). Returns nats per example (means); for
    image data (integer test levels) bits/dim with uniform dequantization instead.
    """
    opts = ctx.config.eval.options
    x = ctx.test_data[: int(opts.get("n_eval", 1000))]
    tol = float(opts.get("rtol", 1e-4)), float(opts.get("atol", 1e-4))
    if not x.is_floating_point():  # image data: integer levels, bits/dim (uniform deq.)
        return _image_hook(ctx, x, tol)
    divergence = "exact" if x[0].numel() <= 16 else "hutchinson"
    ode = log_likelihood(
        ctx.model,
        ctx.schedule,
        x,
        divergence=divergence,
        rtol=tol[0],
        atol=tol[1],
        generator=ctx.generator,
    )
    bound = elbo(ctx.model, ctx.schedule, x, generator=ctx.generator)
    with torch.no_grad():
        return {
            "test_nll_ode": float(ode.nll.mean()),
            "test_elbo_nll": float(bound.nll_bound.mean()),
            "ode_nfe": float(ode.nfe),
        }


def _image_hook(ctx: EvalContext, k: torch.Tensor, tol: tuple[float, float]) -> dict[str, float]:
    """Test bits/dim of integer levels: ODE (one Hutchinson probe) and the ELBO, uniformly
    dequantized with the dataset's levels and map to model space."""
    deq = dequantization_options(ctx.dataset)
    common = dict(generator=ctx.generator, progress=False, **deq)
    ode = evaluate_likelihood(
        ctx.model,
        ctx.schedule,
        [k],
        estimator="ode",
        divergence="hutchinson",
        rtol=tol[0],
        atol=tol[1],
        **common,
    )
    bound = evaluate_likelihood(ctx.model, ctx.schedule, [k], estimator="elbo", **common)
    return {"test_bpd_ode": ode.bpd_mean, "test_bpd_elbo": bound.bpd_mean, "ode_nfe": ode.nfe}
