"""``sdelab inpaint``, ``colorize`` and ``train-classifier``: controllable generation."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from sdelab import controllable as ctl
from sdelab.cli.common import (
    CLIError,
    check_new_files,
    check_sampler_options,
    nonneg_int,
    parse_options,
    positive_float,
    positive_int,
)
from sdelab.data.png import load_mask_png, load_png, save_png_grid
from sdelab.plots import plot_samples
from sdelab.runs import (
    save_samples,
)
from sdelab.samplers import SAMPLERS
from sdelab.train.build import load_run
from sdelab.train.classifier import train_classifier


def _conditional_run(args: argparse.Namespace, colorize: bool) -> int:
    """Shared body of ``inpaint`` and ``colorize``: load the run, build the observation, sample,
    save .npy/.csv (vector runs) or a PNG grid (image observations)."""
    out = Path(args.out)
    check_new_files([out])
    config, model, schedule = load_run(args.run, args.weights)
    dim = config.model.dim
    if not args.image and dim == 2:
        check_new_files([out.with_suffix(".png")])  # the plot beside the samples
    options = dict(sampler=args.sampler, steps=args.steps, generator=args.seed)
    options.update(check_sampler_options(args.sampler, parse_options(args.option)))
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
    if not torch.isfinite(res.samples).all():
        raise CLIError(
            f"the samples are not finite (NaN/inf), nothing was written: the run {args.run} may "
            "have diverged (see its loss.png), or try more --steps"
        )
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
        if not math.isfinite(v):
            raise ValueError(f"bad --known {item!r}: the value must be a finite number")
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
    (a classifier of clean data, to score samples). Progress goes to stderr, the loss to
    DIR/metrics.jsonl; SIGTERM or Ctrl-C saves a checkpoint, and --resume continues it."""
    path = train_classifier(
        args.source,
        args.out,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        width=args.width,
        depth=args.depth,
        seed=args.seed,
        clean=args.clean,
        log_every=args.log_every,
        ckpt_every=args.ckpt_every,
        resume=args.resume,
    )

    acc = json.loads(path.read_text())["accuracy"]
    shown = ", ".join(f"t={k}: {v:.3f}" for k, v in acc.items())
    print(f"classifier -> {path.parent} (noised accuracy {shown})")
    return 0


def _first_lower(text: str) -> str:
    """A docstring's sentence as a help line: only the first letter lower-cased (names such as
    "Song et al." and "RGB" keep their case)."""
    return text[:1].lower() + text[1:]


def _add_conditional_parser(sub, name: str, func, epilog: str, image_only: bool):
    p = sub.add_parser(
        name,
        help=_first_lower(func.__doc__.split(":")[0]),
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
    p.add_argument("--n", type=positive_int, default=8, help="number of samples (default 8)")
    p.add_argument("--steps", type=positive_int, default=1000, help="time steps (default 1000)")
    p.add_argument(
        "--option", action="append", default=[], metavar="KEY=VALUE", help="sampler option"
    )
    p.add_argument("--weights", default="ema", choices=("ema", "raw"), help="EMA or raw weights")
    p.add_argument("--seed", type=nonneg_int, default=0, help="random seed (default 0)")
    p.add_argument("--out", required=True, metavar="FILE", help="output .png, .npy or .csv")
    p.set_defaults(func=func, known=[], mask=None)


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Add this module's subcommands to ``sub``."""
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
        "  sdelab train-classifier runs/8g --steps 4000 --out runs/8g-clf --resume\n"
        "  sdelab train-classifier runs/digits --clean --seed 1 --out runs/digits-clean",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("source", metavar="CONFIG-or-RUN", help="run folder, YAML or built-in name")
    p.add_argument(
        "--out", required=True, metavar="DIR", help="classifier folder (new, or --resume)"
    )
    p.add_argument("--steps", type=positive_int, default=2000, help="training steps (default 2000)")
    p.add_argument("--batch-size", type=positive_int, default=256, help="batch size (default 256)")
    p.add_argument(
        "--lr", type=positive_float, default=1e-3, help="Adam learning rate (default 1e-3)"
    )
    p.add_argument(
        "--width", type=positive_int, default=128, help="MLP width / conv base channels (128)"
    )
    p.add_argument("--depth", type=positive_int, default=3, help="MLP hidden layers (default 3)")
    p.add_argument("--seed", type=nonneg_int, default=0, help="random seed (default 0)")
    p.add_argument(
        "--log-every", type=positive_int, default=50, help="log the loss every N steps (50)"
    )
    p.add_argument(
        "--ckpt-every", type=positive_int, default=500, help="checkpoint every N steps (500)"
    )
    p.add_argument("--resume", action="store_true", help="continue the folder in --out")
    p.add_argument(
        "--clean", action="store_true", help="train at t = t_min only (clean-data classifier)"
    )
    p.set_defaults(func=_train_classifier)
