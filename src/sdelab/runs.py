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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from sdelab import distributed
from sdelab.controllable import cfg_score_fn, guided_score_fn
from sdelab.data import TOYS, Dataset, toy_log_prob
from sdelab.evaluation import EvaluationResult, evaluate_sharded
from sdelab.parametrization import ScoreModel
from sdelab.plots import (
    plot_density,
    plot_loss,
    plot_sample_strip,
    plot_samples,
    plot_trajectories,
)
from sdelab.samplers import SampleResult, sample
from sdelab.sde import Schedule
from sdelab.train.build import dequantization_options, load_run, make_run_dataset, resolve_device
from sdelab.train.classifier import load_classifier
from sdelab.train.config import RunConfig
from sdelab.train.periodic import sample_paths
from sdelab.utils import chunk_generator, mean_se_float
from sdelab.vdm import check_vdm_schedule, vdm_vlb

__all__ = [
    "METHODS",
    "LikelihoodRow",
    "LoadedRun",
    "VLBEvaluation",
    "format_table",
    "guided_sample_run",
    "likelihood_table",
    "open_run",
    "plot_run",
    "run_likelihood",
    "run_vlb",
    "sample_run",
    "save_samples",
    "write_json",
]

#: Likelihood estimators by CLI name.
METHODS = ("ode", "elbo", "scoreflow")
# Seed streams: sample chunk i > 0 and VLB batch i use derive_seed(seed, stream, i) (likelihood
# batches: sdelab.evaluation.LIKELIHOOD_STREAM = 21).
_SAMPLE_STREAM, _VLB_STREAM = 20, 22


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


def open_run(run: str | Path | LoadedRun, which: str = "ema") -> LoadedRun:
    """Load a run folder for evaluation (a :class:`LoadedRun` passes through unchanged, so one
    load can serve several operations)."""
    if isinstance(run, LoadedRun):
        return run
    config, model, schedule = load_run(run, which, device=_eval_device(distributed.get_info()))
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
) -> SampleResult:
    """Draw ``n`` samples from a trained run with any sampler in ``sdelab.samplers.SAMPLERS``.

    ``guide(config, model, schedule) -> score_fn`` (optional) replaces the run's score by
    another built from it, e.g. classifier guidance (:func:`guided_sample_run`);
    it may raise ``ValueError`` when the run does not fit.

    The samples are drawn in chunks of ``batch_size`` (default: all ``n`` at once); chunk i
    is seeded by (seed, i) and, under a launcher, drawn by process i mod N — the result is the
    same for any number of processes. ``nfe`` is the largest NFE of any chunk (the work per
    sample). ``return_trajectory`` needs a single chunk in a single process.
    """
    if n < 1:
        raise ValueError(f"--n must be a positive number of samples, got {n}")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"--batch-size must be positive, got {batch_size}")
    info = distributed.get_info()
    size = n if batch_size is None else min(batch_size, n)
    n_chunks = math.ceil(n / size)
    if return_trajectory and (n_chunks > 1 or info.enabled):
        raise ValueError("return_trajectory needs one chunk (batch_size >= n) and one process")
    loaded = open_run(run, which)
    config, model, schedule = loaded.config, loaded.model, loaded.schedule
    device = next(iter(model.parameters())).device
    shape = config.model.image_shape or [config.model.dim]  # U-Net runs sample (n, C, H, W)
    score_fn = model if guide is None else guide(config, model, schedule)
    local = []
    with torch.no_grad():
        for i in distributed.shard(n_chunks, info):
            b = min(size, n - i * size)
            res = sample(
                score_fn,
                schedule,
                (b, *shape),
                sampler=sampler,
                steps=steps,
                generator=chunk_generator(seed, _SAMPLE_STREAM, i, device),
                device=device,
                return_trajectory=return_trajectory,
                **(options or {}),
            )
            if return_trajectory:
                return res
            local.append((i, (res.samples.cpu(), res.nfe)))
    parts = distributed.gather_indexed(local, info)
    return SampleResult(samples=torch.cat([s for s, _ in parts]), nfe=max(nfe for _, nfe in parts))


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
    progress: bool = True,
) -> EvaluationResult:
    """Test-set negative log-likelihood of a run, mean ± SE in nats (and bits/dim).

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
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}: choose one of {', '.join(METHODS)}")
    if batch_size < 1:
        raise ValueError(f"--batch-size must be positive, got {batch_size}")
    loaded = open_run(run, which)
    model, schedule = loaded.model, loaded.schedule
    device = next(iter(model.parameters())).device
    dataset = loaded.dataset
    data = dataset.test_set(n)
    # Image data: the test set is integer levels; evaluate_likelihood dequantizes them
    # uniformly, maps y = scale·(k + u)/L + shift and accounts for both in bits/dim.
    discrete = dequantization_options(dataset)
    kwargs: dict[str, Any] = {}
    if method == "ode":
        kwargs = dict(rtol=rtol, atol=atol)
        if exact_trace:
            kwargs["divergence"] = "exact"
        else:
            kwargs.update(divergence="hutchinson", n_probes=probes)
    return evaluate_sharded(
        model,
        schedule,
        data,
        estimator=method,
        batch_size=batch_size,
        seed=seed,
        device=device,
        progress=progress,
        **discrete,
        **kwargs,
    )


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
    run_dir: str | Path, out_dir: str | Path | None = None, *, n: int = 5000, seed: int = 0
) -> list[Path]:
    """Write the standard plots of a 2-D run: loss curve, data vs samples (probability-flow ODE
    and reverse SDE), the model density from the ODE likelihood, and λ = 0 / λ = 1 trajectories;
    for any run with the grids of ``train.sample_every``, also ``samples_during_training.png``,
    a strip of them (the only plot of an image run). Returns the written paths."""
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
    paths = []
    if (run_dir / "metrics.jsonl").exists():
        paths.append(plot_loss(run_dir / "metrics.jsonl", out / "loss.png"))
    for sampler, steps in (("ode", 200), ("euler_maruyama", 1000)):
        res = sample_run(loaded, n=n, sampler=sampler, steps=steps, seed=seed)
        paths.append(
            plot_samples(
                test,
                res.samples,
                out / f"samples_{sampler}.png",
                titles=("test data", f"samples ({sampler}, NFE {res.nfe})"),
            )
        )
    truth = None
    if config.data.name in TOYS:

        def truth(x, name=config.data.name):
            return toy_log_prob(name, x)

    paths.append(plot_density(model, schedule, out / "density.png", data=test, true_log_prob=truth))
    paths.append(plot_trajectories(model, schedule, out / "trajectories.png", seed=seed))
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


def write_json(path: str | Path, record: dict[str, Any]) -> Path:
    """Write a small JSON record (NaN-free) next to a run."""
    path = Path(path)
    clean = {
        k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()
    }
    path.write_text(json.dumps(clean, indent=2) + "\n", encoding="utf-8")
    return path
