"""A run's likelihood: the test-set NLL and bounds (:func:`run_likelihood`, resumable), the
variational bound (:func:`run_vlb`: VDM's, or DDPM's discrete one), the denoising loss
(:func:`run_loss`) and the demo's table."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from sdelab import distributed
from sdelab.discrete import ddpm_vlb
from sdelab.likelihood.bpd import (
    ELBO,
    ODE,
    Dequantization,
    Estimator,
    EvaluationResult,
    Levels,
    ScoreFlow,
    evaluate_sharded,
)
from sdelab.likelihood.options import Exact, Hutchinson
from sdelab.losses import dsm_loss
from sdelab.progress import Progress
from sdelab.runs.core import LOSS_STREAM, VLB_STREAM, LoadedRun, open_run, split_levels
from sdelab.runs.foreign import ForeignRun
from sdelab.train.dequantizer import check_dequantizer_fits, load_dequantizer
from sdelab.train.evalstore import EVAL_DIR, EvalStore
from sdelab.utils import atomic_write, check_int, chunk_generator, mean_se_float
from sdelab.vdm import check_vdm_schedule, vdm_vlb

#: the dequantizations of image levels :func:`run_likelihood` takes by name (``"variational"``
#: comes with a trained dequantizer).
DEQUANTIZATION_KINDS: tuple[str, ...] = ("uniform", "truncated_normal")


def resolve_estimator(estimator: Estimator | None, shape: tuple[int, ...]) -> Estimator:
    """The estimator with its defaults filled in: ``None`` is ``ODE()``, and an ODE's unset
    tolerance, divergence and integrator come from
    :func:`~sdelab.likelihood.options.default_policy` for examples of ``shape`` (the one
    place defaults are resolved); the bounds are returned as they are.

    Raises:
        ValueError: an estimator that is not ODE, ELBO or ScoreFlow, or a bad option.
    """
    if estimator is None:
        estimator = ODE()
    if not isinstance(estimator, ODE | ELBO | ScoreFlow):
        raise ValueError(f"estimator must be ODE(), ELBO() or ScoreFlow(), got {estimator!r}")
    if isinstance(estimator, ELBO) and estimator.divergence is None:
        return replace(estimator, divergence=Hutchinson())  # elbo()'s own default, made explicit
    if not isinstance(estimator, ODE):
        return estimator
    policy = estimator.policy(shape)  # default_policy: the one place defaults are resolved
    return ODE(tol=policy.tol, divergence=policy.divergence, integrator=policy.integrator)


@dataclass(frozen=True)
class LikelihoodPlan:
    """One likelihood evaluation, resolved before any work: the source (a run or a model from
    elsewhere), the estimator with every default filled in, the data and its dequantization.
    :attr:`name` and :meth:`record` derive from the same objects that :meth:`evaluate` computes
    with, so a result's name, its record and its numbers cannot disagree.

    Build it with :func:`plan_likelihood`.
    """

    source: LoadedRun | ForeignRun
    estimator: Estimator
    data: Tensor
    levels: Levels | None
    dequantization: Dequantization | None
    batch_size: int
    split: str
    seed: int
    weights: str | None
    dequantizer: str | None

    @property
    def n(self) -> int:
        """Examples evaluated (the split may hold fewer than asked for)."""
        return len(self.data)

    @property
    def checkpoint(self) -> int | None:
        """The step of the checkpoint evaluated, resolved (``None``: a model from elsewhere)."""
        return self.source.step

    @property
    def name(self) -> str:
        """The result's file name: every option that changes a number, e.g.
        ``likelihood_ode_augmented_dopri5_exact_tol0.01_test_n2000_b1000_seed0_ema_step150.json``
        (images add the dequantization, e.g. ``uniform`` or ``variational_x4``)."""
        parts = [self.estimator.tag]
        if self.dequantization is not None:
            parts.append(self.dequantization.tag)
        parts += [self.split, f"n{self.n}", f"b{self.batch_size}", f"seed{self.seed}"]
        if self.weights is not None:
            parts.append(self.weights)
        if self.checkpoint is not None:
            parts.append(f"step{self.checkpoint}")
        return "likelihood_" + "_".join(parts) + ".json"

    def record(self) -> dict[str, Any]:
        """The options as a JSON-able dict (what a result file and a resumable store hold)."""
        return {
            "estimator": self.estimator.record(),
            "levels": None if self.levels is None else self.levels.record(),
            "dequantization": None if self.dequantization is None else self.dequantization.record(),
            "dequantizer": self.dequantizer,
            "split": self.split,
            "n": self.n,
            "batch_size": self.batch_size,
            "seed": self.seed,
            "weights": self.weights,
            "checkpoint": self.checkpoint,
        }

    def _store_options(self) -> dict[str, Any]:
        """:meth:`record`, one level flat (a resumed evaluation that differs names the option
        that differs, e.g. ``tol``)."""
        flat: dict[str, Any] = {}
        for key, value in self.record().items():
            if isinstance(value, dict):
                for k, v in value.items():
                    flat[k if k not in flat else f"{key}.{k}"] = v
            else:
                flat[key] = value
        return flat

    def store_folder(self) -> Path | None:
        """Where a resumable evaluation keeps its finished batches (``None``: nowhere)."""
        folder = self.source.run_dir
        return None if folder is None else Path(folder) / EVAL_DIR / "likelihood"

    def evaluate(
        self, *, resumable: bool = False, resume: bool = False, progress: bool = True
    ) -> EvaluationResult:
        """Compute it (see :func:`run_likelihood` for ``resumable``, ``resume``)."""
        store = None
        if resumable or resume:
            folder = self.store_folder()
            if folder is None:
                raise ValueError(
                    "this evaluation has no folder to keep finished batches in (--diffusers: "
                    "give --out FILE.json), so it cannot be resumed"
                )
            store = EvalStore(
                folder, self._store_options(), resume=resume, command="sdelab likelihood"
            )
            if distributed.get_info().is_main:
                store.open()
        if store is None:
            res = self._evaluate(None, progress)
        else:
            with store.guard():
                res = self._evaluate(store, progress)
                if distributed.get_info().is_main:
                    store.finish()  # complete: the result is the caller's to keep
        return res

    def _evaluate(self, store: EvalStore | None, progress: bool) -> EvaluationResult:
        where = getattr(self.source, "run_dir", None) or getattr(self.source, "path", "")
        device = next(iter(self.source.model.parameters())).device
        try:
            res = evaluate_sharded(
                self.source.model,
                self.source.schedule,
                self.data,
                estimator=self.estimator,
                levels=self.levels,
                dequantization=self.dequantization,
                batch_size=self.batch_size,
                seed=self.seed,
                device=device,
                progress=progress,
                cached=None if store is None else store.get,
                on_batch=None if store is None else store.put,
                group=distributed.get_info(),
            )
        except AssertionError as e:
            if "underflow in dt" not in str(e):
                raise  # a bug, not an unsolvable ODE
            raise ValueError(
                f"the probability-flow ODE of {where} could not be solved (torchdiffeq: {e}): "
                "the model is not finite or too stiff there — the run may have diverged (see "
                "its loss.png); try a looser --tol (e.g. 1e-2), or retrain with a lower optim.lr"
            ) from None
        if not math.isfinite(res.nll_mean):
            raise ValueError(
                f"the {self.estimator.tag} NLL of {where} is not finite: the run may have "
                "diverged (see its loss.png)"
            )
        return res


def plan_likelihood(
    run: str | Path | LoadedRun | ForeignRun,
    *,
    estimator: Estimator | None = None,
    n: int = 2000,
    batch_size: int = 1000,
    split: str = "test",
    seed: int = 0,
    which: str = "ema",
    checkpoint: int | str | None = None,
    dequantization: str = "uniform",
    dequantizer: str | Path | None = None,
    repeats: int = 1,
) -> LikelihoodPlan:
    """Resolve a likelihood evaluation without computing it (arguments as
    :func:`run_likelihood`): the run is opened, the data split read, the estimator's defaults
    filled in. ``plan.name`` is the result's file name, ``plan.record()`` its options."""
    check_int("--batch-size", batch_size, 1)
    check_int("--repeats", repeats, 1)
    if dequantization not in DEQUANTIZATION_KINDS:
        raise ValueError(
            f"unknown dequantization {dequantization!r}: choose one of "
            f"{', '.join(DEQUANTIZATION_KINDS)} (or give a trained dequantizer)"
        )
    source = run if isinstance(run, ForeignRun) else open_run(run, which, checkpoint)
    dataset = source.dataset
    data = split_levels(dataset, split, n, seed)
    label = source.run_dir if isinstance(source, LoadedRun) else source.path
    levels = deq = deq_path = None
    if dataset.num_levels is not None:  # integer levels: dequantized, accounted in bits/dim
        levels = Levels(dataset.num_levels, dataset.scale, dataset.shift)
        flow, kind = None, dequantization
        if dequantizer is not None:
            flow, deq_record = load_dequantizer(dequantizer)
            check_dequantizer_fits(deq_record, dataset, dequantizer)
            device = next(iter(source.model.parameters())).device
            flow, kind = flow.to(device), "variational"
            deq_path = str(Path(dequantizer).resolve())
        deq = Dequantization(kind=kind, dequantizer=flow, n_repeats=repeats)
    else:
        for given, flag in ((dequantizer is not None, "--dequantizer"), (repeats > 1, "--repeats")):
            if given:
                raise ValueError(
                    f"{flag} dequantizes integer levels: it needs a run on image data; {label} "
                    "has continuous data"
                )
        if dequantization != "uniform":
            raise ValueError(f"--dequantization needs image data; {label} has continuous data")
    return LikelihoodPlan(
        source=source,
        estimator=resolve_estimator(estimator, tuple(data.shape[1:])),
        data=data,
        levels=levels,
        dequantization=deq,
        batch_size=batch_size,
        split=split,
        seed=seed,
        weights=which if isinstance(source, LoadedRun) else None,
        dequantizer=deq_path,
    )


def run_likelihood(
    run: str | Path | LoadedRun | ForeignRun,
    *,
    estimator: Estimator | None = None,
    n: int = 2000,
    batch_size: int = 1000,
    split: str = "test",
    seed: int = 0,
    which: str = "ema",
    checkpoint: int | str | None = None,
    dequantization: str = "uniform",
    dequantizer: str | Path | None = None,
    repeats: int = 1,
    resumable: bool = False,
    resume: bool = False,
    progress: bool = True,
) -> EvaluationResult:
    """Negative log-likelihood of a data split under a trained run (or a model from elsewhere),
    per example and mean ± standard error, in nats and bits/dim.

    Args:
        run: a run folder, a :class:`~sdelab.runs.core.LoadedRun`, or a
            :class:`~sdelab.runs.foreign.ForeignRun` (a diffusers model with its data set).
        estimator: :class:`~sdelab.likelihood.bpd.ODE` (the exact likelihood through the
            probability-flow ODE; default), :class:`~sdelab.likelihood.bpd.ELBO` or
            :class:`~sdelab.likelihood.bpd.ScoreFlow` (bounds). An ODE's unset options are
            resolved by :func:`~sdelab.likelihood.options.default_policy` for the data's
            dimension (:func:`resolve_estimator`).
        n: the first ``n`` examples of the split.
        batch_size: examples per batch; batch i is evaluated with a generator seeded by
            (seed, i) and, under a launcher, by process i mod N alone, so the per-example values
            do not depend on the number of processes (they do on ``batch_size``).
        split: ``"test"`` (the run's fixed test set) or ``"train"`` (the training split of image
            data; fresh draws seeded by ``seed`` for vector data).
        seed: the evaluation's randomness (dequantization, probes, the randomized rule).
        which, checkpoint: the run's weights (``"ema"``/``"raw"``) and checkpoint (a step,
            ``"best"``, ``None``: the newest); ignored for a :class:`ForeignRun`.
        dequantization: image levels: ``"uniform"`` or ``"truncated_normal"``.
        dequantizer: a folder from ``sdelab train-dequantizer`` made for this data: variational
            dequantization by the trained flow (still a bound on −log₂ P(k)/D).
        repeats: dequantization and probe draws per image, averaged (ScoreFlow's
            ``num_repeats``; image data only); their values are in ``per_repeat``.
        resumable: keep every finished batch in ``RUN/eval/likelihood/`` so that an interrupted
            evaluation continues with ``resume=True`` and gives exactly the values of an
            uninterrupted one; the folder is removed when the evaluation completes.
        resume: continue such an evaluation (its options must be the same).
        progress: report progress on stderr (main process).

    Returns:
        :class:`~sdelab.likelihood.bpd.EvaluationResult`: per-example nats and bits/dim, their
        means ± SE, the policy that ran and its error bar. Image levels are dequantized, so
        bits/dim bounds the discrete data's −log₂ P(k) per dimension.

    Raises:
        ValueError: a bad option; ``--dequantizer``/``--repeats`` on continuous data, a
            dequantizer made for other data; finished batches of an interrupted evaluation
            without ``resume`` (or with other options); an ODE that cannot be solved or an NLL
            that is not finite (a diverged run).
    """
    plan = plan_likelihood(
        run,
        estimator=estimator,
        n=n,
        batch_size=batch_size,
        split=split,
        seed=seed,
        which=which,
        checkpoint=checkpoint,
        dequantization=dequantization,
        dequantizer=dequantizer,
        repeats=repeats,
    )
    return plan.evaluate(resumable=resumable, resume=resume, progress=progress)


@dataclass(frozen=True)
class VLBEvaluation:
    """The variational bound of a test set: per-example terms ``(N,)`` in nats, and their
    means ± SE.

    ``terms`` maps ``diffusion``, ``prior``, ``reconstruction`` and ``total`` to per-example
    nats; ``steps`` is T (``None``: continuous time; for DDPM's bound the number of sampled
    terms, ``None``: all); ``levels`` the number of data levels (``None``: continuous data,
    Gaussian decoder); ``dims`` D (bits/dim = nats / (D log 2)); ``bound`` ``"vdm"`` or
    ``"ddpm"``.
    """

    terms: dict[str, torch.Tensor]
    dims: int
    steps: int | None
    levels: int | None
    bound: str = "vdm"

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
        if self.bound == "ddpm":
            steps = "DDPM's bound, " + (
                "all terms" if self.steps is None else f"{self.steps} terms"
            )
        else:
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
    run must use a VDM schedule (``vdm``, ``vdm-learned-ends``, ``vdm-learned``) — or be a
    discrete-time DDPM run (``loss.objective: ddpm``), whose bound is DDPM's L_vlb
    (:func:`sdelab.discrete.ddpm_vlb`: every one of its N − 1 terms, or ``steps`` = m terms
    drawn per example, unbiased; DDPM's discretised decoder).

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
    ddpm = config.loss.objective == "ddpm"
    try:
        if not ddpm:
            check_vdm_schedule(schedule)
    except ValueError:
        raise ValueError(
            f"the VLB needs a VDM schedule on [0, 1], but {run_dir} uses sde.name="
            f"{config.sde.name}: use --method ode/elbo/scoreflow, or train with sde.name=vdm "
            "(or loss.objective=ddpm for DDPM's discrete bound)"
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
    bar = Progress(len(mine), "vlb", "batches", enabled=progress and info.is_main)
    with torch.no_grad(), bar:  # a bar on a terminal, plain lines in a log
        for done, i in enumerate(mine):
            gen = chunk_generator(seed, VLB_STREAM, i, device)
            if ddpm:  # the discrete chain's own bound
                vlb = ddpm_vlb(
                    model.eps_at_step,
                    model.chain,
                    batches[i].to(device),
                    num_levels=levels,
                    n_terms=steps,
                    generator=gen,
                )
            else:
                vlb = vdm_vlb(
                    model.eps,
                    schedule,
                    batches[i].to(device),
                    num_levels=levels,
                    n_steps=steps,
                    low_discrepancy=True,
                    generator=gen,
                )
            terms = dict(
                diffusion=vlb.diffusion,
                prior=vlb.prior,
                reconstruction=vlb.reconstruction,
                total=vlb.total,
            )
            local.append((i, {k: v.cpu() for k, v in terms.items()}))
            bar.set(done + 1)
    parts = distributed.gather_indexed(local, info)
    cat = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    return VLBEvaluation(
        terms=cat,
        dims=batches[0][0].numel(),
        steps=steps,
        levels=levels,
        bound="ddpm" if ddpm else "vdm",
    )


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
    for estimator, label in (
        (ODE(divergence=Exact()), "NLL, probability-flow ODE (exact trace)"),
        (ELBO(), "NLL bound, ELBO of the reverse SDE (sdeflow)"),
        (ScoreFlow(), "NLL bound, likelihood-weighted DSM (ScoreFlow)"),
    ):
        res = run_likelihood(loaded, estimator=estimator, n=n, progress=progress, seed=seed)
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
            gen = chunk_generator(seed, LOSS_STREAM, i, device)
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


def write_per_example(path: str | Path, res: EvaluationResult, *, overwrite: bool = False) -> Path:
    """Per-example results beside a likelihood record, atomically, as an ``.npz``: ``index``
    (each example's position in the evaluated split, so two models' files pair up), ``nll``
    (nats) and ``bpd``, ``error`` (each example's integration error estimate in nats; NaN for
    the bounds), and ``probe_se`` and ``per_repeat`` ``(R, N)`` where the evaluation has them.
    ``overwrite=False`` refuses an existing file (``FileExistsError``)."""
    import io

    import numpy as np

    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists: pass --force to replace it")
    n = res.nll.numel()
    arrays = {
        "index": np.arange(n),
        "nll": res.nll.double().cpu().numpy(),
        "bpd": res.bpd.double().cpu().numpy(),
        "error": (np.full(n, np.nan) if res.error is None else res.error.double().cpu().numpy()),
    }
    if res.probe_se is not None:
        arrays["probe_se"] = res.probe_se.double().cpu().numpy()
    if res.per_repeat is not None:
        arrays["per_repeat"] = res.per_repeat.double().cpu().numpy()
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write(path, buf.getvalue())
    return path
