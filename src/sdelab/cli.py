"""The ``sdelab`` command line. Each subcommand is a small function in ``COMMANDS``."""

from __future__ import annotations

import argparse
import math
import sys
import textwrap
from collections.abc import Callable

import torch

from sdelab.losses import dsm_loss
from sdelab.oracle import GaussianData
from sdelab.sde import SCHEDULES, make_schedule


class CLIError(Exception):
    """An error shown to the user as one line, with exit code 2."""


def _demo(args: argparse.Namespace) -> int:
    """Oracle demo: for each schedule, the DSM loss of the exact score vs a perturbed one,
    and the variance reduction of importance-sampled time for the likelihood weighting."""
    torch.manual_seed(args.seed)
    data = GaussianData(
        torch.tensor([1.0, -0.5], dtype=torch.float64),
        torch.tensor([[1.0, 0.7], [0.7, 0.8]], dtype=torch.float64),
    )
    g = torch.Generator().manual_seed(args.seed)
    x0 = data.sample(args.n, generator=g)
    print(f"Gaussian oracle, D=2, n={args.n}: likelihood-weighted DSM loss (nats)")
    print(
        f"{'schedule':>9} {'oracle':>16} {'oracle+0.3':>16} {'var uniform':>12} "
        f"{'var IS':>10} {'ratio':>7}"
    )
    for name in SCHEDULES:
        sde = make_schedule(name)
        score = data.score_fn(sde)
        row = []
        for fn in (score, lambda x, t, s=score: s(x, t) + 0.3):
            out = dsm_loss(
                fn,
                sde,
                x0,
                parametrization="score",
                weighting="likelihood",
                time_sampling="importance",
                generator=g,
            ).loss
            row.append(f"{float(out.mean()):7.3f} ± {float(out.std()) / math.sqrt(len(out)):.3f}")
        uni = dsm_loss(
            score, sde, x0, parametrization="score", weighting="likelihood", generator=g
        ).loss
        imp = dsm_loss(
            score,
            sde,
            x0,
            parametrization="score",
            weighting="likelihood",
            time_sampling="importance",
            generator=g,
        ).loss
        ratio = float(uni.var() / imp.var())
        print(
            f"{name:>9} {row[0]:>16} {row[1]:>16} {float(uni.var()):12.3g} "
            f"{float(imp.var()):10.3g} {ratio:7.1f}"
        )
    return 0


def _train(args: argparse.Namespace) -> int:
    """Train a score model from a YAML config (a path or a built-in name) plus overrides."""
    from sdelab.train.config import load_config
    from sdelab.train.loop import TrainingError, TrainingInterrupted, resolve_config, train

    config = load_config(args.config, args.overrides)
    if args.dry_run:
        print(resolve_config(config).to_yaml(), end="")
        return 0
    if not args.out:
        raise CLIError("--out DIR is required: the run folder to write")
    try:
        result = train(config, args.out, resume=args.resume)
    except TrainingInterrupted as e:
        print(f"sdelab train: {e}", file=sys.stderr)
        return 128 + e.signum
    except TrainingError as e:
        raise CLIError(str(e)) from None
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
    p = sub.add_parser("demo", help="run the built-in demo", description=_demo.__doc__)
    p.add_argument("--n", type=int, default=20000, help="number of data points (default 20000)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    p.set_defaults(func=_demo)

    from sdelab.train.config import builtin_configs

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
    return parser


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {"demo": _demo, "train": _train}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``sdelab`` console script."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (CLIError, ValueError, FileNotFoundError) as e:
        print(f"sdelab {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
