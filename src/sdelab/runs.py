"""Run-level operations behind the CLI: sample a trained run (also class-guided), measure its
likelihood or VDM bound, plot it.

Each takes a run folder written by ``sdelab train`` and loads it with
:func:`sdelab.train.build.load_run` (no pickles; the config comes from the checkpoint).

:func:`sample_run` and :func:`run_likelihood` scale out: launched by ``torchrun`` /
``accelerate launch`` (:mod:`sdelab.distributed`), each process takes every N-th chunk of
samples or batch of test points, solves it alone — no collective inside a sampler or ODE
solver, so unequal adaptive step counts cannot hang — and the results are gathered in order
afterwards. Chunk i is seeded by (seed, i) and solved with the same batch as in one process,
so the numbers do not depend on the number of processes.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from sdelab import distributed
from sdelab.controllable import cfg_score_fn, guided_score_fn
from sdelab.data import TOYS, Dataset, toy_log_prob
from sdelab.evaluation import EvaluationResult, evaluate_sharded
from sdelab.interop import DiffusersModel
from sdelab.losses import dsm_loss
from sdelab.nets.inception import load_fid_inception
from sdelab.parametrization import ScoreModel
from sdelab.plots import (
    plot_density,
    plot_loss,
    plot_sample_strip,
    plot_samples,
    plot_trajectories,
)
from sdelab.progress import Progress, TimeProgress
from sdelab.quality import (
    NEEDS_REFERENCE_FEATURES,
    ClassifierFeatures,
    FeatureExtractor,
    Features,
    FeatureStats,
    IdentityFeatures,
    InceptionFeatures,
    ProbabilisticExtractor,
    QualityResult,
    check_metrics,
    collect_features,
    evaluate_quality,
    feature_stats,
    load_stats,
)
from sdelab.samplers import SampleResult, sample
from sdelab.sde import Schedule, make_schedule
from sdelab.train.build import dequantization_options, load_run, make_run_dataset, resolve_device
from sdelab.train.classifier import load_classifier
from sdelab.train.config import RunConfig
from sdelab.train.dequantizer import check_dequantizer_fits, load_dequantizer
from sdelab.train.evalstore import EVAL_DIR, EvalStore
from sdelab.train.periodic import sample_paths
from sdelab.utils import atomic_write, check_int, chunk_generator, mean_se_float
from sdelab.vdm import check_vdm_schedule, vdm_vlb

__all__ = [
    "FEATURES",
    "METHODS",
    "LikelihoodRow",
    "LoadedRun",
    "LossEvaluation",
    "QualityEvaluation",
    "VLBEvaluation",
    "check_finite_samples",
    "data_split",
    "dataset_stats",
    "foreign_likelihood",
    "foreign_sample",
    "format_table",
    "guided_sample_run",
    "likelihood_table",
    "make_extractor",
    "open_run",
    "plot_run",
    "run_likelihood",
    "run_loss",
    "run_quality",
    "run_vlb",
    "sample_chunks",
    "sample_run",
    "save_samples",
    "split_levels",
    "write_json",
]

#: Likelihood estimators by CLI name.
METHODS = ("ode", "elbo", "scoreflow")
# Seed streams: sample chunk i > 0 and VLB batch i use derive_seed(seed, stream, i) (likelihood
# batches: sdelab.evaluation.LIKELIHOOD_STREAM = 21).
_SAMPLE_STREAM, _VLB_STREAM, _LOSS_STREAM = 20, 22, 23


def _eval_device(info: distributed.DistInfo) -> torch.device:
    """CPU with one process (as always); ``cuda:LOCAL_RANK`` for each of many when CUDA is
    available."""
    return resolve_device("auto" if info.enabled else "cpu", info)


@dataclass(frozen=True)
class LoadedRun:
    """A trained run read once (checkpoint loaded and hash-checked a single time): its folder,
    config, model (EMA or raw weights, on this process's evaluation device) and schedule."""

    run_dir: Path
    config: RunConfig
    model: ScoreModel
    schedule: Schedule

    @property
    def dataset(self) -> Dataset:
        """The run's dataset (its test set is fixed by the run's seed)."""
        return make_run_dataset(self.config)


def open_run(
    run: str | Path | LoadedRun, which: str = "ema", step: int | str | None = None
) -> LoadedRun:
    """Load a run folder for evaluation (a :class:`LoadedRun` passes through unchanged, so one
    load can serve several operations): checkpoint ``step`` (default the newest, ``"best"`` the
    one ``eval.select_best`` kept). Raises ValueError when the weights are not finite (a
    diverged run: nothing computed from it would be)."""
    if isinstance(run, LoadedRun):
        return run
    device = _eval_device(distributed.get_info())
    config, model, schedule = load_run(run, which, step=step, device=device)
    bad = sum(int((~torch.isfinite(p)).sum()) for p in model.parameters())
    if bad:
        raise ValueError(
            f"{bad} of the {which} weights are not finite in {run}: the run diverged; retrain "
            "with a lower optim.lr (or resume an earlier checkpoint with sdelab train --resume "
            "... optim.lr=...)"
        )
    return LoadedRun(Path(run), config, model, schedule)


def sample_run(
    run: str | Path | LoadedRun,
    *,
    n: int,
    sampler: str = "euler_maruyama",
    steps: int = 1000,
    seed: int = 0,
    which: str = "ema",
    options: dict[str, Any] | None = None,
    return_trajectory: bool = False,
    batch_size: int | None = None,
    guide: Callable[[Any, Any, Any], Callable] | None = None,
    progress: bool = False,
) -> SampleResult:
    """Draw ``n`` samples from a trained run with any sampler in ``sdelab.samplers.SAMPLERS``.

    ``guide(config, model, schedule) -> score_fn`` (optional) replaces the run's score by
    another built from it, e.g. classifier guidance (:func:`guided_sample_run`);
    it may raise ``ValueError`` when the run does not fit.

    The samples are drawn in chunks of ``batch_size`` (default: all ``n`` at once); chunk i
    is seeded by (seed, i) and, under a launcher, drawn by process i mod N — the result is the
    same for any number of processes. ``nfe`` is the largest NFE of any chunk (the work per
    sample). ``return_trajectory`` needs a single chunk in a single process. ``progress``:
    show how far the chunks are from T to t_min, with an ETA (:class:`~sdelab.progress.Progress`).

    Raises ValueError when a sample is not finite (NaN/inf: a diverged run or an unstable
    sampler), naming how many.
    """
    loaded = open_run(run, which)
    config, model, schedule = loaded.config, loaded.model, loaded.schedule
    shape = config.model.image_shape or [config.model.dim]  # U-Net runs sample (n, C, H, W)
    score_fn = model if guide is None else guide(config, model, schedule)
    return sample_chunks(
        score_fn,
        schedule,
        tuple(shape),
        n=n,
        sampler=sampler,
        steps=steps,
        seed=seed,
        options=options,
        batch_size=batch_size,
        device=next(iter(model.parameters())).device,
        return_trajectory=return_trajectory,
        progress=progress,
        source=f"the run {loaded.run_dir}",
    )


def sample_chunks(
    score_fn: Callable,
    schedule: Schedule,
    shape: tuple[int, ...],
    *,
    n: int,
    sampler: str,
    steps: int,
    seed: int = 0,
    options: dict[str, Any] | None = None,
    batch_size: int | None = None,
    device: torch.device | str = "cpu",
    return_trajectory: bool = False,
    progress: bool = False,
    source: str = "the model",
) -> SampleResult:
    """``n`` samples of shape ``shape`` each in chunks of ``batch_size`` (default all at once):
    chunk i seeded by (seed, i) and, under a launcher, drawn by process i mod N, gathered in
    order — the result does not depend on the number of processes. ``nfe`` is the largest of
    any chunk (the work per sample); ``return_trajectory`` needs one chunk and one process.
    ``progress`` shows how far the chunks are from T to t_min; ``source`` names the model in
    the error for samples that are not finite (:func:`check_finite_samples`)."""
    if n < 1:
        raise ValueError(f"--n must be a positive number of samples, got {n}")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"--batch-size must be positive, got {batch_size}")
    info = distributed.get_info()
    size = n if batch_size is None else min(batch_size, n)
    n_chunks = math.ceil(n / size)
    if return_trajectory and (n_chunks > 1 or info.enabled):
        raise ValueError("return_trajectory needs one chunk (batch_size >= n) and one process")
    mine = distributed.shard(n_chunks, info)
    total = sum(min(size, n - i * size) for i in mine)
    bar = Progress(total, "sample", "samples", enabled=progress and info.is_main)
    local = []
    with torch.no_grad(), bar:
        for k, i in enumerate(mine):
            b = min(size, n - i * size)
            res = sample(
                TimeProgress(score_fn, bar, k * size, b, schedule.T, schedule.t_min),
                schedule,
                (b, *shape),
                sampler=sampler,
                steps=steps,
                generator=chunk_generator(seed, _SAMPLE_STREAM, i, device),
                device=device,
                return_trajectory=return_trajectory,
                **(options or {}),
            )
            bar.set(k * size + b)
            if return_trajectory:
                check_finite_samples(res.samples, source)
                return res
            local.append((i, replace(res, samples=res.samples.cpu())))
    parts = distributed.gather_indexed(local, info)
    samples = torch.cat([p.samples for p in parts])
    check_finite_samples(samples, source)
    # every chunk ran the same grid and options; nfe is the largest (the work per sample)
    return replace(
        parts[0],
        samples=samples,
        nfe=max(p.nfe for p in parts),
        grid_times=None if parts[0].grid_times is None else parts[0].grid_times.cpu(),
    )


def check_finite_samples(samples: torch.Tensor, source: str) -> None:
    """Refuse samples that are not finite with a one-line ``ValueError`` naming how many."""
    bad = int((~torch.isfinite(samples.reshape(len(samples), -1))).any(dim=1).sum())
    if bad:
        raise ValueError(
            f"{bad} of {len(samples)} samples are not finite (NaN/inf), nothing was written: "
            f"{source} may have diverged (see its loss.png), or the sampler is unstable "
            "at these settings (try more --steps or another --sampler)"
        )


def run_likelihood(
    run: str | Path | LoadedRun,
    *,
    method: str = "ode",
    n: int = 2000,
    batch_size: int = 1000,
    exact_trace: bool = True,
    probes: int = 1,
    seed: int = 0,
    which: str = "ema",
    rtol: float = 1e-5,
    atol: float = 1e-5,
    dequantizer: str | Path | None = None,
    split: str = "test",
    repeats: int = 1,
    resumable: bool = False,
    resume: bool = False,
    progress: bool = True,
) -> EvaluationResult:
    """Test-set negative log-likelihood of a run, mean ± SE in nats (and bits/dim).

    ``split``: ``"test"`` (the run's fixed test set) or ``"train"`` (the training split of
    image data; fresh training draws seeded by ``seed`` for vector data). ``repeats``: K
    dequantization and probe draws per image (ScoreFlow's ``num_repeats``; image data only),
    averaged per image, their values in ``per_repeat``. ``resumable``: write every finished
    batch to ``RUN/eval/likelihood/`` (:class:`~sdelab.train.evalstore.EvalStore`) so that an
    interrupted evaluation continues with ``resume=True`` and gives exactly the values of an
    uninterrupted one; the folder is removed when the evaluation completes.

    ``dequantizer``: a folder from ``sdelab train-dequantizer`` for this run's data: image
    levels are then dequantized by the trained flow (variational dequantization, still a bound
    on −log₂ P(k)/D) instead of uniformly; a flow made for other data is refused.

    ``method="ode"``: exact log-likelihood through the probability-flow ODE, with the exact
    trace or ``probes`` Hutchinson probes. ``"elbo"``: sdeflow-light's bound. ``"scoreflow"``:
    the likelihood-weighted DSM bound. Uses the first ``n`` points of the run's fixed test set.

    Batch i of ``batch_size`` points gets its own generator seeded by (seed, i) (the ODE's
    adaptive steps and Hutchinson probes depend on the batch), and under a launcher it is
    solved by process i mod N alone; the per-example results are gathered in order at the end,
    so they equal the single-process ones for the same ``batch_size`` and ``seed``. Use at
    least as many batches as processes to keep every process busy.

    For image runs the test set is integer levels, uniformly dequantized by
    :func:`evaluate_likelihood` (``levels``, ``scale``, ``shift`` from the dataset), so bits/dim
    is a bound on the discrete data's −log₂ P(k) per dimension.

    Raises ValueError for a run whose ODE cannot be solved or whose NLL is not finite (a
    diverged run).
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}: choose one of {', '.join(METHODS)}")
    if batch_size < 1:
        raise ValueError(f"--batch-size must be positive, got {batch_size}")
    check_int("--repeats", repeats, 1)
    loaded = open_run(run, which)
    model, schedule = loaded.model, loaded.schedule
    device = next(iter(model.parameters())).device
    dataset = loaded.dataset
    data = split_levels(dataset, split, n, seed)
    # Image data: the test set is integer levels; evaluate_likelihood dequantizes them
    # uniformly, maps y = scale·(k + u)/L + shift and accounts for both in bits/dim.
    discrete = dequantization_options(dataset)
    if dequantizer is not None:
        if not discrete:
            raise ValueError(
                f"--dequantizer needs a run on image data with integer levels; {loaded.run_dir} "
                "has continuous data"
            )
        flow, record = load_dequantizer(dequantizer)
        check_dequantizer_fits(record, dataset, dequantizer)
        discrete.update(dequantization="variational", dequantizer=flow.to(device))
    if repeats > 1:
        if not discrete:
            raise ValueError(
                f"--repeats draws dequantization noise and probes per image: it needs a run on "
                f"image data; {loaded.run_dir} has continuous data"
            )
        discrete["n_repeats"] = repeats
    kwargs: dict[str, Any] = {}
    if method == "ode":
        kwargs = dict(rtol=rtol, atol=atol)
        if exact_trace:
            kwargs["divergence"] = "exact"
        else:
            kwargs.update(divergence="hutchinson", n_probes=probes)
    store = None
    if resumable or resume:
        options = dict(
            method=method,
            n=len(data),
            split=split,
            batch_size=batch_size,
            seed=seed,
            weights=which,
            repeats=repeats,
            dequantizer=None if dequantizer is None else str(Path(dequantizer).resolve()),
            **{k: v for k, v in {**discrete, **kwargs}.items() if k != "dequantizer"},
        )
        store = EvalStore(loaded.run_dir / EVAL_DIR / "likelihood", options, resume=resume)
        if distributed.get_info().is_main:
            store.open()
    try:
        res = evaluate_sharded(
            model,
            schedule,
            data,
            estimator=method,
            batch_size=batch_size,
            seed=seed,
            device=device,
            progress=progress,
            cached=None if store is None else store.get,
            on_batch=None if store is None else store.put,
            **discrete,
            **kwargs,
        )
    except AssertionError as e:  # torchdiffeq's "underflow in dt": the ODE cannot be solved
        raise ValueError(
            f"the probability-flow ODE of {loaded.run_dir} could not be solved ({e}): the model "
            "is not finite or too stiff there — the run may have diverged (see its loss.png); "
            "try a looser --rtol (e.g. 1e-3), or retrain with a lower optim.lr"
        ) from None
    if not math.isfinite(res.nll_mean):
        raise ValueError(
            f"the {method} NLL of {loaded.run_dir} is not finite: the run may have diverged "
            "(see its loss.png)"
        )
    if store is not None and distributed.get_info().is_main:
        shutil.rmtree(store.folder)  # complete: the result is the caller's to keep
    return res


def split_levels(dataset: Dataset, split: str, n: int, seed: int = 0) -> torch.Tensor:
    """The first ``n`` points of a data split as the likelihood takes them: integer levels for
    images (``test``: the fixed test split, ``train``: the training split), model-space points
    for vector data (``test``: the fixed test set, ``train``: ``n`` draws seeded by ``seed``)."""
    if split not in ("train", "test"):
        raise ValueError(f"unknown split {split!r}: choose train or test")
    if split == "test":
        return dataset.test_set(n)
    if dataset.num_levels is not None:
        return dataset.load("train").levels[:n].to(torch.int64)
    return dataset.sample(n, torch.Generator().manual_seed(seed))


def guided_sample_run(
    run: str | Path | LoadedRun,
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
    progress: bool = False,
) -> SampleResult:
    """Class-conditional samples of a trained run, drawn by :func:`sample_run`
    (same chunking, device and processes).

    With ``classifier_dir`` (from :func:`sdelab.train.classifier.train_classifier`): classifier
    guidance of the run's (unconditional) score, s + scale · ∇ log p_t(label | x). Without it
    the run must be class-conditional (``model.num_classes``): classifier-free guidance
    s(x, t, ∅) + scale · (s(x, t, label) − s(x, t, ∅))
    (:func:`sdelab.controllable.cfg_score_fn`). ``scale`` means the same in both: 0
    unconditional, 1 conditional, > 1 guided.

    Raises ValueError for a class index out of range, a classifier trained for another
    schedule or data dimension, no classifier for an unconditional run, or a scale other than
    1 on a conditional run trained without label dropout.
    """
    if n < 1:
        raise ValueError(f"--n must be a positive number of samples, got {n}")
    loaded = open_run(run, which)
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
                    f"run {loaded.run_dir} is unconditional (model.num_classes=0): pass "
                    "--classifier DIR from sdelab train-classifier for classifier guidance, or "
                    "train with model.num_classes=K for classifier-free guidance"
                )
            if not 0 <= label < k:
                raise ValueError(
                    f"class index {label} out of range: the run has {k} classes (0…{k - 1})"
                )
            if scale != 1 and config.model.label_dropout == 0:
                raise ValueError(
                    f"run {loaded.run_dir} was trained without label dropout "
                    "(model.label_dropout=0), so its null class is untrained: use --guidance 1 "
                    "(the conditional score) or retrain with model.label_dropout=0.1"
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
        loaded,
        n=n,
        sampler=sampler,
        steps=steps,
        seed=seed,
        which=which,
        options=options,
        batch_size=batch_size,
        guide=guide,
        progress=progress,
    )


@dataclass(frozen=True)
class VLBEvaluation:
    """The VDM bound of a test set: per-example terms ``(N,)`` in nats, and their means ± SE.

    ``terms`` maps ``diffusion``, ``prior``, ``reconstruction`` and ``total`` to per-example
    nats; ``steps`` is T (``None``: continuous time); ``levels`` the number of data levels
    (``None``: continuous data, Gaussian decoder); ``dims`` D (bits/dim = nats / (D log 2)).
    """

    terms: dict[str, torch.Tensor]
    dims: int
    steps: int | None
    levels: int | None

    def mean_se(self, name: str, unit: str = "nats") -> tuple[float, float]:
        """Mean and standard error of term ``name`` in ``nats`` or ``bpd``."""
        v = self.terms[name].double()
        if unit == "bpd":
            v = v / (self.dims * math.log(2))
        elif unit != "nats":
            raise ValueError(f"unknown unit {unit!r}: choose nats or bpd")
        return mean_se_float(v)

    def table(self) -> str:
        """A markdown table of the terms, nats and bits/dim (mean ± SE)."""
        steps = "continuous time" if self.steps is None else f"T = {self.steps} steps"
        data = f"{self.levels} levels" if self.levels else "continuous data"
        lines = [
            f"| VLB term ({steps}, {data}, n = {self.terms['total'].numel()}) | nats | bits/dim |",
            "|---|---|---|",
        ]
        for name in ("diffusion", "prior", "reconstruction", "total"):
            (a, sa), (b, sb) = self.mean_se(name), self.mean_se(name, "bpd")
            lines.append(f"| {name} | {a:.4f} ± {sa:.4f} | {b:.4f} ± {sb:.4f} |")
        return "\n".join(lines)


def run_vlb(
    run: str | Path | LoadedRun,
    *,
    steps: int | None = None,
    n: int = 2000,
    batch_size: int = 1000,
    seed: int = 0,
    which: str = "ema",
    progress: bool = True,
) -> VLBEvaluation:
    """The VDM variational bound (:func:`sdelab.vdm.vdm_vlb`) of a run's test set, per example.

    ``steps``: T for the T-step diffusion loss, ``None`` or 0 for continuous time (the loss VDM
    trains on, estimated with one antithetic time per example). Image runs are bounded on
    their integer levels with VDM's discretized decoder (a bound on −log₂ P(k), no
    dequantization; the data must be in [-1, 1]); continuous data (toys) with the Gaussian
    decoder N(x; z_0/α_0, σ_0²/α_0²), a bound on −log p(x). The schedule is the run's (learned
    parameters from the checkpoint, averaged with the EMA weights when ``which="ema"``); the
    run must use a VDM schedule (``vdm``, ``vdm-learned-ends``, ``vdm-learned``).

    Batch i gets a generator seeded by (seed, i) and, under a launcher, is evaluated by process
    i mod N; the results are gathered in order, the same for any number of processes.

    Raises:
        ValueError: a schedule that is not VP on [0, 1], image data outside [-1, 1], bad sizes.
    """
    if steps is not None and steps < 0:
        raise ValueError(f"--steps must be 0 (continuous time) or a positive T, got {steps}")
    if n < 1 or batch_size < 1:
        raise ValueError(f"--n and --batch-size must be positive, got {n}, {batch_size}")
    steps = steps or None
    info = distributed.get_info()
    loaded = open_run(run, which)
    config, model, schedule, run_dir = loaded.config, loaded.model, loaded.schedule, loaded.run_dir
    device = next(iter(model.parameters())).device
    try:
        check_vdm_schedule(schedule)
    except ValueError:
        raise ValueError(
            f"the VLB needs a VDM schedule on [0, 1], but {run_dir} uses sde.name="
            f"{config.sde.name}: use --method ode/elbo/scoreflow, or train with sde.name=vdm"
        ) from None
    dataset = loaded.dataset
    levels = dataset.num_levels
    if levels is not None and (dataset.scale, dataset.shift) != (2.0, -1.0):
        raise ValueError(
            f"the VLB's decoder puts levels at bin centres in [-1, 1], but {run_dir} trained on "
            f"data_range={dataset.data_range}: retrain with data.options.data_range=[-1,1]"
        )
    batches = dataset.test_set(n).split(batch_size)
    local = []
    mine = distributed.shard(len(batches), info)
    bar = tqdm(mine, disable=not (progress and info.is_main), desc="vlb", unit="batch")
    with torch.no_grad():
        for i in bar:
            vlb = vdm_vlb(
                model.eps,
                schedule,
                batches[i].to(device),
                levels=levels,
                n_steps=steps,
                low_discrepancy=True,
                generator=chunk_generator(seed, _VLB_STREAM, i, device),
            )
            terms = dict(
                diffusion=vlb.diffusion,
                prior=vlb.prior,
                reconstruction=vlb.reconstruction,
                total=vlb.total,
            )
            local.append((i, {k: v.cpu() for k, v in terms.items()}))
    parts = distributed.gather_indexed(local, info)
    cat = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    return VLBEvaluation(terms=cat, dims=batches[0][0].numel(), steps=steps, levels=levels)


@dataclass(frozen=True)
class LikelihoodRow:
    """One line of the likelihood table."""

    name: str
    nats: float
    se: float


def likelihood_table(
    run: str | Path | LoadedRun, *, n: int = 2000, progress: bool = True, seed: int = 0
) -> list[LikelihoodRow]:
    """Test NLL by the exact-trace ODE, the ELBO and the ScoreFlow bound, and the data's true
    entropy when known (the NLL a perfect model attains), each in nats."""
    loaded = open_run(run)
    rows = []
    for method, label in (
        ("ode", "NLL, probability-flow ODE (exact trace)"),
        ("elbo", "NLL bound, ELBO of the reverse SDE (sdeflow)"),
        ("scoreflow", "NLL bound, likelihood-weighted DSM (ScoreFlow)"),
    ):
        res = run_likelihood(loaded, method=method, n=n, progress=progress, seed=seed)
        rows.append(LikelihoodRow(label, res.nll_mean, res.nll_se))
    entropy = loaded.dataset.entropy()
    if entropy is not None:
        rows.append(LikelihoodRow("true entropy of the data (the floor)", entropy, 0.0))
    return rows


def format_table(rows: list[LikelihoodRow], n: int) -> str:
    """A markdown table of likelihood rows."""
    lines = [f"| test set, n = {n} | nats (mean ± SE) |", "|---|---|"]
    for r in rows:
        val = f"{r.nats:.4f}" if r.se == 0 else f"{r.nats:.4f} ± {r.se:.4f}"
        lines.append(f"| {r.name} | {val} |")
    return "\n".join(lines)


def plot_run(
    run_dir: str | Path,
    out_dir: str | Path | None = None,
    *,
    n: int = 5000,
    seed: int = 0,
    on_write: Callable[[Path], None] | None = None,
) -> list[Path]:
    """Write the standard plots of a 2-D run: loss curve, data vs samples (probability-flow ODE
    and reverse SDE), the model density from the ODE likelihood, and λ = 0 / λ = 1 trajectories;
    for any run with the grids of ``train.sample_every``, also ``samples_during_training.png``,
    a strip of them (the only plot of an image run). ``on_write(path)`` is called as each file
    is written (e.g. to print it; the sampling then shows its progress on stderr). Returns the
    written paths."""
    loaded = open_run(run_dir)
    run_dir, config, model, schedule = loaded.run_dir, loaded.config, loaded.model, loaded.schedule
    out = Path(out_dir) if out_dir is not None else run_dir / "plots"
    grids = sample_paths(run_dir)  # train.sample_every's grids, as one strip
    strip = [] if not grids else [plot_sample_strip(grids, out / "samples_during_training.png")]
    if config.model.dim != 2:
        if strip:
            return strip
        raise ValueError(f"plot draws 2-D runs; this run's data has {config.model.dim} dims")
    dataset = make_run_dataset(config)
    test = dataset.test_set(n)
    paths: list[Path] = []

    def wrote(path: Path) -> None:
        paths.append(path)
        if on_write is not None:
            on_write(path)

    if (run_dir / "metrics.jsonl").exists():
        wrote(plot_loss(run_dir / "metrics.jsonl", out / "loss.png"))
    for sampler, steps in (("ode", 200), ("euler_maruyama", 1000)):
        res = sample_run(
            loaded, n=n, sampler=sampler, steps=steps, seed=seed, progress=on_write is not None
        )
        wrote(
            plot_samples(
                test,
                res.samples,
                out / f"samples_{sampler}.png",
                titles=("test data", f"samples ({sampler.replace('_', '-')}, NFE {res.nfe})"),
            )
        )
    truth = None
    if config.data.name in TOYS:

        def truth(x, name=config.data.name):
            return toy_log_prob(name, x)

    wrote(plot_density(model, schedule, out / "density.png", data=test, true_log_prob=truth))
    wrote(plot_trajectories(model, schedule, out / "trajectories.png", seed=seed))
    return paths + strip


def save_samples(samples: torch.Tensor, path: str | Path) -> Path:
    """Save samples as ``.npy`` (or ``.csv`` by suffix); refuses to overwrite an existing file."""
    path = Path(path)
    if path.exists():
        raise FileExistsError(f"{path} exists: choose another --out or delete it first")
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = samples.detach().cpu().numpy()
    if path.suffix == ".csv":
        np.savetxt(path, arr.reshape(len(arr), -1), delimiter=",")
    elif path.suffix == ".npy":
        np.save(path, arr)
    else:
        raise ValueError(f"unknown sample file type {path.suffix!r}: use .npy or .csv")
    return path


def write_json(path: str | Path, record: dict[str, Any], *, overwrite: bool = True) -> Path:
    """Write a small JSON record (NaN-free) next to a run, atomically; ``overwrite=False``
    refuses an existing file (``FileExistsError``)."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists: pass --force to replace it")
    clean = {
        k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()
    }
    atomic_write(path, json.dumps(clean, indent=2) + "\n")
    return path


# ---- sample quality --------------------------------------------------------------------------
#: Feature extractors by CLI name (``--features``).
FEATURES = ("identity", "classifier", "inception")


def make_extractor(
    kind: str,
    dataset: Dataset,
    *,
    classifier: str | Path | None = None,
    inception_weights: str | Path | None = None,
) -> FeatureExtractor:
    """The feature extractor ``kind`` (:data:`FEATURES`) for samples of ``dataset``.

    ``identity``: the data themselves (2-D and tabular data). ``classifier``: the penultimate
    layer of a classifier folder from ``sdelab train-classifier`` (``--clean`` for a clean one),
    evaluated at its schedule's t_min. ``inception``: the FID-standard Inception-v3 from a
    weights file (images only; never downloaded).

    Raises:
        ValueError: an unknown kind, a missing ``classifier`` / ``inception_weights``, a
            classifier for another data dimension, Inception on vector data.
        FileNotFoundError: a weights file or classifier folder that does not exist.
    """
    if kind not in FEATURES:
        raise ValueError(f"unknown features {kind!r}: choose one of {', '.join(FEATURES)}")
    if kind == "identity":
        return IdentityFeatures()
    if kind == "classifier":
        if classifier is None:
            raise ValueError(
                "--features classifier needs --classifier DIR (from sdelab train-classifier "
                "--clean)"
            )
        net, meta = load_classifier(classifier)
        if meta["dim"] != dataset.dim:
            raise ValueError(
                f"classifier {classifier} is for data of dimension {meta['dim']}, the data have "
                f"{dataset.dim}: train one on this data set"
            )
        t_min = make_schedule(meta["sde"]["name"], **meta["sde"]["kwargs"]).t_min
        return ClassifierFeatures(net, t_min)
    if dataset.image_shape is None:
        raise ValueError(
            "--features inception needs image data; use --features identity or classifier"
        )
    if inception_weights is None:
        raise ValueError(
            "--features inception needs --inception-weights PATH (pt_inception-2015-12-05 "
            "weights, see README 'Sample quality')"
        )
    return InceptionFeatures(
        load_fid_inception(inception_weights),
        scale=dataset.scale,
        shift=dataset.shift,
        image_shape=dataset.image_shape,
    )


def data_split(dataset: Dataset, split: str, n: int | None, seed: int = 0) -> torch.Tensor:
    """Model-space points of a data set's ``split`` (``train`` or ``test``), the first ``n``.

    Images: the split's levels at their bin centres. Vector data: the fixed test set, or ``n``
    training draws seeded by ``seed`` (default n: 10,000).
    """
    if split not in ("train", "test"):
        raise ValueError(f"unknown split {split!r}: choose train or test")
    if dataset.num_levels is not None:
        levels = dataset.load(split).levels if split == "train" else dataset.test_set(10**9)
        levels = levels[:n] if n is not None else levels
        return dataset.to_model(levels.to(torch.int64))
    n = n or 10_000
    if split == "test":
        return dataset.test_set(n)
    return dataset.sample(n, torch.Generator().manual_seed(seed))


def _batches(x: torch.Tensor, size: int = 500):
    return x.split(size)


def dataset_stats(
    dataset: Dataset,
    extractor: FeatureExtractor,
    *,
    split: str = "train",
    n: int | None = None,
    progress: bool = True,
) -> FeatureStats:
    """Mean and covariance of the features of a data set split (``sdelab stats``)."""
    x = data_split(dataset, split, n)
    bar = tqdm(_batches(x), disable=not progress, desc=f"features ({split})", unit="batch")
    return feature_stats(extractor, bar)


@dataclass(frozen=True)
class QualityEvaluation:
    """What :func:`run_quality` returns: the metrics and how they were measured."""

    result: QualityResult
    nfe: int
    n_samples: int
    n_reference: int | None


def run_quality(
    run: str | Path | LoadedRun,
    *,
    metrics: str | tuple[str, ...] = "fd",
    features: str = "classifier",
    classifier: str | Path | None = None,
    inception_weights: str | Path | None = None,
    n: int = 1000,
    sampler: str = "euler_maruyama",
    steps: int = 1000,
    seed: int = 0,
    which: str = "ema",
    options: dict[str, Any] | None = None,
    batch_size: int | None = None,
    stats: str | Path | None = None,
    reference_split: str = "test",
    n_reference: int | None = None,
    kid_subset_size: int = 1000,
    progress: bool = True,
) -> QualityEvaluation:
    """Sample-quality metrics of a trained run (``sdelab evaluate``).

    Draws ``n`` samples with :func:`sample_run` (chunked and split over launched processes
    like ``sdelab sample``), extracts their features, and compares them with the reference:
    the features of the run's own data set split ``reference_split`` (all of it, or the first
    ``n_reference`` points), or — for ``fd`` alone — a statistics file ``stats`` (keys ``mu``,
    ``sigma``, from ``sdelab stats`` or ScoreFlow's ``*_stats.npz``). KID uses 100 subsets of
    ``kid_subset_size`` rows (at most the smaller set's size).

    Raises:
        ValueError: unknown metrics (checked before sampling), metrics needing reference
            features with only ``stats``, the extractor's errors (:func:`make_extractor`).
    """
    names = check_metrics(metrics)
    loaded = open_run(run, which)
    dataset = loaded.dataset
    extractor = make_extractor(
        features, dataset, classifier=classifier, inception_weights=inception_weights
    )
    need_probs = "is" in names
    if need_probs and not isinstance(extractor, ProbabilisticExtractor):
        raise ValueError(
            f"metric 'is' needs class probabilities: --features {features} has none; use "
            "--features classifier or inception, or drop 'is'"
        )
    reference: Features | FeatureStats
    if stats is not None:
        needs = [m for m in names if m in NEEDS_REFERENCE_FEATURES]
        if needs:
            raise ValueError(
                f"metrics {', '.join(needs)} need reference features, which a statistics file "
                "does not hold: drop --stats (the run's data set is used) or keep to fd"
            )
        reference = load_stats(stats)
    else:
        ref = data_split(dataset, reference_split, n_reference)
        bar = tqdm(_batches(ref), disable=not progress, desc="reference features", unit="batch")
        reference = collect_features(extractor, bar)
    res = sample_run(
        loaded,
        n=n,
        sampler=sampler,
        steps=steps,
        seed=seed,
        options=options,
        batch_size=batch_size,
    )
    samples = res.samples
    if not bool(torch.isfinite(samples).all()):
        raise ValueError(
            "the samples contain NaN or inf (a diverged run or sampler): check the run with "
            "sdelab sample first"
        )
    if dataset.image_shape is not None:
        samples = samples.reshape(len(samples), *dataset.image_shape)
    feats = collect_features(extractor, _batches(samples), probs=need_probs)
    result = evaluate_quality(
        feats,
        reference,
        names,
        kid_subset_size=kid_subset_size,
        generator=torch.Generator().manual_seed(seed),
    )
    n_ref = reference.n if isinstance(reference, FeatureStats) else len(reference.features)
    return QualityEvaluation(result=result, nfe=res.nfe, n_samples=len(samples), n_reference=n_ref)


# ---- models trained elsewhere ----------------------------------------------------------------
def foreign_likelihood(
    model: DiffusersModel,
    dataset: Dataset,
    *,
    method: str = "ode",
    n: int = 2000,
    batch_size: int = 500,
    exact_trace: bool = False,
    probes: int = 1,
    seed: int = 0,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    dequantization: str = "uniform",
    progress: bool = True,
) -> EvaluationResult:
    """Test-set bits/dim of a model trained elsewhere (:func:`sdelab.interop.load_diffusers`)
    on ``dataset``'s integer test levels, dequantized and mapped to the model's space [−1, 1].

    Batches are split over launched processes and seeded per batch exactly as for a run
    (:func:`sdelab.evaluation.evaluate_sharded`).

    Raises:
        ValueError: continuous data, an image shape other than the model's, or a data range
            other than the model's.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}: choose one of {', '.join(METHODS)}")
    if dataset.num_levels is None:
        raise ValueError(
            f"data set {dataset.name!r} is continuous: --diffusers models are image models, "
            "evaluate them on image data (e.g. --data cifar10)"
        )
    if tuple(dataset.image_shape) != tuple(model.image_shape):
        raise ValueError(
            f"the model takes images of shape {model.image_shape}, data set {dataset.name!r} has "
            f"{tuple(dataset.image_shape)}: pick matching data (--data-option size=/channels=)"
        )
    if (dataset.scale, dataset.shift) != (model.scale, model.shift):
        raise ValueError(
            f"the model works on [-1, 1] but data set {dataset.name!r} is mapped to "
            f"{dataset.data_range}: use --data-option data_range=[-1,1]"
        )
    kwargs: dict[str, Any] = {}
    if method == "ode":
        kwargs = dict(rtol=rtol, atol=atol)
        kwargs.update(
            divergence="exact" if exact_trace else "hutchinson",
            **({} if exact_trace else {"n_probes": probes}),
        )
    device = next(iter(model.unet.parameters())).device
    return evaluate_sharded(
        model.score_fn,
        model.schedule,
        dataset.test_set(n),
        estimator=method,
        batch_size=batch_size,
        seed=seed,
        device=device,
        progress=progress,
        levels=dataset.num_levels,
        scale=model.scale,
        shift=model.shift,
        dequantization=dequantization,
        **kwargs,
    )


def foreign_sample(
    model: DiffusersModel,
    *,
    n: int,
    sampler: str = "dpm_solver",
    steps: int = 20,
    seed: int = 0,
    options: dict[str, Any] | None = None,
    batch_size: int | None = None,
) -> SampleResult:
    """Samples ``(n, C, H, W)`` in [−1, 1] of a model trained elsewhere with any sdelab sampler,
    chunked, seeded per chunk and split over launched processes like :func:`sample_run`."""
    return sample_chunks(
        model.score_fn,
        model.schedule,
        tuple(model.image_shape),
        n=n,
        sampler=sampler,
        steps=steps,
        seed=seed,
        options=options,
        batch_size=batch_size,
        device=next(iter(model.unet.parameters())).device,
        source=f"the model {model.path}",
    )


@dataclass(frozen=True)
class LossEvaluation:
    """The denoising loss of a data split (``sdelab likelihood --method loss``): per-example
    values ``(N,)`` with the run's parametrization, weighting and time sampling."""

    loss: torch.Tensor
    mean: float
    se: float
    weighting: str
    time_sampling: str

    def __str__(self) -> str:
        return (
            f"{self.mean:.4f} ± {self.se:.4f} per example over {self.loss.numel()} examples "
            f"(weighting {self.weighting}, time sampling {self.time_sampling})"
        )


def run_loss(
    run: str | Path | LoadedRun,
    *,
    n: int = 2000,
    split: str = "test",
    batch_size: int = 1000,
    seed: int = 0,
    which: str = "ema",
) -> LossEvaluation:
    """The run's own training loss on a data split (ScoreFlow's "evaluate the loss function on
    the test set"): :func:`sdelab.losses.dsm_loss` with the run's parametrization, weighting
    and time sampling, one time and noise per example (image levels uniformly dequantized),
    batch i seeded by (seed, i). With likelihood weighting and importance sampling this is the
    diffusion term of the ScoreFlow bound (up to the data-independent offset)."""
    check_int("--batch-size", batch_size, 1)
    loaded = open_run(run, which)
    cfg = loaded.config
    if cfg.loss.objective != "dsm":
        raise ValueError(
            f"--method loss evaluates the denoising loss, but {loaded.run_dir} trains "
            f"loss.objective={cfg.loss.objective}: use --method vlb"
        )
    dataset = loaded.dataset
    data = split_levels(dataset, split, n, seed)
    device = next(iter(loaded.model.parameters())).device
    out = []
    with torch.no_grad():
        for i, batch in enumerate(data.split(batch_size)):
            gen = chunk_generator(seed, _LOSS_STREAM, i, device)
            x = batch.to(device)
            if dataset.num_levels is not None:  # levels: uniform dequantization
                u = torch.rand(x.shape, generator=gen, device=device)
                x = dataset.to_model(x, u)
            res = dsm_loss(
                loaded.model.net,
                loaded.schedule,
                x,
                parametrization=cfg.loss.parametrization,
                weighting=cfg.loss.weighting,
                time_sampling=cfg.loss.time_sampling,
                low_discrepancy=cfg.loss.low_discrepancy,
                generator=gen,
            )
            out.append(res.loss.cpu())
    loss = torch.cat(out)
    mean, se = mean_se_float(loss)
    return LossEvaluation(loss, mean, se, str(cfg.loss.weighting), cfg.loss.time_sampling)
