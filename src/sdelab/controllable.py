r"""Controllable generation with an unconditional score model (Song et al. 2021, §5 and App. I):
inpainting, colorization and class-conditional sampling.

**Inpainting** (replacement method). Given an observation y and a mask m (1 = known), every
step of a stepping sampler is followed by

    x ← m ⊙ (α_t y + σ_t ε) + (1 − m) ⊙ x,      ε ~ N(0, I) fresh at every step,

i.e. the known region is replaced by a forward-diffused copy of the observation at the current
noise level (:func:`inpainting_constraint`, through ``schedule.perturb``). The unknown region
starts from the prior — not from the masked image, a bug of the original code. At the end the
known region is set to y exactly. This is Score-SDE's ``get_pc_inpainter`` for any schedule and
any sampler with steps (PC, λ-family, fixed-step ODE, DPM-Solver).

Why it is (approximately) right: at time t the unknown coordinates are driven towards
p_t(x_u | x_k) with x_k a draw from p_t(x_k | y); as t → t_min that conditional tends to the
target p_0(x_u | y). It is exact only in the limit where the sampler mixes the unknown block at
every t (many corrector steps): with few steps the unknown block keeps a memory of the jitter
σ_t ε of earlier known values, which inflates its spread. For Gaussian data the tests measure
this against the closed-form conditional.

**Colorization** is inpainting in a decoupled colour space: z = M x per pixel with M the
orthogonal 3×3 matrix whose first row is the gray direction (1, 1, 1)/√3 (:data:`DECOUPLE`;
Score-SDE's fixed matrix, transposed). The gray channel z_0 = √3 · mean_c(x) is known, the two
chroma channels are not; results map back with Mᵀ.

**Class-conditional sampling** (classifier guidance): ∇_x log p_t(x | c) = s(x, t) +
∇_x log p_t(c | x), scaled as s + w ∇_x log p_t(c | x) (:func:`guided_score_fn`) with a
time-dependent classifier trained on noised data (:mod:`sdelab.nets.classifier`,
:func:`sdelab.train.classifier.train_classifier`) or, for Gaussian mixtures such as 8gaussians,
the exact one (:func:`sdelab.oracle.mixture_classifier`). Image runs get a small conv classifier
(:class:`~sdelab.nets.classifier.ConvClassifier`); ``train_classifier`` trains either on
the run's own data (labels from ``dataset.sample_labeled``) and schedule, or — ``clean=True``
— at t = t_min only, a classifier of clean data (for evaluating samples).

**Classifier-free guidance** (Ho & Salimans 2022): a run with ``model.num_classes: K`` and
``model.label_dropout: p`` trains one network s(x, t, y) on labeled data, the label replaced by
a null class ∅ with probability p, so it learns both s(x, t, y) ≈ ∇ log p_t(x | y) and
s(x, t, ∅) ≈ ∇ log p_t(x). Since s(x, t, y) − s(x, t, ∅) ≈ ∇ log p_t(y | x), guidance of scale S
is

    s_S(x, t) = s(x, t, ∅) + S · (s(x, t, y) − s(x, t, ∅)) = (1 + w) s(x, t, y) − w s(x, t, ∅),

with w = S − 1 (:func:`cfg_score`'s w, Ho & Salimans' convention; :func:`cfg_score_fn`). The
CLI's ``--guidance S`` is the same S for both kinds of guidance: 0 unconditional, 1 the
conditional distribution, > 1 sharper classes.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from sdelab.oracle import LogProbFn
from sdelab.samplers import SampleResult, sample
from sdelab.sde import Schedule
from sdelab.utils import ScoreFn, batch_time, make_generator, randn_like

__all__ = [
    "DECOUPLE",
    "cfg_score",
    "cfg_score_fn",
    "colorize",
    "couple",
    "decouple",
    "guided_score_fn",
    "inpaint",
    "inpainting_constraint",
]


# ---- inpainting ------------------------------------------------------------------------------
def _check_mask(y: Tensor, mask: Tensor) -> Tensor:
    """The mask as a float tensor shaped like ``y`` (it may omit the batch dim)."""
    mask = torch.as_tensor(mask, device=y.device)
    if tuple(mask.shape) not in (tuple(y.shape), tuple(y.shape[1:])):
        raise ValueError(
            f"mask has shape {tuple(mask.shape)}, expected {tuple(y.shape[1:])} "
            f"(one example) or {tuple(y.shape)} (the batch)"
        )
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError("mask must hold only 0 (unknown) and 1 (known)")
    return mask.to(y.dtype).expand_as(y)


def _mix(transform: Tensor | None, x: Tensor, inverse: bool = False) -> Tensor:
    """Apply a channel-mixing matrix over dim 1 of ``x`` (``None``: identity)."""
    if transform is None:
        return x
    m = transform.T if inverse else transform
    return torch.einsum("ij,bj...->bi...", m.to(x), x)


def inpainting_constraint(
    schedule: Schedule,
    y: Tensor,
    mask: Tensor,
    *,
    generator: torch.Generator | None = None,
    transform: Tensor | None = None,
) -> Callable[[Tensor, Tensor], Tensor]:
    """``constraint(x, t)`` replacing the known region by α_t y + σ_t ε (fresh ε per call).

    Args:
        schedule: the forward process.
        y: ``(B, ...)`` observations (values in the unknown region are ignored).
        mask: shaped like ``y`` or ``y[0]``, 1 = known, 0 = unknown.
        generator: for the fresh noise.
        transform: optional orthogonal ``(C, C)`` matrix mixing dim 1: the mask then applies
            in the space z = transform · x (colorization).

    Raises:
        ValueError: mask of the wrong shape or not 0/1.
    """
    mask = _check_mask(y, mask)

    def constraint(x: Tensor, t: Tensor) -> Tensor:
        known = schedule.perturb(y, t, randn_like(y, generator))
        z = mask * _mix(transform, known) + (1 - mask) * _mix(transform, x)
        return _mix(transform, z, inverse=True)

    return constraint


def _conditional_sample(
    score_fn: ScoreFn,
    schedule: Schedule,
    y: Tensor,
    mask: Tensor,
    transform: Tensor | None,
    *,
    sampler: str,
    steps: int,
    generator: torch.Generator | int | None,
    options: dict[str, Any],
) -> SampleResult:
    gen = make_generator(generator, y.device)
    mask_full = _check_mask(y, mask)
    constraint = inpainting_constraint(schedule, y, mask_full, generator=gen, transform=transform)
    # the unknown region starts from the prior; the known one from y diffused to T
    x_T = schedule.prior_sample(y.shape, generator=gen, device=y.device, dtype=y.dtype)
    T = torch.as_tensor(schedule.T, dtype=y.dtype, device=y.device)
    x_T = constraint(x_T, batch_time(T, x_T))
    res = sample(
        score_fn,
        schedule,
        None,
        sampler=sampler,
        steps=steps,
        generator=gen,
        x_init=x_T,
        constraint=constraint,
        **options,
    )
    # the known region is the observation itself
    z = mask_full * _mix(transform, y) + (1 - mask_full) * _mix(transform, res.samples)
    res.samples = _mix(transform, z, inverse=True)
    return res


def inpaint(
    score_fn: ScoreFn,
    schedule: Schedule,
    y: Tensor,
    mask: Tensor,
    *,
    sampler: str = "pc",
    steps: int = 1000,
    generator: torch.Generator | int | None = None,
    **options,
) -> SampleResult:
    """Inpaint the unknown region (mask = 0) of ``y`` with the replacement method.

    Args:
        score_fn: ``score_fn(x, t)``, the unconditional score (a network or an oracle).
        schedule: the forward process it was trained with.
        y: ``(B, ...)`` observations; repeat one observation B times for B completions.
        mask: shaped like ``y`` or ``y[0]``; 1 = known (kept), 0 = unknown (generated).
        sampler, steps, **options: as :func:`sdelab.samplers.sample`; any stepping sampler
            (``pc`` — the default, Score-SDE's choice —, ``lambda``, ``euler_maruyama``,
            ``ode`` with a fixed-step method, ``dpm_solver``, ...). Adaptive ODE solvers refuse.
        generator: ``torch.Generator`` or seed, for the prior, the sampler and the fresh
            noise of the known region.

    Returns:
        :class:`~sdelab.samplers.SampleResult`; ``samples`` equal ``y`` exactly where mask = 1.

    Raises:
        ValueError: mask of the wrong shape or not 0/1; bad sampler options.
    """
    return _conditional_sample(
        score_fn,
        schedule,
        y,
        mask,
        None,
        sampler=sampler,
        steps=steps,
        generator=generator,
        options=options,
    )


# ---- colorization ----------------------------------------------------------------------------
#: The orthogonal decoupling matrix: row 0 the gray direction (1,1,1)/√3, then (−2,1,1)/√6 and
#: (0,1,−1)/√2 (Score-SDE's ``M`` transposed: its columns are these rows).
DECOUPLE = torch.tensor(
    [
        [1 / math.sqrt(3), 1 / math.sqrt(3), 1 / math.sqrt(3)],
        [-2 / math.sqrt(6), 1 / math.sqrt(6), 1 / math.sqrt(6)],
        [0.0, 1 / math.sqrt(2), -1 / math.sqrt(2)],
    ],
    dtype=torch.float64,
)


def decouple(x: Tensor) -> Tensor:
    """z = M x over the channel dim of ``(B, 3, ...)``: z_0 = √3 · channel mean (gray)."""
    return _mix(DECOUPLE, x)


def couple(z: Tensor) -> Tensor:
    """Inverse of :func:`decouple`: x = Mᵀ z."""
    return _mix(DECOUPLE, z, inverse=True)


def colorization_mask(shape: tuple[int, ...]) -> Tensor:
    """Mask in the decoupled space for images ``(3, ...)``: 1 on the gray channel."""
    mask = torch.zeros(shape)
    mask[0] = 1.0
    return mask


def colorize(
    score_fn: ScoreFn,
    schedule: Schedule,
    gray: Tensor,
    *,
    sampler: str = "pc",
    steps: int = 1000,
    generator: torch.Generator | int | None = None,
    **options,
) -> SampleResult:
    """Colour gray images: inpaint the two chroma channels of the decoupled space.

    Args:
        score_fn: the unconditional score of RGB images ``(B, 3, H, W)`` (any ``(B, 3, ...)``).
        schedule: its forward process.
        gray: ``(B, 1, ...)`` gray levels (the per-pixel channel mean, in model space), or an
            RGB batch ``(B, 3, ...)`` whose channel mean is taken.
        sampler, steps, generator, **options: as :func:`inpaint`.

    Returns:
        :class:`~sdelab.samplers.SampleResult`, samples ``(B, 3, ...)`` whose channel mean
        equals ``gray`` up to float rounding.

    Raises:
        ValueError: ``gray`` without a channel dim of 1 or 3.
    """
    if gray.ndim < 2 or gray.shape[1] not in (1, 3):
        raise ValueError(
            f"gray must have shape (B, 1, ...) or (B, 3, ...), got {tuple(gray.shape)}"
        )
    y = gray.mean(dim=1, keepdim=True).expand(-1, 3, *gray.shape[2:]).contiguous()
    mask = colorization_mask(tuple(y.shape[1:])).to(y)
    return _conditional_sample(
        score_fn,
        schedule,
        y,
        mask,
        DECOUPLE.to(y),
        sampler=sampler,
        steps=steps,
        generator=generator,
        options=options,
    )


# ---- guidance --------------------------------------------------------------------------------
def _labels(label: int | Tensor, x: Tensor, num_classes: int) -> Tensor:
    lab = torch.as_tensor(label, device=x.device).long()
    if lab.ndim == 0:
        lab = lab.expand(x.shape[0])
    if int(lab.min()) < 0 or int(lab.max()) >= num_classes:
        bad = int(lab.max()) if int(lab.max()) >= num_classes else int(lab.min())
        raise ValueError(
            f"class index {bad} out of range: the classifier has {num_classes} classes"
        )
    return lab


def guided_score_fn(
    score_fn: ScoreFn,
    classifier_log_prob_fn: LogProbFn,
    y: int | Tensor,
    scale: float = 1.0,
    *,
    num_classes: int | None = None,
) -> ScoreFn:
    """Classifier guidance: s(x, t) + scale · ∇_x log p_t(y | x).

    Args:
        score_fn: the unconditional score.
        classifier_log_prob_fn: ``(x, t) -> (B, K)`` log-probabilities (or logits: only their
            log-softmax matters) of a time-dependent classifier.
        y: the class, an int or ``(B,)`` labels.
        scale: guidance weight w; 1 gives the exact conditional score when the classifier is
            exact, 0 the unconditional score.
        num_classes: K, to reject a bad class index now rather than at the first call.

    Returns:
        ``guided(x, t)``, a plain score function: under ``torch.no_grad()`` (sampling) the
        classifier's gradient is taken and detached; under grad mode it stays differentiable in
        ``x`` and in the parameters (second derivatives of the classifier), so
        :func:`~sdelab.likelihood.log_likelihood` of the guided probability-flow ODE gets the
        full divergence.

    Raises:
        ValueError: a class index out of range (at once with ``num_classes``, else on call).
    """
    if num_classes is not None:
        _labels(y, torch.zeros(1), num_classes)

    def guided(x: Tensor, t: Tensor) -> Tensor:
        s = score_fn(x, t)
        if scale == 0:
            return s
        # under grad mode (the likelihood's divergence, training through the guided score) the
        # classifier's gradient stays in the graph, as a function of x itself: without it
        # ∇·(∇ log p_t(y | x)) would be missing from the ODE's divergence
        keep = torch.is_grad_enabled()
        with torch.enable_grad():
            xg = x if keep and x.requires_grad else x.detach().requires_grad_(True)
            logp = torch.log_softmax(classifier_log_prob_fn(xg, t), dim=1)
            lab = _labels(y, x, logp.shape[1])
            chosen = logp.gather(1, lab[:, None]).sum()
            (grad,) = torch.autograd.grad(chosen, xg, create_graph=keep)
        return s + scale * grad

    return guided


def cfg_score(cond: Tensor, uncond: Tensor, w: float) -> Tensor:
    """Classifier-free guidance (Ho & Salimans 2022) on scores: (1 + w) s_cond − w s_uncond.

    w = 0 is the conditional score; since s_cond − s_uncond = ∇ log p_t(y | x) this equals
    classifier guidance with scale 1 + w.
    """
    return (1 + w) * cond - w * uncond


def cfg_score_fn(
    model: Callable[..., Tensor], y: int | Tensor, scale: float = 1.0, *, num_classes: int
) -> ScoreFn:
    """Classifier-free guidance with a conditional score model ``model(x, t, labels)``:
    s(x, t, ∅) + scale · (s(x, t, y) − s(x, t, ∅)), i.e. :func:`cfg_score` with w = scale − 1.

    The conditional and null-class scores come from one network call on the doubled batch;
    ``scale = 1`` calls the network once, on the conditional half only.

    Args:
        model: e.g. the :class:`~sdelab.parametrization.ScoreModel` of a run with
            ``model.num_classes = K``; label K is the null class.
        y: the class, an int or ``(B,)`` labels in 0…K−1.
        scale: S (0: unconditional, 1: conditional, > 1: guided).
        num_classes: K.

    Raises:
        ValueError: a class index out of range.
    """
    _labels(y, torch.zeros(1), num_classes)

    def guided(x: Tensor, t: Tensor) -> Tensor:
        t = batch_time(t, x)
        lab = _labels(y, x, num_classes)
        if scale == 1:
            return model(x, t, lab)
        null = torch.full_like(lab, num_classes)
        out = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([lab, null]))
        cond, uncond = out.chunk(2)
        return cfg_score(cond, uncond, scale - 1)

    return guided
