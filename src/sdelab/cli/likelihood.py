"""``sdelab likelihood``: test-set NLL, bounds and the VDM bound of a run."""

from __future__ import annotations

import argparse
import math
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
from sdelab.cli.interop import add_diffusers_options, diffusers_likelihood
from sdelab.data.image_data import IMAGE_DATA_NAMES
from sdelab.likelihood.forward import EXPONENTIAL_METHODS
from sdelab.likelihood.repeats import repeat_statistics
from sdelab.runs import (
    open_run,
    run_likelihood,
    run_loss,
    run_vlb,
    write_json,
)
from sdelab.runs.likelihood import (
    AUTO_SOLVER_STEPS,
    RUN_INTEGRATORS,
    RUN_SOLVERS,
    resolve_integrator,
    resolve_solver,
)
from sdelab.train.checkpoint import load_checkpoint


def _likelihood(args: argparse.Namespace) -> int:
    """Test-set negative log-likelihood of a trained run (nats and bits/dim, mean ± SE),
    recorded in RUN/likelihood_<options>.json (one file per set of options)."""
    if args.diffusers is not None:
        return diffusers_likelihood(args)
    if args.run is None:
        raise CLIError("give a RUN folder (or --diffusers DIR)")
    info = join_launched_group()
    if args.method == "vlb":
        return _vlb(args, info)
    if args.method == "loss":
        return _loss(args, info)
    if args.steps is not None:
        raise CLIError(
            f"--steps is the number of VLB steps: it needs --method vlb, not {args.method}"
        )
    if args.method != "ode" and (args.probes is not None or args.exact_trace):
        raise CLIError(f"--probes/--exact-trace are for --method ode, not {args.method}")
    config = load_checkpoint(args.run).config
    image = config.data.name in IMAGE_DATA_NAMES
    if args.probes is None and not args.exact_trace and image:  # images: Hutchinson, 1 probe
        args.probes = 1
    integrator = resolve_integrator(args.integrator, args.probes is None)
    atol = args.rtol if args.atol is None else args.atol
    if args.method == "ode":
        divergence = "exact" if args.probes is None else f"hutchinson x{args.probes}"
    else:
        divergence = None
    record: dict[str, Any] = {
        "method": args.method,
        "divergence": divergence,
        "probes": args.probes,
        "rtol": args.rtol if args.method == "ode" else None,
        "atol": atol if args.method == "ode" else None,
        "n": args.n,
        "seed": args.seed,
        "weights": args.weights,
        "checkpoint": args.checkpoint,
        "batch_size": args.batch_size,
        "dequantization": ("variational" if args.dequantizer else "uniform") if image else None,
        "dequantizer": None if args.dequantizer is None else str(Path(args.dequantizer)),
        "split": args.split,
        "repeats": args.repeats,
        "integrator": integrator if args.method == "ode" else None,
        "density": "log p_t_min" if args.method == "ode" else "bound",
    }
    record["nodes"] = args.nodes if record["integrator"] == "randomized" else None
    solver = resolve_solver(args.solver, integrator) if args.method == "ode" else None
    record["solver"] = solver
    record["solver_steps"] = args.solver_steps if solver in EXPONENTIAL_METHODS else None
    path = Path(args.run) / _result_name(record)
    if info.is_main:
        check_new_files([path], force=args.force, hint=_KEEP)
    res = run_likelihood(
        open_run(args.run, args.weights, args.checkpoint),
        method=args.method,
        n=args.n,
        batch_size=args.batch_size,
        exact_trace=args.probes is None,
        probes=args.probes or 1,
        seed=args.seed,
        which=args.weights,
        rtol=args.rtol,
        atol=atol,
        dequantizer=args.dequantizer,
        split=args.split,
        repeats=args.repeats,
        resumable=True,
        resume=args.resume,
        integrator=args.integrator,
        nodes=args.nodes,
        solver=args.solver,
        solver_steps=args.solver_steps,
    )
    if not info.is_main:
        return 0
    print(f"test NLL ({args.method}): {res}")
    record.update(
        nll_mean=res.nll_mean,
        nll_se=res.nll_se,
        bpd_mean=res.bpd_mean,
        bpd_se=res.bpd_se,
        dequantization=res.dequantization,
        nfe=res.nfe,
        processes=info.world_size,
    )
    if args.repeats > 1:  # ScoreFlow's repeats: SE over images and over repeats separately
        stats = repeat_statistics(res.per_repeat.T)
        to_bpd = 1.0 / (config.model.dim * math.log(2))
        record.update(
            nll_se_images=stats.se_images,
            nll_se_repeats=stats.se_repeats,
            bpd_se_images=stats.se_images * to_bpd,
            bpd_se_repeats=stats.se_repeats * to_bpd,
        )
    write_json(path, record, overwrite=args.force)
    print(f"recorded in {path}")
    return 0


_KEEP = "an earlier result with the same options is kept; pass --force to replace it"


def _result_name(record: dict[str, Any]) -> str:
    """The result file of a set of options: ``likelihood_ode_exact_rtol1e-05_n2000_seed0.json``
    (estimator, divergence, tolerances, n, seed; the weights and batch size when not the
    defaults), so results with other options never replace each other."""
    parts = [record["method"]]
    if record.get("divergence"):
        parts.append(record["divergence"].replace(" x", ""))
    if record.get("rtol") is not None:
        tol = f"rtol{record['rtol']:g}"
        if record["atol"] != record["rtol"]:
            tol += f"_atol{record['atol']:g}"
        parts.append(tol)
    if record.get("steps") is not None:
        parts.append(f"T{record['steps']}")
    parts += [f"n{record['n']}", f"seed{record['seed']}"]
    if record.get("weights", "ema") != "ema":
        parts.append(record["weights"])
    if record.get("batch_size", 1000) != 1000:
        parts.append(f"b{record['batch_size']}")
    if record.get("integrator") == "quadrature":
        parts.append("quadrature")
    if record.get("integrator") == "randomized":
        parts.append(f"randomized{record.get('nodes', 32)}")
    if record.get("solver_steps") is not None:  # a fixed grid: dpm3m64
        parts.append(f"{record['solver']}{record['solver_steps']}")
    elif record.get("solver") is not None:
        parts.append(record["solver"])
    if record.get("checkpoint") is not None:
        parts.append(f"ckpt{record['checkpoint']}")
    if record.get("split", "test") != "test":
        parts.append(record["split"])
    if record.get("repeats", 1) != 1:
        parts.append(f"x{record['repeats']}")
    if record.get("dequantizer"):
        parts.append("variational")
    return "likelihood_" + "_".join(parts) + ".json"


def _loss(args: argparse.Namespace, info) -> int:
    """``sdelab likelihood RUN --method loss``: the run's denoising loss on a split."""
    if args.probes is not None or args.exact_trace or args.steps is not None:
        raise CLIError("--probes/--exact-trace/--steps do not apply to --method loss")
    res = run_loss(
        args.run, n=args.n, split=args.split, batch_size=args.batch_size, seed=args.seed,
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
        "batch_size": args.batch_size,
        "loss_mean": res.mean,
        "loss_se": res.se,
        "weighting": res.weighting,
        "time_sampling": res.time_sampling,
    }
    path = Path(args.run) / f"loss_{args.split}_n{args.n}_seed{args.seed}.json"
    write_json(path, record, overwrite=True)
    print(f"recorded in {path}")
    return 0


def _vlb(args: argparse.Namespace, info) -> int:
    """``sdelab likelihood RUN --method vlb``: the VDM bound with its terms (nats, bits/dim)."""
    if args.probes is not None or args.exact_trace:
        raise CLIError("--probes/--exact-trace are for the ODE: --method vlb takes --steps T")
    record: dict[str, Any] = {
        "method": "vlb",
        "steps": args.steps or 0,
        "n": args.n,
        "seed": args.seed,
        "weights": args.weights,
        "batch_size": args.batch_size,
        "checkpoint": args.checkpoint,
    }
    path = Path(args.run) / _result_name(record)
    if info.is_main:
        check_new_files([path], force=args.force, hint=_KEEP)
    try:
        res = run_vlb(
            open_run(args.run, args.weights, args.checkpoint),
            steps=args.steps,
            n=args.n,
            batch_size=args.batch_size,
            seed=args.seed,
            which=args.weights,
        )
    except ValueError as e:
        raise CLIError(str(e)) from None
    if not info.is_main:
        return 0
    print(res.table())
    record.update(
        n=int(res.terms["total"].numel()),
        levels=res.levels,
        dequantization=None,  # the discretized decoder bounds the levels themselves
        processes=info.world_size,
    )
    for name in res.terms:
        for unit in ("nats", "bpd"):
            mean, se = res.mean_se(name, unit)
            record[f"{name}_{unit}_mean"], record[f"{name}_{unit}_se"] = mean, se
    write_json(path, record, overwrite=args.force)
    print(f"recorded in {path}")
    return 0


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Add this module's subcommands to ``sub``."""
    p = sub.add_parser(
        "likelihood",
        help="test-set NLL of a trained run",
        description=_likelihood.__doc__,
        epilog="examples:\n  sdelab likelihood runs/checker --method ode\n"
        "  sdelab likelihood runs/checker --method ode --probes 4\n"
        "  sdelab likelihood runs/checker --method elbo --n 5000\n"
        "  sdelab likelihood runs/digits --probes 4   # images: uniform dequantization, bits/dim\n"
        "  sdelab likelihood runs/vdm --method vlb --steps 1000   # VDM bound with its terms\n"
        "  sdelab likelihood runs/checker --rtol 1e-3 --force     # replace an earlier result\n"
        "  sdelab likelihood runs/digits --repeats 4 --split test  # ScoreFlow's num_repeats\n"
        "  sdelab likelihood runs/digits --resume       # continue an interrupted evaluation\n"
        "  sdelab likelihood runs/digits --dequantizer runs/digits-deq   # variational\n"
        "  sdelab likelihood runs/checker --method loss  # the run's denoising loss\n"
        "  sdelab likelihood --diffusers ddpm-cifar10 --data cifar10 "
        "--data-option root=/data/cifar-10-batches-py --probes 1 --out ddpm.json\n\n"
        "each result goes to RUN/likelihood_<method>_<divergence>_<tolerances>_n<N>_seed<S>"
        ".json\n(the options it was computed with are in the name and the file); an existing "
        "one is\nkept unless --force. finished test batches are kept in RUN/eval/likelihood "
        "until the\nevaluation completes: after a kill, --resume computes only the rest.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("run", metavar="RUN", nargs="?", help="run folder written by sdelab train")
    add_diffusers_options(p, data=True)
    p.add_argument("--out", metavar="FILE.json", help="--diffusers: write the result here")
    p.add_argument(
        "--method",
        default="ode",
        choices=("ode", "elbo", "scoreflow", "vlb", "loss"),
        help="ode (exact likelihood), elbo or scoreflow (bounds), vlb (the VDM bound: "
        "diffusion + prior + reconstruction; image levels with VDM's discretized decoder)",
    )
    p.add_argument(
        "--steps",
        type=nonneg_int,
        metavar="T",
        help="--method vlb only: T-step diffusion loss (default 0: continuous time)",
    )
    trace = p.add_mutually_exclusive_group()
    trace.add_argument(
        "--exact-trace",
        action="store_true",
        help="exact divergence (default for vector runs; D backward passes per step)",
    )
    trace.add_argument(
        "--probes",
        type=positive_int,
        metavar="K",
        help="Hutchinson divergence with K Rademacher probes instead (default for image runs, "
        "K = 1)",
    )
    p.add_argument(
        "--n",
        "--num-examples",  # under torchrun, whose own options swallow the abbreviation --n
        dest="n",
        type=positive_int,
        default=2000,
        help="test points (default 2000)",
    )
    p.add_argument(
        "--batch-size", type=positive_int, default=1000, help="batch size (default 1000)"
    )
    p.add_argument(
        "--rtol", type=positive_float, default=1e-5, help="ODE relative tolerance (default 1e-5)"
    )
    p.add_argument(
        "--atol", type=positive_float, default=None, help="ODE absolute tolerance (default rtol)"
    )
    p.add_argument(
        "--force", action="store_true", help="replace an existing result with the same options"
    )
    p.add_argument(
        "--dequantizer",
        metavar="DIR",
        help="image runs: a folder from sdelab train-dequantizer (variational dequantization "
        "instead of uniform)",
    )
    p.add_argument(
        "--integrator",
        default="auto",
        choices=RUN_INTEGRATORS,
        help="ODE: auto (default: randomized with --probes, augmented with --exact-trace), "
        "augmented (x and the divergence solved together), quadrature (per example) or "
        "randomized (unbiased shifted rule with fresh probes: test-set means)",
    )
    p.add_argument(
        "--nodes",
        type=positive_int,
        default=32,
        help="--integrator randomized: divergence nodes per image (even; default 32)",
    )
    p.add_argument(
        "--solver",
        default="auto",
        choices=RUN_SOLVERS,
        help="ODE solver: auto (default: dpm3m for --integrator randomized, else the "
        "integrator's adaptive default), dopri5/dopri8 (adaptive, --rtol/--atol) or "
        "dpm3m/dpm2m (DPM-Solver++ from the data to the prior on --solver-steps steps in "
        "log-SNR; randomized or quadrature only)",
    )
    p.add_argument(
        "--solver-steps",
        type=positive_int,
        default=AUTO_SOLVER_STEPS,
        help=f"--solver dpm3m/dpm2m: steps in log-SNR (default {AUTO_SOLVER_STEPS})",
    )
    p.add_argument(
        "--split", default="test", choices=("test", "train"), help="data split (default test)"
    )
    p.add_argument(
        "--repeats",
        type=positive_int,
        default=1,
        help="image runs: dequantization/probe draws per image (ScoreFlow's num_repeats; 1)",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted evaluation (RUN/eval/likelihood) with the same options",
    )
    add_weights_options(p)
    p.add_argument("--seed", type=nonneg_int, default=0, help="random seed (default 0)")
    p.set_defaults(func=_likelihood)
