"""``sdelab likelihood --diffusers DIR`` and ``sdelab sample --diffusers DIR``: models trained
elsewhere (a diffusers ``save_pretrained`` folder on disk; nothing is downloaded)."""

from __future__ import annotations

import argparse
from pathlib import Path

from sdelab.cli.common import DEFAULT_STEPS, CLIError, join_launched_group, parse_options
from sdelab.data import make_dataset
from sdelab.data.png import save_level_grid
from sdelab.interop import DiffusersModel, load_diffusers
from sdelab.likelihood.dequantization import DEQUANTIZATIONS
from sdelab.runs import foreign_likelihood, foreign_sample, save_samples, write_json
from sdelab.train.build import resolve_device

__all__ = ["add_diffusers_options", "diffusers_likelihood", "diffusers_sample"]


def add_diffusers_options(p: argparse.ArgumentParser, *, data: bool) -> None:
    """The options of a model trained elsewhere (and, for ``likelihood``, its test data)."""
    p.add_argument(
        "--diffusers",
        metavar="DIR",
        help="a diffusers save_pretrained folder (pipeline with unet/ and scheduler/, or a UNet "
        "folder with scheduler_config.json) instead of RUN",
    )
    p.add_argument(
        "--snap-to-steps",
        action="store_true",
        help="--diffusers: feed the network integer steps (for time_embedding_type=learned)",
    )
    if data:
        p.add_argument("--data", metavar="NAME", help="--diffusers: the test data set (cifar10)")
        p.add_argument(
            "--data-option",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="--diffusers: data set option, e.g. root=/data/cifar-10-batches-py",
        )
        p.add_argument(
            "--dequantization",
            default="uniform",
            choices=DEQUANTIZATIONS,
            help="--diffusers: dequantization of the test levels (default uniform)",
        )


def _load(args: argparse.Namespace, info) -> DiffusersModel:
    if args.run is not None:
        raise CLIError("give either RUN or --diffusers DIR, not both")
    device = resolve_device("auto" if info.enabled else "cpu", info)
    try:
        return load_diffusers(args.diffusers, device=device, snap_to_steps=args.snap_to_steps)
    except ImportError as e:
        raise CLIError(f"{e}") from None


def diffusers_likelihood(args: argparse.Namespace) -> int:
    """Test-set bits/dim of a diffusers model on a data set's integer test levels."""
    info = join_launched_group()
    if args.data is None:
        raise CLIError("--diffusers needs --data NAME (the test data set, e.g. cifar10)")
    if args.method == "vlb":
        raise CLIError("--method vlb is for VDM runs; use ode, elbo or scoreflow with --diffusers")
    model = _load(args, info)
    dataset = make_dataset(args.data, **parse_options(args.data_option))
    dataset.load()
    res = foreign_likelihood(
        model,
        dataset,
        method=args.method,
        n=args.n,
        batch_size=args.batch_size,
        exact_trace=args.exact_trace,
        probes=args.probes or 1,
        seed=args.seed,
        rtol=args.rtol,
        atol=args.rtol,
        dequantization=args.dequantization,
    )
    if not info.is_main:
        return 0
    print(model.describe())
    print(f"test NLL ({args.method}): {res}")
    if args.out:
        record = {
            "model": str(Path(args.diffusers).resolve()),
            "data": args.data,
            "method": args.method,
            "n": res.nll.numel(),
            "nll_mean": res.nll_mean,
            "nll_se": res.nll_se,
            "bpd_mean": res.bpd_mean,
            "bpd_se": res.bpd_se,
            "divergence": "exact" if args.exact_trace else f"hutchinson x{args.probes or 1}",
            "dequantization": res.dequantization,
            "rtol": args.rtol,
            "nfe": res.nfe,
            "seed": args.seed,
        }
        print(f"-> {write_json(args.out, record)}")
    return 0


def diffusers_sample(args: argparse.Namespace) -> int:
    """Samples of a diffusers model with any sdelab sampler: FILE.npy (model space [−1, 1]) and
    a PNG grid of 8-bit pixels."""
    info = join_launched_group()
    out = Path(args.out)
    npy, png = out.with_suffix(".npy"), out.with_suffix(".png")
    for path in (npy, png):
        if path.exists():
            raise CLIError(f"{path} exists: choose another --out or delete it first")
    if args.class_ is not None or args.classifier is not None:
        raise CLIError("--class/--classifier are not available with --diffusers")
    model = _load(args, info)
    res = foreign_sample(
        model,
        n=args.n,
        sampler=args.sampler,
        steps=args.steps if args.steps is not None else DEFAULT_STEPS.get(args.sampler, 1000),
        seed=args.seed,
        options=parse_options(args.option),
        batch_size=args.batch_size,
    )
    if not info.is_main:
        return 0
    save_samples(res.samples, npy)
    levels = ((res.samples.clamp(-1, 1) + 1) * 127.5).round().long()
    save_level_grid(levels, 256, png)
    print(f"{args.n} samples ({args.sampler}, NFE {res.nfe}) of {model.describe()} -> {npy}, {png}")
    return 0
