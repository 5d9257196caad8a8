"""``sdelab likelihood``: the NLL and bounds of a run (or of a diffusers model), the variational
bound with its terms, and the denoising loss."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from sdelab.cli.common import (
    CLIError,
    add_weights_options,
    check_new_files,
    join_launched_group,
    nonneg_int,
    positive_float,
    positive_int,
)
from sdelab.cli.interop import add_diffusers_options, diffusers_source
from sdelab.likelihood.bpd import ELBO, ODE, Estimator, ScoreFlow
from sdelab.likelihood.forward import EXPONENTIAL_METHODS
from sdelab.likelihood.options import (
    DEFAULT_TOL,
    Augmented,
    Exact,
    Hutchinson,
    Quadrature,
    Randomized,
)
from sdelab.runs import open_run, plan_likelihood, run_loss, run_vlb, write_json
from sdelab.runs.likelihood import DEQUANTIZATION_KINDS, write_per_example
from sdelab.utils import ADAPTIVE_SOLVERS

#: ``--integrator`` choices (unset: the default policy decides).
INTEGRATORS = {"augmented": Augmented, "quadrature": Quadrature, "randomized": Randomized}
#: ``--solver`` choices: torchdiffeq's adaptive solvers (to ``--tol``) and the fixed-grid
#: DPM-Solver++ of the forward-only solve (``--solver-steps`` steps in log-SNR).
SOLVERS: tuple[str, ...] = (*ADAPTIVE_SOLVERS, *EXPONENTIAL_METHODS)
#: the smallest ``--tol``: below it the float64 state cannot resolve a log-density of
#: thousands of nats, and the step size underflows.
MIN_TOL: float = 1e-8
_ODE_FLAGS = ("tol", "integrator", "solver", "solver_steps", "nodes")


def estimator_from_args(args: argparse.Namespace) -> Estimator:
    """The one map from ``sdelab likelihood``'s flags to the estimator object (unset flags stay
    ``None``, so :func:`~sdelab.likelihood.options.default_policy` decides).

    ``--method ode`` → :class:`ODE` (``--tol``, ``--exact-trace``/``--probes``, ``--integrator``
    with ``--solver``, ``--solver-steps``, ``--nodes``); ``elbo`` → :class:`ELBO` (its
    divergence: ``--exact-trace``/``--probes``); ``scoreflow`` → :class:`ScoreFlow`.

    Raises:
        CLIError: an impossible combination, named with its fix.
    """
    given = [f"--{k.replace('_', '-')}" for k in _ODE_FLAGS if getattr(args, k) is not None]
    if args.method != "ode" and given:
        raise CLIError(f"{'/'.join(given)} set the ODE's solve: they need --method ode")
    divergence = None
    if args.exact_trace:
        divergence = Exact()
    elif args.probes is not None:
        divergence = Hutchinson(n_probes=args.probes)
    if args.method == "scoreflow" and divergence is not None:
        raise CLIError("--exact-trace/--probes: the ScoreFlow bound has no divergence")
    if args.method == "elbo":
        return ELBO(divergence=divergence)
    if args.method == "scoreflow":
        return ScoreFlow()
    if args.tol is not None and args.tol < MIN_TOL:
        raise CLIError(
            f"--tol {args.tol:g} nats is below what the float64 ODE state can resolve: use "
            f"--tol >= {MIN_TOL:g} (default {DEFAULT_TOL:g})"
        )
    kind = args.integrator
    if kind is None:
        for flag, value in (
            ("--solver", args.solver),
            ("--solver-steps", args.solver_steps),
            ("--nodes", args.nodes),
        ):
            if value is not None:
                raise CLIError(
                    f"{flag} sets an integrator's option: give --integrator too (augmented, "
                    "quadrature or randomized)"
                )
        return ODE(tol=args.tol, divergence=divergence)
    if args.nodes is not None and kind != "randomized":
        raise CLIError(f"--nodes is the randomized rule's: use --integrator randomized, not {kind}")
    options: dict[str, Any] = {}
    if args.solver is not None:
        options["method"] = args.solver
    if args.nodes is not None:
        options["nodes"] = args.nodes
    if args.solver_steps is not None:
        method = args.solver or INTEGRATORS[kind]().method
        if method not in EXPONENTIAL_METHODS:
            raise CLIError(
                f"--solver-steps sets the fixed grid of --solver {'/'.join(EXPONENTIAL_METHODS)};"
                f" {method} is adaptive (its steps follow --tol)"
            )
        options["steps"] = args.solver_steps
    try:
        integrator = INTEGRATORS[kind](**options)
    except ValueError as e:
        raise CLIError(f"--integrator {kind}: {e}") from None
    return ODE(tol=args.tol, divergence=divergence, integrator=integrator)


def _likelihood(args: argparse.Namespace) -> int:
    """Negative log-likelihood of a run's test (or training) data, per example and mean ± SE in
    nats and bits/dim, with the policy that computed it and its error bar; recorded in
    RUN/likelihood_<options>.json (one file per set of options)."""
    if args.rtol is not None or args.atol is not None:
        raise CLIError(
            "--rtol/--atol are gone: --tol sets the ODE's per-example target in nats (default "
            f"{DEFAULT_TOL:g}), e.g. --tol 1e-3"
        )
    if args.run is None and args.diffusers is None:
        raise CLIError("give a RUN folder (or --diffusers DIR)")
    if args.run is not None and args.diffusers is not None:
        raise CLIError("give either RUN or --diffusers DIR, not both")
    if args.diffusers is not None and (args.checkpoint is not None or args.weights != "ema"):
        raise CLIError("--checkpoint/--weights choose a run's weights: drop them with --diffusers")
    if args.diffusers is None and args.out is not None:
        raise CLIError("--out is for --diffusers: a run's result goes to RUN/likelihood_*.json")
    if args.method in ("vlb", "loss"):
        if args.diffusers is not None:
            raise CLIError(
                f"--method {args.method} needs a run trained by sdelab; use ode, elbo or "
                "scoreflow with --diffusers"
            )
        if args.probes is not None or args.exact_trace:
            raise CLIError(f"--probes/--exact-trace do not apply to --method {args.method}")
        given = [f"--{k.replace('_', '-')}" for k in _ODE_FLAGS if getattr(args, k) is not None]
        if given:
            raise CLIError(f"{'/'.join(given)} set the ODE's solve: they need --method ode")
        info = join_launched_group()
        return _vlb(args, info) if args.method == "vlb" else _loss(args, info)
    if args.steps is not None:
        raise CLIError(
            f"--steps is the number of VLB steps: it needs --method vlb, not {args.method}"
        )
    estimator = estimator_from_args(args)  # impossible combinations fail before any loading
    info = join_launched_group()
    if args.diffusers is not None:
        source = diffusers_source(args, info)
        path = None if args.out is None else Path(args.out)
    else:
        source = open_run(args.run, args.weights, args.checkpoint)
        path = None
    plan = plan_likelihood(
        source,
        estimator=estimator,
        n=args.n,
        batch_size=args.batch_size,
        split=args.split,
        seed=args.seed,
        which=args.weights,
        checkpoint=args.checkpoint,
        dequantization=args.dequantization,
        dequantizer=args.dequantizer,
        repeats=args.repeats,
    )
    if args.diffusers is None:
        path = Path(args.run) / plan.name
    arrays = None if path is None else path.with_suffix(".npz")  # per-example results
    if path is not None and info.is_main:  # --out names a diffusers result: options may differ
        hint = _KEEP if args.diffusers is None else _KEEP_OUT
        check_new_files([path, arrays], force=args.force, hint=hint)
    res = plan.evaluate(resumable=path is not None, resume=args.resume)
    if not info.is_main:
        return 0
    if args.diffusers is not None:
        print(source.source)
    print(f"{plan.split} NLL ({plan.estimator.tag}): {res}")  # with its error bar
    if path is None:
        return 0
    record = result_record(plan, res, processes=info.world_size)
    if args.diffusers is not None:
        record.update(model=str(source.path), data=args.data, source=source.source)
    record["per_example"] = arrays.name
    write_per_example(arrays, res, overwrite=args.force)
    write_json(path, record, overwrite=args.force)
    print(f"recorded in {path}")
    print(f"per-example nll, bpd, error in {arrays}")
    return 0


_KEEP = "an earlier result with the same options is kept; pass --force to replace it"
_KEEP_OUT = "an earlier result is kept; choose another --out, or pass --force to replace it"


def result_record(plan, res, *, processes: int = 1) -> dict[str, Any]:
    """The JSON record of a likelihood result: the options it was computed with (from the plan,
    the same objects that computed it) and the numbers with their error bar."""
    est = plan.estimator
    ode = isinstance(est, ODE)
    divergence = getattr(est, "divergence", None)
    deq = plan.dequantization
    record: dict[str, Any] = {
        "format": "sdelab-likelihood-2",
        "method": est.name,
        "tag": est.tag,
        "estimator": est.record(),
        "divergence": None if divergence is None else divergence.tag,
        "probes": divergence.n_probes if isinstance(divergence, Hutchinson) else None,
        "integrator": est.integrator.tag if ode else None,
        "tol": est.tol if ode else None,
        "density": "log p_t_min" if ode else "bound",
        **{k: v for k, v in plan.record().items() if k != "estimator"},
        "dequantization": "none" if deq is None else deq.kind,
        "repeats": 1 if deq is None else deq.n_repeats,
        "nll_mean": res.nll_mean,
        "nll_se": res.nll_se,
        "bpd_mean": res.bpd_mean,
        "bpd_se": res.bpd_se,
        "nfe": res.nfe,
        "processes": processes,
    }
    # the error bar (module docstring of sdelab.likelihood.bpd): the SE split by source and
    # a bound on the solver's bias, nats and bits/dim (NaN, written null: not measurable)
    for unit, split in (("nll", res.se_split()), ("bpd", res.se_split(bpd=True))):
        record.update({f"{unit}_se_{k}": v for k, v in split.items()})
    record.update(bias_bound_nats=res.bias_bound, bias_bound_bpd=res.bias_bound_bpd)
    if res.error is not None:
        record["error_max_nats"] = float(res.error.max())
    return record


def _loss(args: argparse.Namespace, info) -> int:
    """``sdelab likelihood RUN --method loss``: the run's denoising loss on a split."""
    loaded = open_run(args.run, args.weights, args.checkpoint)
    path = Path(args.run) / (
        f"loss_{args.split}_n{args.n}_b{args.batch_size}_seed{args.seed}_{args.weights}"
        f"_step{loaded.step}.json"
    )
    if info.is_main:
        check_new_files([path], force=args.force, hint=_KEEP)
    res = run_loss(
        loaded, n=args.n, split=args.split, batch_size=args.batch_size, seed=args.seed,
        which=args.weights,
    )  # fmt: skip
    if not info.is_main:
        return 0
    print(f"{args.split} loss: {res}")
    record = {
        "method": "loss",
        "n": res.loss.numel(),
        "split": args.split,
        "seed": args.seed,
        "weights": args.weights,
        "checkpoint": loaded.step,
        "batch_size": args.batch_size,
        "loss_mean": res.mean,
        "loss_se": res.se,
        "weighting": res.weighting,
        "time_sampling": res.time_sampling,
    }
    write_json(path, record, overwrite=args.force)
    print(f"recorded in {path}")
    return 0


def _vlb_tag(bound: str, steps: int | None) -> str:
    """``vlb_vdm_continuous``/``vlb_vdm_T1000`` (VDM's bound in continuous time or with T
    steps), ``vlb_ddpm_all``/``vlb_ddpm_m100`` (DDPM's bound: all terms, or m sampled)."""
    if bound == "ddpm":
        return "vlb_ddpm_" + ("all" if steps is None else f"m{steps}")
    return "vlb_vdm_" + ("continuous" if steps is None else f"T{steps}")


def _vlb(args: argparse.Namespace, info) -> int:
    """``sdelab likelihood RUN --method vlb``: the variational bound with its terms."""
    if args.split != "test":
        raise CLIError("--method vlb evaluates the test set: drop --split train")
    loaded = open_run(args.run, args.weights, args.checkpoint)
    steps = args.steps or None
    bound = "ddpm" if loaded.config.loss.objective == "ddpm" else "vdm"
    record: dict[str, Any] = {
        "method": "vlb",
        "bound": bound,
        "steps": steps,
        "n": args.n,
        "seed": args.seed,
        "weights": args.weights,
        "batch_size": args.batch_size,
        "checkpoint": loaded.step,
    }
    name = (
        f"likelihood_{_vlb_tag(bound, steps)}_{args.split}_n{args.n}_b{args.batch_size}"
        f"_seed{args.seed}_{args.weights}_step{loaded.step}.json"
    )
    path = Path(args.run) / name
    if info.is_main:
        check_new_files([path], force=args.force, hint=_KEEP)
    res = run_vlb(
        loaded,
        steps=steps,
        n=args.n,
        batch_size=args.batch_size,
        seed=args.seed,
        which=args.weights,
    )
    if not info.is_main:
        return 0
    print(res.table())
    record.update(
        n=int(res.terms["total"].numel()),
        levels=res.levels,
        dequantization=None,  # the discretized decoder bounds the levels themselves
        processes=info.world_size,
    )
    for term in res.terms:
        for unit in ("nats", "bpd"):
            mean, se = res.mean_se(term, unit)
            record[f"{term}_{unit}_mean"], record[f"{term}_{unit}_se"] = mean, se
    write_json(path, record, overwrite=args.force)
    print(f"recorded in {path}")
    return 0


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Add this module's subcommands to ``sub``."""
    p = sub.add_parser(
        "likelihood",
        help="NLL (bits/dim) of a trained run or a diffusers model, with its error bar",
        description=_likelihood.__doc__,
        epilog="examples:\n  sdelab likelihood runs/checker                # exact trace, per "
        "example\n"
        "  sdelab likelihood runs/checker --tol 1e-3 --force   # tighter; replace the result\n"
        "  sdelab likelihood runs/checker --probes 4\n"
        "  sdelab likelihood runs/checker --method elbo --n 5000\n"
        "  sdelab likelihood runs/digits                 # images: randomized rule, bits/dim\n"
        "  sdelab likelihood runs/digits --integrator randomized --nodes 16 --solver-steps 32\n"
        "  sdelab likelihood runs/digits --integrator augmented --probes 1\n"
        "  sdelab likelihood runs/vdm --method vlb --steps 1000   # the VLB with its terms\n"
        "  sdelab likelihood runs/digits --repeats 4        # ScoreFlow's num_repeats\n"
        "  sdelab likelihood runs/digits --resume           # continue an interrupted one\n"
        "  sdelab likelihood runs/digits --dequantizer runs/digits-deq   # variational\n"
        "  sdelab likelihood runs/checker --method loss     # the run's denoising loss\n"
        "  sdelab likelihood --diffusers ddpm-cifar10 --data cifar10 "
        "--data-option root=/data/cifar-10-batches-py --out ddpm.json\n\n"
        "unset options are chosen by one default policy (sdelab.likelihood.default_policy),\n"
        "printed with the result. each result goes to RUN/likelihood_<estimator>_<policy>_"
        "<split>_n<N>_b<B>_seed<S>_<weights>_step<STEP>.json\n(every option that changes a "
        "number is in the name and the file); an existing one is kept\nunless --force. "
        "finished batches are kept in RUN/eval/likelihood until the evaluation\ncompletes: "
        "after a kill, --resume computes only the rest. measurements behind the\ndefaults: "
        "docs/benchmarks/likelihood.md.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("run", metavar="RUN", nargs="?", help="run folder written by sdelab train")
    add_diffusers_options(p, data=True)
    p.add_argument(
        "--out",
        metavar="FILE.json",
        help="--diffusers: record the result here (kept unless --force; resumable)",
    )
    p.add_argument(
        "--method",
        default="ode",
        choices=("ode", "elbo", "scoreflow", "vlb", "loss"),
        help="the estimator: ode (exact likelihood through the probability-flow ODE), elbo or "
        "scoreflow (bounds), vlb (the variational bound with its diffusion, prior and "
        "reconstruction terms: VDM's for VDM runs, DDPM's discrete L_vlb for DDPM runs; "
        "image levels with a discretized decoder), loss (the run's denoising loss)",
    )
    p.add_argument(
        "--steps",
        type=nonneg_int,
        metavar="T",
        help="--method vlb only: T-step VDM bound (0: continuous time), or m sampled terms of "
        "DDPM's bound (0: all terms); default 0",
    )
    trace = p.add_mutually_exclusive_group()
    trace.add_argument(
        "--exact-trace",
        action="store_true",
        help="exact divergence (D products per evaluation; the default up to D = 64)",
    )
    trace.add_argument(
        "--probes",
        type=positive_int,
        metavar="K",
        help="Hutchinson divergence with K Rademacher probes (default above D = 64: K = 1)",
    )
    p.add_argument(
        "--tol",
        type=positive_float,
        metavar="NATS",
        help=f"ODE: per-example target in nats (default {DEFAULT_TOL:g}; unused by a fixed grid)",
    )
    p.add_argument(
        "--integrator",
        choices=tuple(INTEGRATORS),
        help="ODE: augmented (x and the divergence together, per example), quadrature "
        "(forward solve + nested quadrature, per example) or randomized (shifted rule with "
        "fresh probes: unbiased data-set means); default: the policy's (augmented up to "
        "D = 64, randomized above)",
    )
    p.add_argument(
        "--solver",
        choices=SOLVERS,
        help="with --integrator: its ODE solver (adaptive to --tol, or dpm3m/dpm2m on "
        "--solver-steps steps in log-SNR for quadrature/randomized)",
    )
    p.add_argument(
        "--solver-steps",
        type=positive_int,
        metavar="N",
        help="with --solver dpm3m/dpm2m (randomized's default): steps in log-SNR (default 64)",
    )
    p.add_argument(
        "--nodes",
        type=positive_int,
        metavar="N",
        help="with --integrator randomized: divergence nodes per example (even; default 32 "
        "below 256 values per example, 16 from 256 on)",
    )
    p.add_argument("--rtol", type=float, help=argparse.SUPPRESS)  # gone: refused, see --tol
    p.add_argument("--atol", type=float, help=argparse.SUPPRESS)
    p.add_argument(
        "--n",
        "--num-examples",  # under torchrun, whose own options swallow the abbreviation --n
        dest="n",
        type=positive_int,
        default=2000,
        help="examples (default 2000)",
    )
    p.add_argument(
        "--batch-size", type=positive_int, default=1000, help="batch size (default 1000)"
    )
    p.add_argument(
        "--force", action="store_true", help="replace an existing result with the same options"
    )
    p.add_argument(
        "--dequantization",
        default="uniform",
        choices=DEQUANTIZATION_KINDS,
        help="image levels: uniform (default) or truncated_normal dequantization",
    )
    p.add_argument(
        "--dequantizer",
        metavar="DIR",
        help="image levels: a folder from sdelab train-dequantizer (variational dequantization)",
    )
    p.add_argument(
        "--split", default="test", choices=("test", "train"), help="data split (default test)"
    )
    p.add_argument(
        "--repeats",
        type=positive_int,
        default=1,
        help="image levels: dequantization/probe draws per image (ScoreFlow's num_repeats; 1)",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted evaluation (RUN/eval/likelihood) with the same options",
    )
    add_weights_options(p)
    p.add_argument("--seed", type=nonneg_int, default=0, help="random seed (default 0)")
    p.set_defaults(func=_likelihood)
