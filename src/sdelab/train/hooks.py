"""Evaluation hooks for :func:`sdelab.train.loop.train`: test-set likelihood and the Fréchet
distance of samples during training."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from sdelab.likelihood import elbo, log_likelihood
from sdelab.likelihood.bpd import evaluate_likelihood
from sdelab.metrics import frechet_distance_features
from sdelab.quality import ClassifierFeatures, IdentityFeatures, collect_features
from sdelab.samplers import sample
from sdelab.sde import make_schedule
from sdelab.train.build import dequantization_options
from sdelab.train.classifier import load_classifier
from sdelab.train.config import RunConfig
from sdelab.train.loop import EvalContext, EvalHook

__all__ = ["eval_hook_for", "fd_hook", "likelihood_hook"]


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


def fd_hook(ctx: EvalContext) -> Mapping[str, float]:
    """Fréchet distance of ``eval.fd_n`` EMA samples to the fixed test set, with identity or
    clean-classifier features (``eval.fd_features`` / ``eval.fd_classifier``); the samples are
    drawn with ``eval.sampler`` and ``eval.steps`` (default DPM-Solver, 20 steps) from the
    evaluation's generator, so the FD of different steps compares like with like."""
    ev = ctx.config.eval
    if ev.fd_features == "classifier":
        net, meta = load_classifier(ev.fd_classifier)
        t_min = make_schedule(meta["sde"]["name"], **meta["sde"]["kwargs"]).t_min
        extractor = ClassifierFeatures(net.to(ctx.test_data.device), t_min)
    else:
        extractor = IdentityFeatures()
    ref = ctx.test_data
    if not ref.is_floating_point():  # image levels: their bin centres in model space
        ref = ctx.dataset.to_model(ref)
    shape = ctx.config.model.image_shape or [ctx.config.model.dim]
    sampler = ev.sampler or "dpm_solver"
    steps = ev.steps if ev.sampler else 20
    with torch.no_grad():
        x = sample(
            ctx.model,
            ctx.schedule,
            (ev.fd_n, *shape),
            sampler=sampler,
            steps=steps,
            generator=ctx.generator,
            device=ctx.test_data.device,
        ).samples
    if not bool(torch.isfinite(x).all()):
        return {"fd": float("inf")}
    a = collect_features(extractor, x.split(500)).features
    b = collect_features(extractor, ref.reshape(len(ref), *x.shape[1:]).split(500)).features
    return {"fd": frechet_distance_features(a, b)}


def eval_hook_for(config: RunConfig) -> EvalHook | None:
    """The built-in evaluation of a config: the likelihood hook, plus :func:`fd_hook` when
    ``eval.fd_features`` is set; ``None`` without ``train.eval_every``."""
    if not config.train.eval_every:
        return None
    if config.eval.fd_features is None:
        return likelihood_hook

    def hook(ctx: EvalContext) -> Mapping[str, float]:
        return {**likelihood_hook(ctx), **fd_hook(ctx)}

    return hook
