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
:func:`train_classifier`) or, for Gaussian mixtures such as 8gaussians, the exact one
(:func:`mixture_classifier`). Image runs get a small conv classifier
(:class:`~sdelab.nets.classifier.ConvClassifier`); :func:`train_classifier` trains either on
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

import io
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from sdelab.losses import sample_time
from sdelab.samplers import SampleResult, sample
from sdelab.sde import Schedule
from sdelab.utils import append_dims, batch_time, make_generator, randn_like

__all__ = [
    "DECOUPLE",
    "cfg_score",
    "cfg_score_fn",
    "colorization_mask",
    "colorize",
    "couple",
    "decouple",
    "eight_gaussians_mixture",
    "guided_score_fn",
    "inpaint",
    "inpainting_constraint",
    "load_classifier",
    "mixture_classifier",
    "mixture_score_fn",
    "sample_labeled",
    "train_classifier",
]

ScoreFn = Callable[[Tensor, Tensor], Tensor]
LogProbFn = Callable[[Tensor, Tensor], Tensor]  # (x, t) -> (B, K) log p_t(class | x)


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

    Raises:
        ValueError: a class index out of range (at once with ``num_classes``, else on call).
    """
    if num_classes is not None:
        _labels(y, torch.zeros(1), num_classes)

    def guided(x: Tensor, t: Tensor) -> Tensor:
        s = score_fn(x, t)
        if scale == 0:
            return s
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            logp = torch.log_softmax(classifier_log_prob_fn(xg, t), dim=1)
            lab = _labels(y, x, logp.shape[1])
            chosen = logp.gather(1, lab[:, None]).sum()
            (grad,) = torch.autograd.grad(chosen, xg)
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


# ---- Gaussian mixtures: exact classifier and score ---------------------------------------------
def eight_gaussians_mixture() -> tuple[Tensor, float]:
    """The 8gaussians toy as a mixture: means ``(8, 2)`` and the common std (equal weights)."""
    from sdelab.data.toys import _EIGHT_SCALE, _eight_centers

    return torch.tensor(_eight_centers(), dtype=torch.float32), 0.5 / _EIGHT_SCALE


def _component_log_probs(
    x: Tensor, t: Tensor, means: Tensor, std: float, schedule: Schedule, log_w: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """log w_k + log N(x; α μ_k, (α² s² + σ²) I) as ``(B, K)``, plus the diffused means and var."""
    alpha, sigma = schedule.alpha_sigma(batch_time(t, x))
    alpha, sigma = append_dims(alpha, 2), append_dims(sigma, 2)  # (B, 1)
    var = alpha**2 * std**2 + sigma**2  # (B, 1)
    mu = alpha[:, :, None] * means.to(x)  # (B, K, D)
    d = x.shape[1]
    sq = ((x[:, None, :] - mu) ** 2).sum(-1)  # (B, K)
    logn = -0.5 * (sq / var + d * torch.log(2 * math.pi * var))
    return log_w.to(x) + logn, mu, var


def mixture_classifier(
    means: Tensor, std: float, schedule: Schedule, weights: Tensor | None = None
) -> LogProbFn:
    """The exact time-dependent classifier of an isotropic Gaussian mixture.

    Component k of data N(μ_k, s² I) diffuses to N(α_t μ_k, (α_t² s² + σ_t²) I), so
    p_t(k | x) = w_k N_k(x) / Σ_j w_j N_j(x). Returns ``log_prob_fn(x, t) -> (B, K)``.

    Args:
        means: ``(K, D)`` component means.
        std: the components' common standard deviation s.
        schedule: the forward process.
        weights: ``(K,)`` mixture weights (default equal).
    """
    k = means.shape[0]
    log_w = torch.log(torch.full((k,), 1.0 / k) if weights is None else weights / weights.sum())

    def log_prob_fn(x: Tensor, t: Tensor) -> Tensor:
        terms, _, _ = _component_log_probs(x, t, means, std, schedule, log_w)
        return torch.log_softmax(terms, dim=1)

    return log_prob_fn


def mixture_score_fn(
    means: Tensor, std: float, schedule: Schedule, weights: Tensor | None = None
) -> ScoreFn:
    """The exact score of the diffused mixture: Σ_k p_t(k | x) (α μ_k − x)/(α² s² + σ²)."""
    k = means.shape[0]
    log_w = torch.log(torch.full((k,), 1.0 / k) if weights is None else weights / weights.sum())

    def score_fn(x: Tensor, t: Tensor) -> Tensor:
        terms, mu, var = _component_log_probs(x, t, means, std, schedule, log_w)
        r = torch.softmax(terms, dim=1)  # (B, K)
        return ((r[:, :, None] * (mu - x[:, None, :])).sum(1)) / var

    return score_fn


# ---- labeled data and classifier training ------------------------------------------------
def sample_labeled(name: str, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """``n`` labeled points ``(x (n, ...), labels (n,))`` of dataset ``name`` (default options),
    drawn by its ``sample_labeled``; ``ValueError`` for a dataset without labels."""
    from sdelab.data import make_dataset

    return make_dataset(name).sample_labeled(n, generator)


def noised_batch(
    x0: Tensor, schedule: Schedule, generator: torch.Generator | None, *, clean: bool = False
) -> tuple[Tensor, Tensor]:
    """(x_t, t) with t drawn uniformly in [t_min, T] (``clean``: t = t_min) and
    x_t = α_t x_0 + σ_t ε."""
    if clean:
        t = torch.full((x0.shape[0],), schedule.t_min, dtype=x0.dtype, device=x0.device)
    else:
        t = sample_time(schedule, x0.shape[0], generator=generator, dtype=x0.dtype).t
    return schedule.perturb(x0, t, randn_like(x0, generator)), t


def fit_classifier(
    net: nn.Module,
    sample_fn: Callable[[int, torch.Generator], tuple[Tensor, Tensor]],
    schedule: Schedule,
    *,
    steps: int = 2000,
    batch_size: int = 256,
    lr: float = 1e-3,
    seed: int = 0,
    log_every: int = 0,
    clean: bool = False,
) -> list[float]:
    """Train a time-dependent classifier on noised data: minimise E_t CE(net(x_t, t), y).

    Times are uniform in [t_min, T], as for the score model (``clean``: t = t_min only, a
    classifier of clean data). Returns the loss per step.
    """
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    net.train()
    losses = []
    for step in range(1, steps + 1):
        x0, labels = sample_fn(batch_size, gen)
        xt, t = noised_batch(x0, schedule, gen, clean=clean)
        loss = nn.functional.cross_entropy(net(xt, t), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        if log_every and step % log_every == 0:
            print(f"step {step}: loss {float(loss):.4f}")
    net.eval()
    return losses


CLASSIFIER_FORMAT = "sdelab-classifier"


def train_classifier(
    run_or_config: str | Path | dict[str, Any],
    out: str | Path,
    *,
    steps: int = 2000,
    batch_size: int = 256,
    lr: float = 1e-3,
    width: int = 128,
    depth: int = 3,
    seed: int = 0,
    log_every: int = 0,
    clean: bool = False,
) -> Path:
    """Train a noise-conditional classifier for a run's data and schedule and save it to ``out``.

    Vector data (toys) get a :class:`~sdelab.nets.classifier.TimeClassifier` MLP, image data a
    :class:`~sdelab.nets.classifier.ConvClassifier`; both are trained on the run's training
    data with its labels (``dataset.sample_labeled``: uniformly dequantized images).

    Args:
        run_or_config: a run folder written by ``sdelab train`` (its checkpoint's config is
            used), a YAML config path / built-in name, or a config dict.
        out: folder for ``classifier.safetensors`` + ``classifier.json`` (must not exist or be
            empty).
        steps, batch_size, lr: Adam on the cross-entropy of noised labeled data.
        width, depth: the MLP's hidden units and layers; for images ``width`` is the conv
            net's base channels (``depth`` unused).
        seed: data, times and initialisation.
        clean: train at t = t_min only: a classifier of clean data (e.g. to score samples),
            not one for guidance.

    Returns:
        The JSON path. ``classifier.json`` records the accuracy on held-out data (the test
        split for images, fresh points for toys) at a few noise levels.

    Raises:
        ValueError: a dataset without labels, a non-empty ``out``, a bad size.
    """
    from safetensors.torch import save as save_safetensors

    from sdelab.data.toys import no_labels_error
    from sdelab.sde import make_schedule
    from sdelab.train.checkpoint import atomic_write, list_checkpoints, load_checkpoint
    from sdelab.train.config import load_config
    from sdelab.train.loop import make_run_dataset

    if steps < 1 or batch_size < 1 or width < 1 or depth < 1 or not lr > 0:
        raise ValueError(
            f"need positive --steps, --batch-size, --width, --depth and --lr, got {steps}, "
            f"{batch_size}, {width}, {depth}, {lr}"
        )
    src = Path(run_or_config) if isinstance(run_or_config, (str, Path)) else None
    if src is not None and src.is_dir() and list_checkpoints(src):
        config = load_checkpoint(src).config
    else:
        config = load_config(run_or_config)
    dataset = make_run_dataset(config)
    num_classes = getattr(dataset, "num_classes", 0)
    if not num_classes:
        raise no_labels_error(config.data.name)
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out} is not empty: choose another --out or delete it first")
    schedule = make_schedule(config.sde.name, **config.sde.kwargs)
    torch.manual_seed(seed)
    shape = getattr(dataset, "image_shape", None)
    if shape is not None:
        arch: dict[str, Any] = {
            "arch": "conv",
            "image_shape": list(shape),
            "num_classes": num_classes,
            "channels": width,
        }
    else:
        arch = {"arch": "mlp", "num_classes": num_classes, "width": width, "depth": depth}
    net = _build_classifier(arch, dataset.dim)
    start = time.time()
    losses = fit_classifier(
        net,
        dataset.sample_labeled,
        schedule,
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
        log_every=log_every,
        clean=clean,
    )
    times = (0.0,) if clean else (0.0, 0.1, 0.3, 0.5)
    accuracy = classifier_accuracy(net, _held_out(dataset, seed + 1), schedule, times=times)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    atomic_write(out / "classifier.safetensors", save_safetensors(tensors))
    record = {
        "format": CLASSIFIER_FORMAT,
        **arch,
        "dim": dataset.dim,
        "data": config.data.name,
        "data_options": config.data.options,
        "sde": {"name": config.sde.name, "kwargs": config.sde.kwargs},
        "clean": clean,
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "seed": seed,
        "final_loss": float(np.mean(losses[-50:])),
        "accuracy": accuracy,
        "seconds": round(time.time() - start, 1),
    }
    json_path = out / "classifier.json"
    atomic_write(json_path, json.dumps(record, indent=1))
    return json_path


def _build_classifier(meta: dict[str, Any], dim: int) -> nn.Module:
    from sdelab.nets.classifier import ConvClassifier, TimeClassifier

    if meta.get("arch", "mlp") == "conv":
        return ConvClassifier(
            meta["image_shape"][0],
            meta["num_classes"],
            channels=meta["channels"],
            image_shape=tuple(meta["image_shape"]),
        )
    return TimeClassifier(dim, meta["num_classes"], width=meta["width"], depth=meta["depth"])


def _held_out(dataset: Any, seed: int, n: int = 2000) -> tuple[Tensor, Tensor]:
    """Labeled held-out data: an image dataset's test split (levels at bin centres, in model
    space), else ``n`` fresh points."""
    labels = getattr(dataset, "test_labels", None)
    if labels is not None:
        return dataset.to_model(dataset.test_set(n)), labels[:n]
    return dataset.sample_labeled(n, torch.Generator().manual_seed(seed))


def classifier_accuracy(
    net: nn.Module,
    data: tuple[Tensor, Tensor],
    schedule: Schedule,
    *,
    times: tuple[float, ...] = (0.0, 0.1, 0.3, 0.5),
    seed: int = 1,
) -> dict[str, float]:
    """Accuracy of a time-dependent classifier on labeled data ``(x0, labels)`` noised to a
    few fixed times (relative to [t_min, T]: t = t_min + u (T − t_min); u = 0 is t_min)."""
    x0, labels = data
    gen = torch.Generator().manual_seed(seed)
    n = len(labels)
    result = {}
    with torch.no_grad():
        for u in times:
            t = torch.full((n,), schedule.t_min + u * (schedule.T - schedule.t_min))
            xt = schedule.perturb(x0, t, randn_like(x0, gen))
            pred = net(xt, t).argmax(dim=1)
            result[f"{u:g}"] = float((pred == labels).float().mean())
    return result


def load_classifier(folder: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """Load a classifier saved by :func:`train_classifier`: ``(net in eval mode, metadata)``.

    A conv classifier also takes flattened images ``(B, C·H·W)``.
    Raises ValueError / FileNotFoundError for a missing or foreign folder.
    """
    from safetensors.torch import load as load_safetensors

    folder = Path(folder)
    json_path = folder / "classifier.json"
    if not json_path.is_file():
        raise FileNotFoundError(f"no classifier in {folder}: run sdelab train-classifier first")
    meta = json.loads(json_path.read_text())
    if meta.get("format") != CLASSIFIER_FORMAT:
        raise ValueError(f"{json_path} is not an sdelab classifier")
    net = _build_classifier(meta, meta["dim"])
    net.load_state_dict(load_safetensors((folder / "classifier.safetensors").read_bytes()))
    net.requires_grad_(False)
    return net.eval(), meta


# ---- run-level helpers behind the CLI ------------------------------------------------------
def parse_known(items: list[str], dim: int) -> tuple[Tensor, Tensor]:
    """``["0=1.5", ...]`` (coordinate=value) to an observation ``(dim,)`` and mask ``(dim,)``."""
    y, mask = torch.zeros(dim), torch.zeros(dim)
    for item in items:
        key, sep, value = item.partition("=")
        try:
            i, v = int(key), float(value)
        except ValueError:
            raise ValueError(f"bad --known {item!r}: write COORD=VALUE, e.g. 0=1.5") from None
        if not sep or not 0 <= i < dim:
            raise ValueError(f"bad --known {item!r}: coordinate must be in 0..{dim - 1}")
        y[i], mask[i] = v, 1.0
    if not items or bool(mask.all()):
        raise ValueError(f"--known must fix between 1 and {dim - 1} of the {dim} coordinates")
    return y, mask


def load_png(path: str | Path, dim: int, *, channels: int | None = None) -> Tensor:
    """A PNG as a model-space image ``(C, H, W)`` in [−1, 1] for a run of data dimension ``dim``
    (flattened images: C·H·W must equal ``dim``; C = ``channels`` or inferred as 1 or 3)."""
    from PIL import Image

    from sdelab.data.image_formats import read_image_file
    from sdelab.data.images import levels_to_model

    with Image.open(path) as img:
        w, h = img.size
    if channels is None:
        channels = dim // (h * w) if dim in (h * w, 3 * h * w) else 0
    if channels not in (1, 3) or channels * h * w != dim:
        raise ValueError(
            f"{path}: a {h}×{w} image does not fit a run of data dimension {dim} "
            f"(need C·H·W = {dim} with C = {channels or '1 or 3'})"
        )
    levels = torch.from_numpy(read_image_file(path, channels=channels).astype(np.int64))
    return levels_to_model(levels, 256, u=0.0)


def load_mask_png(path: str | Path, image_shape: tuple[int, ...]) -> Tensor:
    """A mask PNG (nonzero = known) as a 0/1 tensor broadcast to ``image_shape`` ``(C, H, W)``."""
    from sdelab.data.image_formats import read_image_file

    arr = read_image_file(path, channels=1)  # (1, H', W')
    if arr.shape[1:] != tuple(image_shape[1:]):
        raise ValueError(
            f"mask has shape {arr.shape[1]}×{arr.shape[2]}, the image "
            f"{image_shape[1]}×{image_shape[2]}"
        )
    return torch.from_numpy((arr > 0).astype(np.float32)).expand(*image_shape).contiguous()


def save_png_grid(rows: list[Tensor], path: str | Path, *, pad: int = 1) -> Path:
    """Write images in model space [−1, 1] as one PNG: a row of tiles per list entry, each
    entry ``(N, C, H, W)``; shorter rows are padded with black."""
    from PIL import Image

    from sdelab.train.checkpoint import atomic_write

    c, h, w = rows[0].shape[1:]
    cols = max(len(r) for r in rows)
    grid = np.zeros((len(rows) * (h + pad) + pad, cols * (w + pad) + pad, c), dtype=np.uint8)
    for i, row in enumerate(rows):
        tiles = ((row.detach().cpu().float().clamp(-1, 1) + 1) * 127.5).round().byte()
        for j, tile in enumerate(tiles.permute(0, 2, 3, 1).numpy()):
            y0, x0 = pad + i * (h + pad), pad + j * (w + pad)
            grid[y0 : y0 + h, x0 : x0 + w] = tile
    img = Image.fromarray(grid[..., 0] if c == 1 else grid)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, buf.getvalue())
    return path


def guided_sample_run(
    run_dir: str | Path,
    classifier_dir: str | Path | None,
    label: int,
    *,
    scale: float = 1.0,
    n: int = 1000,
    sampler: str = "euler_maruyama",
    steps: int = 1000,
    seed: int = 0,
    which: str = "ema",
    options: dict[str, Any] | None = None,
    batch_size: int | None = None,
) -> SampleResult:
    """Class-conditional samples of a trained run, drawn by :func:`sdelab.report.sample_run`
    (same chunking, device and processes).

    With ``classifier_dir`` (from :func:`train_classifier`): classifier guidance of the run's
    (unconditional) score, s + scale · ∇ log p_t(label | x). Without it the run must be
    class-conditional (``model.num_classes``): classifier-free guidance
    s(x, t, ∅) + scale · (s(x, t, label) − s(x, t, ∅)) (:func:`cfg_score_fn`). ``scale``
    means the same in both: 0 unconditional, 1 conditional, > 1 guided.

    Raises ValueError for a class index out of range, a classifier trained for another
    schedule or data dimension, no classifier for an unconditional run, or a scale other than
    1 on a conditional run trained without label dropout.
    """
    from sdelab.report import sample_run

    if n < 1:
        raise ValueError(f"--n must be a positive number of samples, got {n}")
    net, meta = load_classifier(classifier_dir) if classifier_dir is not None else (None, {})
    if net is not None and not 0 <= label < meta["num_classes"]:
        raise ValueError(
            f"class index {label} out of range: the classifier has {meta['num_classes']} classes"
        )

    def guide(config, model, schedule):
        k = config.model.num_classes
        if net is None:
            if not k:
                raise ValueError(
                    f"run {run_dir} is unconditional (model.num_classes=0): pass --classifier "
                    "DIR from sdelab train-classifier for classifier guidance, or train with "
                    "model.num_classes=K for classifier-free guidance"
                )
            if not 0 <= label < k:
                raise ValueError(
                    f"class index {label} out of range: the run has {k} classes (0…{k - 1})"
                )
            if scale != 1 and config.model.label_dropout == 0:
                raise ValueError(
                    f"run {run_dir} was trained without label dropout (model.label_dropout=0), "
                    "so its null class is untrained: use --guidance 1 (the conditional score) "
                    "or retrain with model.label_dropout=0.1"
                )
            return cfg_score_fn(model, label, scale, num_classes=k)
        if meta["dim"] != config.model.dim:
            raise ValueError(
                f"classifier for data dimension {meta['dim']}, run of dimension {config.model.dim}"
            )
        if meta["sde"] != {"name": config.sde.name, "kwargs": config.sde.kwargs}:
            raise ValueError(f"classifier trained with sde {meta['sde']}, run uses {config.sde}")
        return guided_score_fn(model, net, label, scale, num_classes=meta["num_classes"])

    return sample_run(
        run_dir,
        n=n,
        sampler=sampler,
        steps=steps,
        seed=seed,
        which=which,
        options=options,
        batch_size=batch_size,
        guide=guide,
    )
