"""Evaluation hooks for :func:`sdelab.train.loop.train`: test-set likelihood and the Fréchet
distance of samples during training."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from sdelab.likelihood.bpd import ELBO, ODE, Levels, evaluate_likelihood
from sdelab.metrics import frechet_distance_features
from sdelab.quality import ClassifierFeatures, IdentityFeatures, collect_features
from sdelab.samplers import sample
from sdelab.sde import make_schedule
from sdelab.train.classifier import load_classifier
from sdelab.train.config import RunConfig
from sdelab.train.loop import EvalContext, EvalHook

__all__ = ["eval_hook_for", "fd_hook", "likelihood_hook"]


def likelihood_hook(ctx: EvalContext) -> Mapping[str, float | str]:
    """Test NLL of the EMA model through the probability-flow ODE, and the ELBO.

    Uses the first ``eval.options.n_eval`` (default 1000) held-out points, evaluated as
    ``sdelab likelihood`` evaluates them: :func:`~sdelab.likelihood.bpd.evaluate_likelihood`
    with ``ODE(tol=eval.options.tol)``, i.e. the default policy for the data's dimension
    (:func:`~sdelab.likelihood.options.default_policy`), so ``eval.jsonl`` and the CLI agree by
    construction. Returns means in nats per example (``test_nll_ode``, ``test_elbo_nll``) —
    for image data (integer test levels) bits/dim with uniform dequantization instead
    (``test_bpd_ode``, ``test_bpd_elbo``) — each with its standard error (``*_se``), the ODE's
    solver-bias bound (``ode_bias_bound``, same unit), ``ode_nfe`` and the policy's tag
    (``ode_policy``).
    """
    opts = ctx.config.eval.options
    x = ctx.test_data[: int(opts.get("n_eval", 1000))]
    tol = opts.get("tol")
    levels = None
    if not x.is_floating_point():  # image data: integer levels, bits/dim (uniform deq.)
        ds = ctx.dataset
        levels = Levels(ds.num_levels, float(ds.scale), float(ds.shift))
    common = dict(levels=levels, generator=ctx.generator, progress=False)
    estimator = ODE(tol=None if tol is None else float(tol))
    ode = evaluate_likelihood(ctx.model, ctx.schedule, [x], estimator=estimator, **common)
    bound = evaluate_likelihood(ctx.model, ctx.schedule, [x], estimator=ELBO(), **common)
    if levels is None:
        return {
            "test_nll_ode": ode.nll_mean,
            "test_nll_ode_se": ode.nll_se,
            "ode_bias_bound": ode.bias_bound,
            "test_elbo_nll": bound.nll_mean,
            "test_elbo_nll_se": bound.nll_se,
            "ode_nfe": float(ode.nfe),
            "ode_policy": ode.tag,
        }
    return {
        "test_bpd_ode": ode.bpd_mean,
        "test_bpd_ode_se": ode.bpd_se,
        "ode_bias_bound": ode.bias_bound_bpd,
        "test_bpd_elbo": bound.bpd_mean,
        "test_bpd_elbo_se": bound.bpd_se,
        "ode_nfe": float(ode.nfe),
        "ode_policy": ode.tag,
    }


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

    def hook(ctx: EvalContext) -> Mapping[str, float | str]:
        return {**likelihood_hook(ctx), **fd_hook(ctx)}

    return hook
