"""The ``sdelab`` command line. Each subcommand is a small function in ``COMMANDS``."""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import yaml

from sdelab import controllable as ctl
from sdelab import distributed
from sdelab.data.image_data import IMAGE_DATA_NAMES
from sdelab.data.images import model_to_levels
from sdelab.data.png import load_mask_png, load_png, save_level_grid, save_png_grid
from sdelab.plots import plot_samples
from sdelab.runs import (
    format_table,
    guided_sample_run,
    likelihood_table,
    plot_run,
    run_likelihood,
    run_vlb,
    sample_run,
    save_samples,
    write_json,
)
from sdelab.samplers import SAMPLERS
from sdelab.train.build import load_run, make_run_dataset, resolve_config
from sdelab.train.checkpoint import load_checkpoint
from sdelab.train.classifier import train_classifier
from sdelab.train.config import builtin_configs, load_config
from sdelab.train.hooks import likelihood_hook
from sdelab.train.loop import TrainingError, TrainingInterrupted, train


class CLIError(Exception):
    """An error shown to the user as one line, with exit code 2."""


def _demo(args: argparse.Namespace) -> int:
    """Train a 2-D toy model, then write samples, density and trajectory plots and print a
    table of test NLL (probability-flow ODE) and bounds next to the data's true entropy."""
    out = Path(args.out)
    run_dir = out / "run"
    if run_dir.exists() and any(run_dir.iterdir()):
        raise CLIError(f"{run_dir} is not empty: pass another --out or delete it first")
    overrides = [f"train.steps={args.steps}", "train.log_every=100", "train.ckpt_every=2500"]
    config = load_config(args.toy, overrides)
    print(f"1/3 training {args.toy} for {args.steps} steps -> {run_dir}")
    train(config, run_dir)
    print(f"2/3 plots -> {out / 'plots'}")
    for path in plot_run(run_dir, out / "plots", seed=args.seed):
        print(f"    {path}")
    print(f"3/3 test likelihood on {args.n} held-out points")
    table = format_table(likelihood_table(run_dir, n=args.n, seed=args.seed), args.n)
    (out / "likelihood.md").write_text(table + "\n", encoding="utf-8")
    print(table)
    return 0


def _parse_options(items: list[str]) -> dict[str, Any]:
    """``KEY=VALUE`` sampler options, values parsed as YAML scalars (``snr=0.16``)."""
    options: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise CLIError(f"bad option {item!r}: write KEY=VALUE, e.g. snr=0.16")
        options[key] = yaml.safe_load(value)
    return options


def _sample(args: argparse.Namespace) -> int:
    """Draw samples from a trained run with any sampler; save them as .npy/.csv (+ a PNG)."""
    info = _join_launched_group()
    out = Path(args.out)
    if out.exists():
        raise CLIError(f"{out} exists: choose another --out or delete it first")
    kwargs = dict(n=args.n, sampler=args.sampler, steps=args.steps, seed=args.seed)
    options = _parse_options(args.option)
    if args.class_ is not None or args.classifier is not None:
        if args.class_ is None:
            raise CLIError("--classifier needs --class K (the class to sample)")
        res = guided_sample_run(
            args.run,
            args.classifier,
            args.class_,
            scale=args.guidance,
            which=args.weights,
            options=options,
            batch_size=args.batch_size,
            **kwargs,
        )
    else:
        res = sample_run(
            args.run, which=args.weights, options=options, batch_size=args.batch_size, **kwargs
        )
    if not info.is_main:
        return 0
    dataset = make_run_dataset(load_checkpoint(args.run).config)
    if dataset.image_shape is not None:  # image run: .npy + PNG grid
        print(_save_image_samples(res, dataset, out, args))
        return 0
    save_samples(res.samples, out)
    msg = f"{args.n} samples ({args.sampler}, NFE {res.nfe}) -> {out}"
    if res.samples.shape[1] == 2:
        test = dataset.test_set(min(args.n, 5000))
        png = plot_samples(
            test,
            res.samples,
            out.with_suffix(".png"),
            titles=("test data", f"samples ({args.sampler})"),
        )
        msg += f", plot {png}"
    print(msg)
    return 0


def _save_image_samples(res, dataset, out: Path, args: argparse.Namespace) -> str:
    """Image runs: model-space samples (N, C, H, W) to ``out.npy`` and their pixel levels
    (``model_to_levels``) as a PNG grid to ``out.png``, whichever of the two ``--out`` names."""
    npy, png = out.with_suffix(".npy"), out.with_suffix(".png")
    for path in (npy, png):
        if path.exists():
            raise CLIError(f"{path} exists: choose another --out or delete it first")
    samples = res.samples.reshape(len(res.samples), *dataset.image_shape)
    save_samples(samples, npy)
    levels = model_to_levels(samples, dataset.num_levels, data_range=dataset.data_range)
    save_level_grid(levels, dataset.num_levels, png)
    return f"{args.n} samples ({args.sampler}, NFE {res.nfe}) -> {npy}, grid {png}"


def _conditional_run(args: argparse.Namespace, colorize: bool) -> int:
    """Shared body of ``inpaint`` and ``colorize``: load the run, build the observation, sample,
    save .npy/.csv (vector runs) or a PNG grid (image observations)."""
    out = Path(args.out)
    if out.exists():
        raise CLIError(f"{out} exists: choose another --out or delete it first")
    if args.n < 1:
        raise CLIError(f"--n must be a positive number of samples, got {args.n}")
    config, model, schedule = load_run(args.run, args.weights)
    dim = config.model.dim
    options = dict(sampler=args.sampler, steps=args.steps, generator=args.seed)
    options.update(_parse_options(args.option))
    if colorize:
        image = load_png(args.image, dim, channels=3)  # (3, H, W) in [-1, 1]
        shape = image.shape

        def score(x, t):  # the run's model sees flat vectors
            return model(x.reshape(len(x), -1), t).reshape(x.shape)

        batch = image.mean(0, keepdim=True).expand(args.n, 1, *shape[1:])
        res = ctl.colorize(score, schedule, batch, **options)
        rows = [image.mean(0, keepdim=True).expand(3, *shape[1:])[None], res.samples]
    elif args.image is not None:
        if args.mask is None or args.known:
            raise CLIError("image inpainting takes --image PNG and --mask PNG (not --known)")
        image = load_png(args.image, dim)
        mask = load_mask_png(args.mask, tuple(image.shape))
        y = image.reshape(1, -1).expand(args.n, -1)
        res = ctl.inpaint(model, schedule, y, mask.reshape(-1), **options)
        res.samples = res.samples.reshape(args.n, *image.shape)
        rows = [(image * mask)[None], (2 * mask - 1)[None], res.samples]
    else:
        if args.mask is not None or not args.known:
            raise CLIError("pass --known COORD=VALUE (vector runs) or --image and --mask PNGs")
        y, mask = parse_known(args.known, dim)
        res = ctl.inpaint(model, schedule, y.expand(args.n, dim), mask, **options)
        rows = None
    if rows is None or out.suffix in (".npy", ".csv"):
        save_samples(res.samples, out)
    else:
        save_png_grid(rows, out.with_suffix(".png"))
    print(f"{args.n} samples ({args.sampler}, NFE {res.nfe}) -> {out}")
    if rows is None and dim == 2:
        fixed = ", ".join(args.known)
        png = plot_samples(
            torch.stack([y]), res.samples, out.with_suffix(".png"), titles=("observation", fixed)
        )
        print(f"plot {png}")
    return 0


def parse_known(items: list[str], dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``["0=1.5", ...]`` (coordinate=value) to an observation ``(dim,)`` and mask ``(dim,)``."""
    y, mask = torch.zeros(dim), torch.zeros(dim)
    for item in items:
        key, sep, value = item.partition("=")
        try:
            i, v = int(key), float(value)
        except ValueError:
            raise ValueError(f"bad --known {item!r}: write COORD=VALUE, e.g. 0=1.5") from None
        if not sep or not 0 <= i < dim:
            raise ValueError(f"bad --known {item!r}: coordinate must be in 0..{dim - 1}")
        y[i], mask[i] = v, 1.0
    if not items or bool(mask.all()):
        raise ValueError(f"--known must fix between 1 and {dim - 1} of the {dim} coordinates")
    return y, mask


def _inpaint(args: argparse.Namespace) -> int:
    """Inpaint with a trained run (replacement method, Song et al. 2021): fix some coordinates
    of a vector run with --known, or the known pixels (--mask: nonzero = known) of a PNG for a
    run trained on flattened images; writes samples (.npy/.csv) or a PNG grid (observation,
    mask, samples)."""
    return _conditional_run(args, colorize=False)


def _colorize(args: argparse.Namespace) -> int:
    """Colorize the gray version of a PNG with a run trained on flattened RGB images (C·H·W =
    the run's dimension); writes a PNG grid (gray input, then samples)."""
    return _conditional_run(args, colorize=True)


def _train_classifier(args: argparse.Namespace) -> int:
    """Train a noise-conditional classifier p_t(y | x_t) for a run (or a config) with the same
    data and schedule, for `sdelab sample --class K --classifier DIR`: an MLP for vector data,
    a small conv net for images (--width = its base channels); --clean trains at t = t_min only
    (a classifier of clean data, to score samples)."""
    path = train_classifier(
        args.source,
        args.out,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        width=args.width,
        depth=args.depth,
        seed=args.seed,
        log_every=args.log_every,
        clean=args.clean,
    )

    acc = json.loads(path.read_text())["accuracy"]
    shown = ", ".join(f"t={k}: {v:.3f}" for k, v in acc.items())
    print(f"classifier -> {path.parent} (noised accuracy {shown})")
    return 0


def _add_conditional_parser(sub, name: str, func, epilog: str, image_only: bool):
    p = sub.add_parser(
        name,
        help=func.__doc__.split(":")[0].lower(),
        description=func.__doc__,
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("run", metavar="RUN", help="run folder written by sdelab train")
    p.add_argument("--image", metavar="PNG", required=image_only, help="observed image")
    if not image_only:
        p.add_argument("--mask", metavar="PNG", help="mask image, nonzero = known pixel")
        p.add_argument(
            "--known",
            action="append",
            default=[],
            metavar="COORD=VALUE",
            help="a fixed coordinate of a vector run, repeatable (e.g. --known 0=1.5)",
        )
    p.add_argument("--sampler", default="pc", choices=sorted(SAMPLERS), help="sampler (pc)")
    p.add_argument("--n", type=int, default=8, help="number of samples (default 8)")
    p.add_argument("--steps", type=int, default=1000, help="time steps (default 1000)")
    p.add_argument(
        "--option", action="append", default=[], metavar="KEY=VALUE", help="sampler option"
    )
    p.add_argument("--weights", default="ema", choices=("ema", "raw"), help="EMA or raw weights")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--out", required=True, metavar="FILE", help="output .png, .npy or .csv")
    p.set_defaults(func=func, known=[], mask=None)


def _likelihood(args: argparse.Namespace) -> int:
    """Test-set negative log-likelihood of a trained run (nats and bits/dim, mean ± SE)."""
    info = _join_launched_group()
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
        "nfe": res.nfe,
        "seed": args.seed,
        "batch_size": args.batch_size,
        "processes": info.world_size,
    }
    write_json(Path(args.run) / f"likelihood_{args.method}.json", record)
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


def _join_launched_group():
    """Join the process group when started by torchrun / accelerate launch (else rank 0 of 1)."""
    return distributed.init("cuda" if torch.cuda.is_available() else "cpu")


def _plot(args: argparse.Namespace) -> int:
    """Write a 2-D run's plots: loss, samples vs data, model density, λ=0/λ=1 trajectories."""
    for path in plot_run(args.run, args.out, seed=args.seed):
        print(path)
    return 0


def _train(args: argparse.Namespace) -> int:
    """Train a score model from a YAML config (a path or a built-in name) plus overrides."""
    config = load_config(args.config, args.overrides)
    dataset = make_run_dataset(config)
    if args.dry_run:
        print(resolve_config(config, dataset).to_yaml(), end="")
        return 0
    if not args.out:
        raise CLIError("--out DIR is required: the run folder to write")
    dataset.load()  # image data are read lazily: missing files fail here, not mid-run
    try:
        hook = likelihood_hook if config.train.eval_every else None
        result = train(config, args.out, resume=args.resume, eval_hook=hook)
    except TrainingInterrupted as e:
        print(f"sdelab train: {e}", file=sys.stderr)
        return 128 + e.signum
    except TrainingError as e:
        raise CLIError(str(e)) from None

    if not distributed.get_info().is_main:
        return 0
    loss = "n/a" if result.last_loss is None else f"{result.last_loss:.4g}"
    print(f"trained to step {result.step} (last loss {loss}); run folder {result.run_dir}")
    return 0


_TRAIN_EPILOG = """\
examples:
  sdelab train checkerboard --out runs/checker
  sdelab train toy/8gaussians optim.lr=3e-4 train.steps=5000 --out runs/8g
  sdelab train my.yaml loss.weighting=likelihood loss.time_sampling=importance --out runs/ml
  sdelab train checkerboard --out runs/checker --resume      # continue after a kill
  sdelab train sdeflow_swissroll --dry-run                     # print the resolved config

overrides are KEY=VALUE with dotted keys, values parsed as YAML scalars; sections:
  data, sde, model, loss, optim, train, eval (see README "Training on 2-D toys").
the run folder gets config.yaml/.json, metrics.jsonl, checkpoints/, loss.png.
SIGTERM/SIGINT save a checkpoint and exit with 128+signal; --resume continues exactly.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sdelab",
        description="Continuous-time score-based diffusion models with first-class likelihood.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser(
        "demo",
        help="train a 2-D toy, plot it, print its likelihood table",
        description=_demo.__doc__,
    )
    p.add_argument("--toy", default="checkerboard", help="built-in toy config (checkerboard)")
    p.add_argument("--steps", type=int, default=10000, help="training steps (default 10000)")
    p.add_argument("--n", type=int, default=2000, help="test points for the table (2000)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    p.set_defaults(func=_demo)

    p = sub.add_parser(
        "train",
        help="train a score model from a config",
        description=textwrap.fill(
            f"{_train.__doc__} Built-in configs: {', '.join(builtin_configs())}.", width=88
        ),
        epilog=_TRAIN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("config", metavar="CONFIG", help="YAML file or built-in config name")
    p.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. optim.lr=3e-4"
    )
    p.add_argument("--out", metavar="DIR", help="run folder (must be empty unless --resume)")
    p.add_argument(
        "--resume", action="store_true", help="continue the run in --out from its last checkpoint"
    )
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    p.set_defaults(func=_train)

    p = sub.add_parser(
        "sample",
        help="draw samples from a trained run",
        description=_sample.__doc__,
        epilog="examples:\n  sdelab sample runs/checker --sampler ode --n 5000 --out s.npy\n"
        "  sdelab sample runs/checker --sampler pc --option predictor=reverse_diffusion "
        "--option snr=0.16 --n 2000 --out pc.npy\n"
        "  sdelab sample runs/digits --sampler ode --n 64 --out grid.png   # + grid.npy\n"
        "  sdelab sample runs/moons-cond --class 1 --guidance 2 --out m1.npy   # CFG\n"
        "  sdelab sample runs/8g --class 3 --classifier runs/8g-clf --out c3.npy",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("run", metavar="RUN", help="run folder written by sdelab train")
    p.add_argument(
        "--sampler",
        default="euler_maruyama",
        choices=sorted(SAMPLERS),
        help="sampler (default euler_maruyama)",
    )
    p.add_argument(
        "--n",
        "--num-samples",  # under torchrun, whose own options swallow the abbreviation --n
        dest="n",
        type=int,
        default=1000,
        help="number of samples (default 1000)",
    )
    p.add_argument("--steps", type=int, default=1000, help="time steps (default 1000)")
    p.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="samples per chunk, the unit split over processes (default: all at once)",
    )
    p.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="sampler option, repeatable (snr=0.16, lam=0.5, method=rk4, ...)",
    )
    p.add_argument("--weights", default="ema", choices=("ema", "raw"), help="EMA or raw weights")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument(
        "--class", dest="class_", type=int, metavar="K", help="class-conditional: class index"
    )
    p.add_argument(
        "--guidance",
        type=float,
        default=1.0,
        metavar="S",
        help="guidance scale with --class: 0 unconditional, 1 conditional (default), >1 "
        "sharper; classifier-free on a run with model.num_classes, else classifier guidance",
    )
    p.add_argument(
        "--classifier",
        metavar="DIR",
        help="folder from sdelab train-classifier: classifier guidance (needed for "
        "unconditional runs)",
    )
    p.add_argument(
        "--out",
        required=True,
        metavar="FILE",
        help="output .npy or .csv; image runs write FILE.npy and a PNG grid FILE.png",
    )
    p.set_defaults(func=_sample)

    p = sub.add_parser(
        "likelihood",
        help="test-set NLL of a trained run",
        description=_likelihood.__doc__,
        epilog="examples:\n  sdelab likelihood runs/checker --method ode\n"
        "  sdelab likelihood runs/checker --method ode --probes 4\n"
        "  sdelab likelihood runs/checker --method elbo --n 5000\n"
        "  sdelab likelihood runs/digits --probes 4   # images: uniform dequantization, bits/dim\n"
        "  sdelab likelihood runs/vdm --method vlb --steps 1000   # VDM bound with its terms",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("run", metavar="RUN", help="run folder written by sdelab train")
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
    p.add_argument("--weights", default="ema", choices=("ema", "raw"), help="EMA or raw weights")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.set_defaults(func=_likelihood)

    p = sub.add_parser("plot", help="plot a trained 2-D run", description=_plot.__doc__)
    p.add_argument("run", metavar="RUN", help="run folder written by sdelab train")
    p.add_argument("--out", default=None, help="output folder (default RUN/plots)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.set_defaults(func=_plot)

    _add_conditional_parser(
        sub,
        "inpaint",
        _inpaint,
        "examples:\n  sdelab inpaint runs/8g --known 0=2.0 --n 2000 --out inp.npy\n"
        "  sdelab inpaint runs/digits --image obs.png --mask mask.png --n 8 --out grid.png",
        image_only=False,
    )
    _add_conditional_parser(
        sub,
        "colorize",
        _colorize,
        "example:\n  sdelab colorize runs/rgb --image photo.png --n 8 --out grid.png",
        image_only=True,
    )
    p = sub.add_parser(
        "train-classifier",
        help="train a noise-conditional classifier for guidance",
        description=_train_classifier.__doc__,
        epilog="examples:\n  sdelab train-classifier runs/8g --steps 2000 --out runs/8g-clf\n"
        "  sdelab sample runs/8g --class 3 --guidance 1 --classifier runs/8g-clf --out c3.npy\n"
        "  sdelab train-classifier runs/digits --width 32 --out runs/digits-clf\n"
        "  sdelab train-classifier runs/digits --clean --seed 1 --out runs/digits-clean",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("source", metavar="CONFIG-or-RUN", help="run folder, YAML or built-in name")
    p.add_argument("--out", required=True, metavar="DIR", help="classifier folder (new)")
    p.add_argument("--steps", type=int, default=2000, help="training steps (default 2000)")
    p.add_argument("--batch-size", type=int, default=256, help="batch size (default 256)")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default 1e-3)")
    p.add_argument(
        "--width", type=int, default=128, help="MLP width / conv base channels (default 128)"
    )
    p.add_argument("--depth", type=int, default=3, help="MLP hidden layers (default 3)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--log-every", type=int, default=0, help="print the loss every N steps")
    p.add_argument(
        "--clean", action="store_true", help="train at t = t_min only (clean-data classifier)"
    )
    p.set_defaults(func=_train_classifier)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``sdelab`` console script."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (CLIError, ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"sdelab {args.command}: error: {e}", file=sys.stderr)
        return 2
    finally:
        _leave_group()


def _leave_group() -> None:
    """Tear down a process group joined by a command (torchrun warns otherwise)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
