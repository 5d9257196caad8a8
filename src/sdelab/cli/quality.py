"""``sdelab stats`` and ``sdelab evaluate``: reference statistics and sample quality offline."""

from __future__ import annotations

import argparse
import hashlib
import json
import re
from pathlib import Path

from sdelab.cli.common import (
    CLIError,
    add_weights_options,
    check_new_files,
    check_sampler_options,
    join_launched_group,
    nonneg_int,
    parse_options,
    positive_int,
)
from sdelab.data import DATASETS, make_dataset
from sdelab.quality import METRICS, check_metrics, save_stats
from sdelab.runs import (
    FEATURES,
    dataset_stats,
    make_extractor,
    open_run,
    run_quality,
    write_json,
)
from sdelab.samplers import SAMPLERS
from sdelab.train.build import make_run_dataset
from sdelab.train.checkpoint import list_checkpoints, load_checkpoint


def _stats(args: argparse.Namespace) -> int:
    """Mean and covariance of a data set's features, saved as .npz with keys mu and sigma (the
    layout of ScoreFlow's and pytorch-fid's reference statistics): the reference of a Fréchet
    distance."""
    out = Path(args.out)
    if out.exists():
        raise CLIError(f"{out} exists: choose another --out or delete it first")
    if out.suffix != ".npz":
        raise CLIError(f"--out must be an .npz file, got {out.name}")
    if args.n is not None and args.n < 2:
        raise CLIError(f"--n must be at least 2 (a covariance), got {args.n}")
    source = Path(args.dataset)
    if source.is_dir() and list_checkpoints(source):  # a run folder: its data set
        dataset = make_run_dataset(load_checkpoint(source).config)
    elif args.dataset in DATASETS:
        dataset = make_dataset(args.dataset, **parse_options(args.option))
    else:
        raise CLIError(
            f"{args.dataset!r} is neither a run folder nor a data set: choose a run folder or "
            f"one of {', '.join(DATASETS)}"
        )
    extractor = make_extractor(
        args.features,
        dataset,
        classifier=args.classifier,
        inception_weights=args.inception_weights,
    )
    stats = dataset_stats(dataset, extractor, split=args.split, n=args.n)
    save_stats(out, stats)
    print(
        f"{args.features} features of {stats.n} {dataset.name} {args.split} points "
        f"(dimension {len(stats.mu)}) -> {out}"
    )
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    """Sample-quality metrics of a trained run: draw samples, extract features, compare them
    with the run's data set (or a statistics file, for fd) and write RUN/quality_*.json, named
    by every option that changes the numbers (an existing one is kept unless --force)."""
    info = join_launched_group()
    if args.n < 2:
        raise CLIError(f"--n must be at least 2 samples, got {args.n}")
    if args.steps < 1:
        raise CLIError(f"--steps must be a positive number of steps, got {args.steps}")
    if args.kid_subset_size is not None and args.kid_subset_size < 2:
        raise CLIError(f"--kid-subset-size must be at least 2, got {args.kid_subset_size}")
    if args.n_reference is not None and args.n_reference < 2:
        raise CLIError(f"--n-reference must be at least 2 (a covariance), got {args.n_reference}")
    options = check_sampler_options(args.sampler, parse_options(args.option))
    metrics = check_metrics(args.metrics)
    run = open_run(args.run, args.weights, args.checkpoint)
    path = Path(args.run) / _quality_name(args, metrics, options, run.step)
    if info.is_main:
        check_new_files([path], args.force, "an earlier result with the same options is kept; "
                        "pass --force to replace it")  # fmt: skip
    ev = run_quality(
        run,
        metrics=metrics,
        features=args.features,
        classifier=args.classifier,
        inception_weights=args.inception_weights,
        n=args.n,
        sampler=args.sampler,
        steps=args.steps,
        seed=args.seed,
        options=options,
        batch_size=args.batch_size,
        stats=args.stats,
        reference_split=args.reference_split,
        n_reference=args.n_reference,
        kid_subset_size=args.kid_subset_size,
        resumable=True,
        resume=args.resume,
        progress=info.is_main,
    )
    if not info.is_main:
        return 0
    values = ev.result.as_dict()
    shown = ", ".join(
        f"{k} {v:.4g}" for k, v in values.items() if k not in ("n_samples", "n_reference")
    )
    print(f"{ev.n_samples} samples ({args.sampler}, NFE {ev.nfe}), {args.features}: {shown}")
    record = {
        **values,
        "metrics": ",".join(metrics),
        "features": args.features,
        "classifier": None if args.classifier is None else str(args.classifier),
        "inception_weights": (
            None if args.inception_weights is None else str(args.inception_weights)
        ),
        "sampler": args.sampler,
        "options": options,
        "steps": args.steps,
        "nfe": ev.nfe,
        "seed": args.seed,
        "batch_size": args.batch_size,
        "weights": args.weights,
        "checkpoint": run.step,
        "reference": str(args.stats) if args.stats else f"{args.reference_split} split",
        "n_reference": ev.n_reference,
        "kid_subset_size": args.kid_subset_size,
        "processes": info.world_size,
    }
    write_json(path, record)
    print(f"-> {path}")
    return 0


def _quality_name(args: argparse.Namespace, metrics, options: dict, step: int) -> str:
    """``quality_identity_ode_20_fd-sw2_n400_seed3_test_step60.json``: features, sampler,
    steps, metrics, n, seed, reference (split and size, or the statistics file) and the
    checkpoint's step; the weights, batch size and KID subset size when given; a digest of the
    paths and sampler options when any is given — so that no two evaluations that can differ
    share a file."""
    if args.stats:
        ref = "stats-" + re.sub(r"[^\w.-]", "", Path(args.stats).stem)
    else:
        ref = args.reference_split + ("" if args.n_reference is None else str(args.n_reference))
    parts = [args.features, args.sampler, str(args.steps), "-".join(metrics), f"n{args.n}",
             f"seed{args.seed}", ref, f"step{step}"]  # fmt: skip
    if args.weights != "ema":
        parts.append(args.weights)
    if args.batch_size is not None:
        parts.append(f"b{args.batch_size}")
    if args.kid_subset_size is not None:
        parts.append(f"kid{args.kid_subset_size}")
    rest = {
        "classifier": args.classifier and str(Path(args.classifier).resolve()),
        "inception_weights": args.inception_weights and str(Path(args.inception_weights).resolve()),
        "stats": args.stats and str(Path(args.stats).resolve()),
        "options": options,
    }
    if any(rest.values()):
        blob = json.dumps(rest, sort_keys=True).encode()
        parts.append(hashlib.sha256(blob).hexdigest()[:8])
    return "quality_" + "_".join(parts) + ".json"


def _add_features(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--features",
        default="classifier",
        choices=FEATURES,
        help="feature extractor: identity (vector data), classifier (a clean classifier "
        "from sdelab train-classifier --clean; default), inception (FID's Inception-v3)",
    )
    p.add_argument(
        "--classifier", metavar="DIR", help="classifier folder for --features classifier"
    )
    p.add_argument(
        "--inception-weights",
        metavar="PATH",
        help="pt_inception-2015-12-05 weights (.pth or .safetensors) for --features inception",
    )


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Add this module's subcommands to ``sub``."""
    p = sub.add_parser(
        "stats",
        help="reference feature statistics of a data set (.npz: mu, sigma)",
        description=_stats.__doc__,
        epilog="examples:\n"
        "  sdelab stats digits --split train --features classifier --classifier runs/clean "
        "--out digits_train.npz\n"
        "  sdelab stats runs/moons --features identity --out moons.npz\n"
        "  sdelab stats cifar10 --option root=/data/cifar-10-batches-py --features inception "
        "--inception-weights pt_inception-2015-12-05.pth --out cifar10_stats.npz",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("dataset", metavar="DATASET-or-RUN", help="data set name or run folder")
    p.add_argument("--split", default="train", choices=("train", "test"), help="(train)")
    p.add_argument("--n", type=int, default=None, help="points (default: the whole split)")
    p.add_argument(
        "--option", action="append", default=[], metavar="KEY=VALUE", help="data set option"
    )
    _add_features(p)
    p.add_argument("--out", required=True, metavar="FILE.npz", help="statistics file (new)")
    p.set_defaults(func=_stats)

    p = sub.add_parser(
        "evaluate",
        help="sample-quality metrics of a trained run (FD, KID, IS, precision/recall)",
        description=_evaluate.__doc__,
        epilog="examples:\n"
        "  sdelab evaluate runs/digits --metrics fd,kid,is,pr --features classifier "
        "--classifier runs/digits-clean --n 1000 --sampler dpm_solver --steps 20\n"
        "  sdelab evaluate runs/moons --metrics fd,energy,sw2 --features identity --n 5000\n"
        "  sdelab evaluate runs/c10 --metrics fd --features inception --inception-weights "
        "pt_inception-2015-12-05.pth --stats cifar10_stats.npz --n 50000 --batch-size 1000",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("run", metavar="RUN", help="run folder written by sdelab train")
    p.add_argument(
        "--metrics",
        default="fd",
        help=f"comma-separated, from {', '.join(METRICS)} (default fd)",
    )
    _add_features(p)
    p.add_argument(
        "--n",
        "--num-samples",
        dest="n",
        type=positive_int,
        default=1000,
        help="samples (default 1000)",
    )
    p.add_argument(
        "--sampler", default="euler_maruyama", choices=sorted(SAMPLERS), help="(euler_maruyama)"
    )
    p.add_argument("--steps", type=positive_int, default=1000, help="sampler steps (default 1000)")
    p.add_argument(
        "--option", action="append", default=[], metavar="KEY=VALUE", help="sampler option"
    )
    p.add_argument("--batch-size", type=positive_int, default=None, help="samples per chunk")
    p.add_argument("--stats", metavar="FILE.npz", help="reference statistics (fd only)")
    p.add_argument(
        "--reference-split",
        default="test",
        choices=("train", "test"),
        help="the run's data split to compare with (default test)",
    )
    p.add_argument("--n-reference", type=positive_int, default=None, help="reference points (all)")
    p.add_argument(
        "--kid-subset-size",
        type=int,
        default=None,
        help="rows per KID subset, at most the smaller set (default 1000, or that size)",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted evaluation (finished sample chunks in RUN/eval/quality)",
    )
    p.add_argument(
        "--force", action="store_true", help="replace an earlier result with the same options"
    )
    add_weights_options(p)
    p.add_argument("--seed", type=nonneg_int, default=0, help="random seed (default 0)")
    p.set_defaults(func=_evaluate)
