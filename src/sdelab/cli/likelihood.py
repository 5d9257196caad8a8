"""``sdelab likelihood``: test-set NLL, bounds and the VDM bound of a run."""

from __future__ import annotations

import argparse
from pathlib import Path

from sdelab.cli.common import CLIError, join_launched_group
from sdelab.cli.interop import add_diffusers_options, diffusers_likelihood
from sdelab.data.image_data import IMAGE_DATA_NAMES
from sdelab.runs import (
    run_likelihood,
    run_vlb,
    write_json,
)
from sdelab.train.checkpoint import load_checkpoint


def _likelihood(args: argparse.Namespace) -> int:
    """Test-set negative log-likelihood of a trained run (nats and bits/dim, mean ± SE)."""
    if args.diffusers is not None:
        return diffusers_likelihood(args)
    if args.run is None:
        raise CLIError("give a RUN folder (or --diffusers DIR)")
    info = join_launched_group()
    if args.method == "vlb":
        return _vlb(args, info)
    if args.steps is not None:
        raise CLIError(
            f"--steps is the number of VLB steps: it needs --method vlb, not {args.method}"
        )
    if args.probes is not None and args.probes < 1:
        raise CLIError(f"--probes must be a positive number of probes, got {args.probes}")
    if args.probes is None and not args.exact_trace:  # images: Hutchinson (1 probe) by default
        if load_checkpoint(args.run).config.data.name in IMAGE_DATA_NAMES:
            args.probes = 1
    res = run_likelihood(
        args.run,
        method=args.method,
        n=args.n,
        batch_size=args.batch_size,
        exact_trace=args.probes is None,
        probes=args.probes or 1,
        seed=args.seed,
        which=args.weights,
        rtol=args.rtol,
        atol=args.rtol,
        dequantizer=args.dequantizer,
    )
    if not info.is_main:
        return 0
    print(f"test NLL ({args.method}): {res}")
    record = {
        "method": args.method,
        "n": args.n,
        "nll_mean": res.nll_mean,
        "nll_se": res.nll_se,
        "bpd_mean": res.bpd_mean,
        "bpd_se": res.bpd_se,
        "divergence": "exact" if args.probes is None else f"hutchinson x{args.probes}",
        "dequantization": res.dequantization,
        "dequantizer": None if args.dequantizer is None else str(Path(args.dequantizer)),
        "nfe": res.nfe,
        "seed": args.seed,
        "batch_size": args.batch_size,
        "processes": info.world_size,
    }
    suffix = "" if args.dequantizer is None else "_variational"
    write_json(Path(args.run) / f"likelihood_{args.method}{suffix}.json", record)
    return 0


def _vlb(args: argparse.Namespace, info) -> int:
    """``sdelab likelihood RUN --method vlb``: the VDM bound with its terms (nats, bits/dim)."""
    if args.probes is not None or args.exact_trace:
        raise CLIError("--probes/--exact-trace are for the ODE: --method vlb takes --steps T")
    try:
        res = run_vlb(
            args.run,
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
    record = {
        "method": "vlb",
        "steps": res.steps or 0,
        "n": int(res.terms["total"].numel()),
        "levels": res.levels,
        "seed": args.seed,
        "weights": args.weights,
        "batch_size": args.batch_size,
        "processes": info.world_size,
    }
    for name in res.terms:
        for unit in ("nats", "bpd"):
            mean, se = res.mean_se(name, unit)
            record[f"{name}_{unit}_mean"], record[f"{name}_{unit}_se"] = mean, se
    write_json(Path(args.run) / f"likelihood_vlb_T{res.steps or 0}.json", record)
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
        "  sdelab likelihood --diffusers ddpm-cifar10 --data cifar10 "
        "--data-option root=/data/cifar-10-batches-py --probes 1 --out ddpm.json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("run", metavar="RUN", nargs="?", help="run folder written by sdelab train")
    add_diffusers_options(p, data=True)
    p.add_argument("--out", metavar="FILE.json", help="--diffusers: write the result here")
    p.add_argument(
        "--method",
        default="ode",
        choices=("ode", "elbo", "scoreflow", "vlb"),
        help="ode (exact likelihood), elbo or scoreflow (bounds), vlb (the VDM bound: "
        "diffusion + prior + reconstruction; image levels with VDM's discretized decoder)",
    )
    p.add_argument(
        "--steps",
        type=int,
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
        type=int,
        metavar="K",
        help="Hutchinson divergence with K Rademacher probes instead (default for image runs, "
        "K = 1)",
    )
    p.add_argument(
        "--n",
        "--num-examples",  # under torchrun, whose own options swallow the abbreviation --n
        dest="n",
        type=int,
        default=2000,
        help="test points (default 2000)",
    )
    p.add_argument("--batch-size", type=int, default=1000, help="batch size (default 1000)")
    p.add_argument("--rtol", type=float, default=1e-5, help="ODE rtol = atol (default 1e-5)")
    p.add_argument(
        "--dequantizer",
        metavar="DIR",
        help="image runs: a folder from sdelab train-dequantizer (variational dequantization "
        "instead of uniform)",
    )
    p.add_argument("--weights", default="ema", choices=("ema", "raw"), help="EMA or raw weights")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.set_defaults(func=_likelihood)
