"""``sdelab likelihood --diffusers DIR`` and ``sdelab sample --diffusers DIR``: models trained
elsewhere (a diffusers ``save_pretrained`` folder on disk; nothing is downloaded)."""

from __future__ import annotations

import argparse
from pathlib import Path

from sdelab.cli.common import DEFAULT_STEPS, CLIError, join_launched_group, parse_options
from sdelab.data import make_dataset
from sdelab.data.images import model_to_levels
from sdelab.data.png import save_level_grid
from sdelab.interop import DiffusersModel, load_diffusers
from sdelab.runs import ForeignRun, foreign_run, foreign_sample, save_samples
from sdelab.train.build import resolve_device

__all__ = ["add_diffusers_options", "diffusers_sample", "diffusers_source"]


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


def _load(args: argparse.Namespace, info) -> DiffusersModel:
    if getattr(args, "run", None) is not None:
        raise CLIError("give either RUN or --diffusers DIR, not both")
    device = resolve_device("auto" if info.enabled else "cpu", info)
    try:
        return load_diffusers(args.diffusers, device=device, snap_to_steps=args.snap_to_steps)
    except ImportError as e:
        raise CLIError(f"{e}") from None


def diffusers_source(args: argparse.Namespace, info) -> ForeignRun:
    """``--diffusers DIR --data NAME``: the model with the data set it is evaluated on, as a
    source for :func:`~sdelab.runs.likelihood.run_likelihood` (so every option of a run's
    evaluation applies). A resumable evaluation keeps its batches beside ``--out``."""
    if args.data is None:
        raise CLIError("--diffusers needs --data NAME (the test data set, e.g. cifar10)")
    model = _load(args, info)
    dataset = make_dataset(args.data, **parse_options(args.data_option))
    dataset.load()
    out = None if args.out is None else Path(args.out)
    if out is not None and out.suffix != ".json":
        raise CLIError(f"--out names the result's JSON file: use a .json name, not {out.name}")
    # the evaluation store of FILE.json: FILE's folder/eval/likelihood (as RUN/eval/likelihood)
    return foreign_run(model, dataset, run_dir=None if out is None else out.resolve().parent)


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
    save_level_grid(model_to_levels(res.samples, 256), 256, png)  # diffusers: [-1, 1]
    print(f"{args.n} samples ({args.sampler}, NFE {res.nfe}) of {model.describe()} -> {npy}, {png}")
    return 0
