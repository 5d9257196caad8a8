r"""Stochastic reverse-time samplers: predictors, correctors and the predictor–corrector loop.

All samplers share one signature,

    sampler(score_fn, schedule, x, ts, *, generator=None, constraint=None, callback=None,
            **options) -> x_{t_min}

with ``x`` drawn at ``ts[0] = T`` and ``ts`` decreasing to t_min. A step goes from t to s < t
(``h = t − s > 0``). Nothing here knows which schedule it runs on: every coefficient comes
from ``schedule(t)``, ``schedule.reverse_sde`` or the exact forward chain
``schedule.transition(s, t)``: x_t = a x_s + G ε with a = α_t/α_s, G² = σ_t² − a² σ_s².

Predictors ``(score_fn, schedule, x, t, s, *, generator) -> x_s`` (t, s scalar grid times, or
one per example of shape ``(B,)``):

- ``euler_maruyama``: one Euler–Maruyama step of the reverse SDE (λ-family, λ = 0 by default).
- ``reverse_diffusion``: Score-SDE's discretised reverse SDE x_s = x − f_i + G_i² s + G_i z, with
  the forward chain's f_i = (a − 1) x and G_i = G (VP: a = √(1 − β_i); VE: a = 1,
  G_i² = σ_i² − σ_{i−1}²).
- ``ancestral``: a draw from the exact posterior q(x_s | x_t, x̂_0) of the Gaussian chain —
  DDPM for VP (with the posterior variance β̃), SMLD's ancestral step for VE.
- ``none``.

Correctors ``(score_fn, schedule, x, s, t, *, snr, generator) -> x`` act at the current time s
(t is the previous, larger grid time, used for the chain's α_i):

- ``langevin``: Score-SDE's Langevin corrector, step ε = 2 α_i (snr·‖z‖/‖s‖)².
- ``ald``: NCSN's annealed Langevin dynamics in Score-SDE's form, ε = 2 α_i (snr·σ_s)².
- ``none``.

Every step but the Langevin corrector's is Gaussian given the current state, x' ~ N(x_mean,
diag(std²)): its law is in ``PREDICTOR_STEPS`` / ``CORRECTOR_STEPS`` (``(x_mean, std)``), and the
samplers take ``log_probs`` (a list) to record each step's log-density of the state it drew
(``sample(..., return_log_probs=True)``).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
from torch import Tensor

from sdelab.parametrization import from_eps, to_eps
from sdelab.sde import Schedule
from sdelab.utils import (
    ScoreFn,
    append_dims,
    batch_time,
    check_int,
    randn_like,
    sum_except_batch,
)

__all__ = [
    "CORRECTORS",
    "CORRECTOR_STEPS",
    "PREDICTORS",
    "PREDICTOR_STEPS",
    "ald_corrector",
    "ald_step",
    "ancestral_predictor",
    "ancestral_step",
    "denoise",
    "euler_maruyama_predictor",
    "euler_maruyama_step",
    "gaussian_log_prob",
    "langevin_corrector",
    "noise_log_prob",
    "reverse_diffusion_predictor",
    "reverse_diffusion_step",
    "sample_ancestral",
    "sample_annealed_langevin",
    "sample_euler_maruyama",
    "sample_lambda",
    "sample_pc",
    "sample_reverse_diffusion",
]

Constraint = Callable[[Tensor, Tensor], Tensor]
Callback = Callable[[Tensor, Tensor], None]
LOG_2PI = math.log(2 * math.pi)


# ---- helpers -------------------------------------------------------------------------------
# Schedule coefficients are evaluated at the scalar grid time (one value, however big the
# batch); only the score function receives one time per example.
def times_like(t: Tensor | float, x: Tensor) -> Tensor:
    """Time as a ``(B,)`` tensor for ``x``: :func:`batch_time`, but materialised, because the
    forward-mode autograd behind a schedule's default derivatives rejects expanded tensors."""
    return batch_time(t, x).contiguous()


def score_at(score_fn: ScoreFn, x: Tensor, t: Tensor) -> Tensor:
    """``score_fn(x, t)`` with ``t`` (scalar or ``(B,)``) given as one time per example."""
    return score_fn(x, times_like(t, x))


def x0_from_score(score: Tensor, schedule: Schedule, x: Tensor, t: Tensor) -> Tensor:
    """Tweedie's x̂_0 = (x + σ_t² s)/α_t through the converter (``t`` scalar or ``(B,)``)."""
    vals = schedule(t)
    return from_eps(to_eps(score, "score", x, vals), "x0", x, vals)


def apply_constraint(constraint: Constraint | None, x: Tensor, t: Tensor) -> Tensor:
    return x if constraint is None else constraint(x, times_like(t, x))


# ---- predictors: one step from t to s < t --------------------------------------------------
def euler_maruyama_step(
    score_fn: ScoreFn,
    schedule: Schedule,
    x: Tensor,
    t: Tensor,
    s: Tensor,
    *,
    lam: float = 0.0,
) -> tuple[Tensor, Tensor]:
    """Law of one Euler–Maruyama step from t to s on the λ-family reverse SDE: x_s ~ N(x_mean,
    std² I) with x_mean = x − h [f x − (1 − λ/2) g² s], std = √((1 − λ) g² h), h = t − s.
    Returns ``(x_mean, std)``, ``std`` broadcastable to ``x``."""
    h = append_dims(t - s, x.ndim)
    drift, diffusion = schedule.reverse_sde(x, t, score_at(score_fn, x, t), lam)
    return x - drift * h, diffusion * h.sqrt()  # dt = −h: time runs backwards


def euler_maruyama_predictor(
    score_fn: ScoreFn,
    schedule: Schedule,
    x: Tensor,
    t: Tensor,
    s: Tensor,
    *,
    generator: torch.Generator | None = None,
    lam: float = 0.0,
) -> Tensor:
    """Euler–Maruyama on the λ-family reverse SDE dx = [f x − (1 − λ/2) g² s] dt + √(1−λ) g dw̄."""
    x_mean, std = euler_maruyama_step(score_fn, schedule, x, t, s, lam=lam)
    if lam == 1.0:  # probability-flow ODE: no noise
        return x_mean
    return x_mean + std * randn_like(x, generator)


def reverse_diffusion_step(
    score_fn: ScoreFn, schedule: Schedule, x: Tensor, t: Tensor, s: Tensor
) -> tuple[Tensor, Tensor]:
    """Law of Score-SDE's reverse-diffusion step: N(x − f_i + G² s(x, t), G² I) on the forward
    chain x_t = a x_s + G ε (f_i = (a − 1) x). Returns ``(x_mean, std = G)``."""
    a, G = (append_dims(v, x.ndim) for v in schedule.transition(s, t))
    f_i = (a - 1) * x  # forward chain x_t = x_s + f_i + G z, evaluated at x_t as in Score-SDE
    return x - f_i + G**2 * score_at(score_fn, x, t), G


def reverse_diffusion_predictor(
    score_fn: ScoreFn,
    schedule: Schedule,
    x: Tensor,
    t: Tensor,
    s: Tensor,
    *,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Score-SDE's reverse-diffusion predictor on the exact forward chain between s and t."""
    x_mean, std = reverse_diffusion_step(score_fn, schedule, x, t, s)
    return x_mean + std * randn_like(x, generator)


def ancestral_step(
    score_fn: ScoreFn, schedule: Schedule, x: Tensor, t: Tensor, s: Tensor
) -> tuple[Tensor, Tensor]:
    """Law of the ancestral step, q(x_s | x_t, x̂_0) = N(x_mean, std² I): the posterior of the
    chain x_t = a x_s + G ε, x_s = α_s x_0 + σ_s ε' with x̂_0 from the score (Tweedie).
    Returns ``(x_mean, std)`` = ((a σ_s² x_t + α_s G² x̂_0)/σ_t², σ_s G/σ_t)."""
    n = x.ndim
    a, G = (append_dims(v, n) for v in schedule.transition(s, t))
    alpha_s, sigma_s = (append_dims(v, n) for v in schedule.alpha_sigma(s))
    sigma_t = append_dims(schedule.alpha_sigma(t)[1], n)
    x0 = x0_from_score(score_at(score_fn, x, t), schedule, x, t)
    x_mean = (a * sigma_s**2 * x + alpha_s * G**2 * x0) / sigma_t**2
    return x_mean, sigma_s * G / sigma_t


def ancestral_predictor(
    score_fn: ScoreFn,
    schedule: Schedule,
    x: Tensor,
    t: Tensor,
    s: Tensor,
    *,
    generator: torch.Generator | None = None,
) -> Tensor:
    """A draw from q(x_s | x_t, x̂_0) of the chain x_t = a x_s + G ε, x_s = α_s x_0 + σ_s ε'.

    Posterior mean (a σ_s² x_t + α_s G² x̂_0)/σ_t² and std σ_s G/σ_t, with x̂_0 from the score
    by Tweedie's formula. For VP this is DDPM's (x + β s)/√(1−β) with variance β̃ (Ho et al.
    2020, Eq. 7); for VE it is SMLD's ancestral step of Song et al. (2021), App. F.
    """
    x_mean, std = ancestral_step(score_fn, schedule, x, t, s)
    return x_mean + std * randn_like(x, generator)


def no_predictor(score_fn, schedule, x, t, s, *, generator=None) -> Tensor:
    """No predictor: x is left as it is (corrector-only samplers such as NCSN's ALD)."""
    return x


#: Predictors by name (a plain dict: add your own ``(score_fn, schedule, x, t, s, *, generator)``).
PREDICTORS: dict[str, Callable[..., Tensor]] = {
    "euler_maruyama": euler_maruyama_predictor,
    "reverse_diffusion": reverse_diffusion_predictor,
    "ancestral": ancestral_predictor,
    "none": no_predictor,
}

#: The law of each Gaussian predictor's step: ``step(score_fn, schedule, x, t, s, **kw) ->
#: (x_mean, std)``, the step being x_s ~ N(x_mean, diag(std²)) (``std`` broadcastable to x).
PREDICTOR_STEPS: dict[str, Callable[..., tuple[Tensor, Tensor]]] = {
    "euler_maruyama": euler_maruyama_step,
    "reverse_diffusion": reverse_diffusion_step,
    "ancestral": ancestral_step,
}


# ---- correctors: MCMC at the current time s ------------------------------------------------
def _chain_alpha(schedule: Schedule, s: Tensor, t: Tensor, ndim: int) -> Tensor:
    """Score-SDE's α_i = 1 − β_i of the chain step between s and t: a² (= 1 whenever α ≡ 1)."""
    return append_dims(schedule.transition(s, t)[0] ** 2, ndim)


def _mean_norm(v: Tensor) -> Tensor:
    """Batch mean of the per-example Euclidean norms (a 0-d tensor), as Score-SDE."""
    return torch.linalg.vector_norm(v.reshape(v.shape[0], -1), dim=1).mean()


def langevin_corrector(
    score_fn: ScoreFn,
    schedule: Schedule,
    x: Tensor,
    s: Tensor,
    t: Tensor,
    *,
    snr: float,
    generator: torch.Generator | None = None,
) -> Tensor:
    """One Langevin step x + ε s + √(2ε) z with ε = 2 α_i (snr·‖z‖/‖s‖)² (Song et al. 2021,
    Alg. 4). As in Score-SDE the norms are batch means: per-example ratios are heavy-tailed in
    low dimension (a tiny ‖s‖ gives a huge step), but a sample then depends on its batch."""
    grad = score_at(score_fn, x, s)
    z = randn_like(x, generator)
    step = 2 * _chain_alpha(schedule, s, t, x.ndim) * (snr * _mean_norm(z) / _mean_norm(grad)) ** 2
    return x + step * grad + (2 * step).sqrt() * z


def ald_step(
    score_fn: ScoreFn, schedule: Schedule, x: Tensor, s: Tensor, t: Tensor, *, snr: float
) -> tuple[Tensor, Tensor]:
    """Law of one annealed-Langevin step at s: N(x + ε s(x, s), 2ε I) with ε = 2 α_i (snr·σ_s)².
    Returns ``(x_mean, std = √(2ε))``."""
    grad = score_at(score_fn, x, s)
    sigma = append_dims(schedule.alpha_sigma(s)[1], x.ndim)
    step = 2 * _chain_alpha(schedule, s, t, x.ndim) * (snr * sigma) ** 2
    return x + step * grad, (2 * step).sqrt()


def ald_corrector(
    score_fn: ScoreFn,
    schedule: Schedule,
    x: Tensor,
    s: Tensor,
    t: Tensor,
    *,
    snr: float,
    generator: torch.Generator | None = None,
) -> Tensor:
    """One step of annealed Langevin dynamics (Song & Ermon 2019, Alg. 1): step ∝ σ_s²,
    ε = 2 α_i (snr·σ_s)² as Score-SDE's ``AnnealedLangevinDynamics``."""
    x_mean, std = ald_step(score_fn, schedule, x, s, t, snr=snr)
    return x_mean + std * randn_like(x, generator)


#: Correctors by name (``None`` marks "no corrector": it costs no score evaluation).
CORRECTORS: dict[str, Callable[..., Tensor] | None] = {
    "langevin": langevin_corrector,
    "ald": ald_corrector,
    "none": None,
}

#: The law of each Gaussian corrector's step, ``step(score_fn, schedule, x, s, t, *, snr) ->
#: (x_mean, std)``. The Langevin corrector has none: its step size depends on the norm of the
#: noise it draws (a batch mean), so its step is not Gaussian given x.
CORRECTOR_STEPS: dict[str, Callable[..., tuple[Tensor, Tensor]]] = {"ald": ald_step}


def noise_log_prob(eps: Tensor, std: Tensor) -> Tensor:
    """log N(x_mean + std ⊙ ε; x_mean, diag(std²)) per example, ``(B,)`` in nats:
    −½‖ε‖² − (D/2) log 2π − Σ log std, for the noise ``eps`` ``(B, ...)`` a step drew."""
    std = std.expand_as(eps)
    d = eps[0].numel()
    return -0.5 * sum_except_batch(eps**2) - 0.5 * d * LOG_2PI - sum_except_batch(std.log())


def gaussian_log_prob(x_next: Tensor, x_mean: Tensor, std: Tensor) -> Tensor:
    """log N(x_next; x_mean, diag(std²)) per example, ``(B,)`` in nats — e.g. with a
    ``PREDICTOR_STEPS`` law, the log-probability of a stored step under a (new) score function,
    differentiable in its parameters."""
    return noise_log_prob((x_next - x_mean) / std, std)


def _gaussian_step(table: dict, name, what: str, **kw) -> Callable[..., tuple[Tensor, Tensor]]:
    """The law of predictor/corrector ``name`` for ``return_log_probs``, or a ValueError."""
    if callable(name) or name not in table:
        known = ", ".join(table)
        why = "a custom callable" if callable(name) else repr(name)
        raise ValueError(
            f"return_log_probs needs Gaussian steps: {what} {why} has no Gaussian step law; "
            f"use {what} {known}" + (" (or 'none')" if what == "corrector" else "")
        )
    return functools.partial(table[name], **kw) if kw else table[name]


def _logged_move(step, args: tuple, kwargs: dict, generator, log_probs: list) -> Tensor:
    """One Gaussian step drawn as x_mean + std ε, its log-probability appended to log_probs."""
    x_mean, std = step(*args, **kwargs)
    eps = randn_like(x_mean, generator)
    log_probs.append(noise_log_prob(eps, std))
    return x_mean + std * eps


def _choose(table: dict, name, what: str):
    """Look ``name`` up in ``table`` (a callable passes through) or raise a ValueError."""
    if callable(name):
        return name
    if name not in table:
        raise ValueError(f"unknown {what} {name!r}: choose one of {', '.join(table)}")
    return table[name]


# ---- samplers ------------------------------------------------------------------------------
def sample_pc(
    score_fn: ScoreFn,
    schedule: Schedule,
    x: Tensor,
    ts: Tensor,
    *,
    predictor: str | Callable[..., Tensor] = "reverse_diffusion",
    corrector: str | Callable[..., Tensor] = "langevin",
    snr: float = 0.16,
    n_corrector_steps: int = 1,
    generator: torch.Generator | None = None,
    constraint: Constraint | None = None,
    callback: Callback | None = None,
    log_probs: list[Tensor] | None = None,
) -> Tensor:
    """Predictor–corrector sampling (Song et al. 2021, Alg. 1): at each grid time a predictor
    step from t_i to t_{i+1}, then ``n_corrector_steps`` corrector steps at t_{i+1}.

    ``predictor`` is a name in ``PREDICTORS`` or a callable of the same signature, likewise
    ``corrector`` in ``CORRECTORS``. ``constraint(x, t)`` is applied after every predictor and
    corrector step; ``callback(x, t)`` sees the state at every grid time after the first.
    NFE: one per predictor step (none for ``"none"``) plus one per corrector step.

    ``log_probs``: a list to which every stochastic step appends the ``(B,)`` log-density of the
    state it drew under its Gaussian law (``PREDICTOR_STEPS``, ``CORRECTOR_STEPS``), in the
    order taken; the draws are the same as without it. It needs named Gaussian steps (not the
    Langevin corrector, not a custom callable) and no ``constraint`` (ValueError otherwise).
    """
    predict = _choose(PREDICTORS, predictor, "predictor")
    correct = _choose(CORRECTORS, corrector, "corrector")
    if not (math.isfinite(snr) and snr > 0):
        raise ValueError(f"snr must be a finite number > 0, got {snr}")
    check_int("n_corrector_steps", n_corrector_steps, 0)
    return _pc_loop(
        score_fn,
        schedule,
        x,
        ts,
        predictor,
        corrector,
        {},
        snr,
        n_corrector_steps,
        generator,
        constraint,
        callback,
        log_probs,
        predict,
        correct,
    )


def _pc_loop(
    score_fn,
    schedule,
    x,
    ts,
    predictor,
    corrector,
    predictor_kw: dict,
    snr,
    n_corrector_steps,
    generator,
    constraint,
    callback,
    log_probs,
    predict,
    correct,
) -> Tensor:
    """The PC loop; with ``log_probs`` a list, every step is drawn from its Gaussian law."""
    n_corr = n_corrector_steps if correct is not None else 0
    if log_probs is not None:
        if constraint is not None:
            raise ValueError(
                "return_log_probs with a constraint: the constrained step is not Gaussian "
                "(known entries are replaced); sample without the constraint or without log-probs"
            )
        p_step = (
            None
            if predictor == "none"
            else _gaussian_step(PREDICTOR_STEPS, predictor, "predictor", **predictor_kw)
        )
        c_step = None if n_corr == 0 else _gaussian_step(CORRECTOR_STEPS, corrector, "corrector")
    else:
        predict = functools.partial(predict, **predictor_kw) if predictor_kw else predict
    for i in range(len(ts) - 1):
        t, s = ts[i], ts[i + 1]
        if log_probs is None:
            x = predict(score_fn, schedule, x, t, s, generator=generator)
        elif p_step is not None:
            x = _logged_move(p_step, (score_fn, schedule, x, t, s), {}, generator, log_probs)
        x = apply_constraint(constraint, x, s)
        for _ in range(n_corr):
            if log_probs is None:
                x = correct(score_fn, schedule, x, s, t, snr=snr, generator=generator)
            else:
                args = (score_fn, schedule, x, s, t)
                x = _logged_move(c_step, args, {"snr": snr}, generator, log_probs)
            x = apply_constraint(constraint, x, s)
        if callback is not None:
            callback(x, s)
    return x


def sample_euler_maruyama(
    score_fn, schedule, x, ts, *, generator=None, constraint=None, callback=None, log_probs=None
) -> Tensor:
    """Euler–Maruyama on the reverse SDE (Song et al. 2021, Anderson 1982): PC with the
    ``euler_maruyama`` predictor and no corrector. NFE = steps."""
    return sample_pc(
        score_fn,
        schedule,
        x,
        ts,
        predictor="euler_maruyama",
        corrector="none",
        generator=generator,
        constraint=constraint,
        callback=callback,
        log_probs=log_probs,
    )


def sample_reverse_diffusion(
    score_fn, schedule, x, ts, *, generator=None, constraint=None, callback=None, log_probs=None
) -> Tensor:
    """Score-SDE's reverse-diffusion predictor alone (Song et al. 2021, Eq. 46). NFE = steps."""
    return sample_pc(
        score_fn,
        schedule,
        x,
        ts,
        predictor="reverse_diffusion",
        corrector="none",
        generator=generator,
        constraint=constraint,
        callback=callback,
        log_probs=log_probs,
    )


def sample_ancestral(
    score_fn, schedule, x, ts, *, generator=None, constraint=None, callback=None, log_probs=None
) -> Tensor:
    """Ancestral sampling through the exact chain posterior: DDPM (Ho et al. 2020) for VP,
    SMLD (Song et al. 2021, Eq. 47) for VE, and the same one step for any schedule. NFE = steps."""
    return sample_pc(
        score_fn,
        schedule,
        x,
        ts,
        predictor="ancestral",
        corrector="none",
        generator=generator,
        constraint=constraint,
        callback=callback,
        log_probs=log_probs,
    )


def sample_annealed_langevin(
    score_fn,
    schedule,
    x,
    ts,
    *,
    snr: float = 0.16,
    n_corrector_steps: int = 1,
    generator=None,
    constraint=None,
    callback=None,
    log_probs=None,
) -> Tensor:
    """Annealed Langevin dynamics (NCSN, Song & Ermon 2019): no predictor, ``n_corrector_steps``
    ALD steps at each grid time after T. NFE = steps × n_corrector_steps."""
    return sample_pc(
        score_fn,
        schedule,
        x,
        ts,
        predictor="none",
        corrector="ald",
        snr=snr,
        n_corrector_steps=n_corrector_steps,
        generator=generator,
        constraint=constraint,
        callback=callback,
        log_probs=log_probs,
    )


def sample_lambda(
    score_fn,
    schedule,
    x,
    ts,
    *,
    lam: float = 0.0,
    generator=None,
    constraint=None,
    callback=None,
    log_probs=None,
) -> Tensor:
    """Euler–Maruyama on the λ-family of reverse processes (Huang et al. 2021, sdeflow-light):
    dx = [f x − (1 − λ/2) g² s] dt + √(1 − λ) g dw̄; λ = 0 the reverse SDE, λ = 1 the
    probability-flow ODE; all share the marginals p_t. NFE = steps."""
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam must lie in [0, 1] (0: reverse SDE, 1: ODE), got {lam}")
    if log_probs is not None and lam == 1.0:
        raise ValueError(
            "return_log_probs with lam=1: the probability-flow ODE's steps are deterministic and "
            "have no log-probability; use lam < 1 (or log_likelihood for the ODE's density)"
        )
    return _pc_loop(
        score_fn,
        schedule,
        x,
        ts,
        "euler_maruyama",
        "none",
        {"lam": float(lam)},
        0.16,
        0,
        generator,
        constraint,
        callback,
        log_probs,
        euler_maruyama_predictor,
        None,
    )


def denoise(score_fn: ScoreFn, schedule: Schedule, x: Tensor, t: Tensor | float) -> Tensor:
    """Tweedie's final denoising x̂_0 = (x + σ_t² ∇log p_t(x))/α_t (Song et al. 2021, App. G),
    through the converter. One score evaluation."""
    t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
    return x0_from_score(score_at(score_fn, x, t), schedule, x, t)
