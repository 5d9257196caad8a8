"""A run's likelihood: the test-set NLL and bounds (:func:`run_likelihood`, resumable), the VDM
bound (:func:`run_vlb`), the denoising loss (:func:`run_loss`) and the demo's table."""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from sdelab import distributed
from sdelab.discrete import ddpm_vlb
from sdelab.likelihood.bpd import EvaluationResult, evaluate_sharded
from sdelab.likelihood.forward import EXPONENTIAL_METHODS, EXPONENTIAL_STEPS
from sdelab.losses import dsm_loss
from sdelab.runs.core import LOSS_STREAM, METHODS, VLB_STREAM, LoadedRun, open_run, split_levels
from sdelab.train.build import dequantization_options
from sdelab.train.dequantizer import check_dequantizer_fits, load_dequantizer
from sdelab.train.evalstore import EVAL_DIR, EvalStore
from sdelab.utils import check_int, chunk_generator, mean_se_float
from sdelab.vdm import check_vdm_schedule, vdm_vlb

#: integrators of :func:`run_likelihood` (``"auto"``: :func:`resolve_integrator`).
RUN_INTEGRATORS: tuple[str, ...] = ("auto", "augmented", "quadrature", "randomized")
#: ODE solvers of :func:`run_likelihood` (``"auto"``: :func:`resolve_solver`): torchdiffeq's
#: adaptive ones with ``rtol``/``atol``, or a fixed-grid exponential integrator of the
#: forward-only solve with ``solver_steps`` steps in λ.
RUN_SOLVERS: tuple[str, ...] = ("auto", "dopri5", "dopri8", *EXPONENTIAL_METHODS)
#: ``solver="auto"`` with the randomized rule: DPM-Solver++(3M) on 64 steps in λ (issue 17:
#: solver bias ≤ 0.001 bpd on the digits and Fashion-MNIST U-Nets against dopri8 at 1e-7,
#: 1.5–2.2× less CPU than dopri5 at 1e-5 in λ; benchmarks/RESULTS.md).
AUTO_SOLVER_STEPS: int = EXPONENTIAL_STEPS


def resolve_solver(solver: str, integrator: str) -> str | None:
    """``"auto"`` → ``"dpm3m"`` for the randomized rule (a test-set mean: a fixed grid whose
    bias was measured), else ``None`` (the integrator's own adaptive default); any other name
    is returned as it is."""
    if solver != "auto":
        return solver
    return "dpm3m" if integrator == "randomized" else None


def resolve_integrator(integrator: str, exact_trace: bool) -> str:
    """``"auto"`` → ``"augmented"`` for the exact trace (per-example values), ``"randomized"``
    for Hutchinson probes (test-set means); any other name is returned as it is."""
    if integrator != "auto":
        return integrator
    return "augmented" if exact_trace else "randomized"


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
    atol: float | None = None,
    dequantizer: str | Path | None = None,
    split: str = "test",
    repeats: int = 1,
    resumable: bool = False,
    resume: bool = False,
    integrator: str = "auto",
    nodes: int = 32,
    solver: str = "auto",
    solver_steps: int = AUTO_SOLVER_STEPS,
    progress: bool = True,
) -> EvaluationResult:
    """Test-set negative log-likelihood of a run, mean ± SE in nats (and bits/dim).

    ``integrator``: the ODE's ``"augmented"`` solve (x and the divergence together),
    ``"quadrature"`` (forward solve + nested quadrature of the divergence, per example) or
    ``"randomized"`` (forward solve in log-SNR + a randomly shifted ``nodes``-point rule with
    fresh Hutchinson probes: unbiased, for test-set means; :mod:`sdelab.likelihood.quadrature`).
    ``"auto"`` (default): ``"randomized"`` with Hutchinson probes (a test-set mean; with the
    default solver, measured against the augmented solve at the same estimator SE ≤ 0.005
    bpd and solver bias ≤ 0.001 bpd: 9.4× less CPU on the digits U-Net, 2.3× on
    Fashion-MNIST — 5.3× there with ``nodes=16, solver_steps=32``, since one pass over 1000
    images already reaches the SE; benchmarks/RESULTS.md, issue 17), ``"augmented"`` with the
    exact trace (per-example values). ``atol``: ``None`` → ``rtol``.
    ``solver``: the ODE solver: ``"dopri5"``/``"dopri8"`` (adaptive, to ``rtol``/``atol``) or,
    for the quadrature rules, ``"dpm3m"``/``"dpm2m"`` (DPM-Solver++ run from the data to the
    prior on ``solver_steps`` equal steps in λ: no step control, so no tolerance).
    ``"auto"`` (default): ``"dpm3m"`` with the randomized rule (64 steps: its bias measured
    ≤ 0.001 bpd on the digits and Fashion-MNIST U-Nets), the integrator's adaptive default
    otherwise.
    ``split``: ``"test"`` (the run's fixed test set) or ``"train"``
    (the training split of image data; fresh training draws seeded by ``seed`` for vector
    data). ``repeats``: K dequantization and probe draws per image (ScoreFlow's
    ``num_repeats``; image data only),
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
    if integrator not in RUN_INTEGRATORS:
        raise ValueError(
            f"unknown integrator {integrator!r}: choose one of {', '.join(RUN_INTEGRATORS)}"
        )
    if method == "ode":
        integrator = resolve_integrator(integrator, exact_trace)
        atol = rtol if atol is None else atol
        kwargs = dict(rtol=rtol, atol=atol, integrator=integrator)
        chosen = resolve_solver(solver, integrator)
        if chosen is not None:
            if chosen not in RUN_SOLVERS:
                raise ValueError(
                    f"unknown --solver {chosen!r}: choose one of {', '.join(RUN_SOLVERS)}"
                )
            if chosen in EXPONENTIAL_METHODS:  # (log_likelihood refuses it with augmented)
                check_int("--solver-steps", solver_steps, 2)
                kwargs["options"] = {"steps": solver_steps}
            kwargs["method"] = chosen
        if integrator == "randomized":
            check_int("--nodes", nodes, 2)
            if nodes % 2:
                raise ValueError(f"--nodes must be even (the rule's two half-rules), got {nodes}")
            kwargs["nodes"] = nodes
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
            checkpoint=loaded.step,
            repeats=repeats,
            dequantizer=None if dequantizer is None else str(Path(dequantizer).resolve()),
            **{
                ("solver" if k == "method" else k): v
                for k, v in {**discrete, **kwargs}.items()
                if k != "dequantizer"
            },
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
    bar = tqdm(mine, disable=not (progress and info.is_main), desc="vlb", unit="batch")
    with torch.no_grad():
        for i in bar:
            gen = chunk_generator(seed, VLB_STREAM, i, device)
            if ddpm:  # the discrete chain's own bound
                vlb = ddpm_vlb(
                    model.eps_at_step,
                    model.chain,
                    batches[i].to(device),
                    levels=levels,
                    n_terms=steps,
                    generator=gen,
                )
            else:
                vlb = vdm_vlb(
                    model.eps,
                    schedule,
                    batches[i].to(device),
                    levels=levels,
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
