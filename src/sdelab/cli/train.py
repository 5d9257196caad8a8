"""``sdelab train`` and ``sdelab demo``."""

from __future__ import annotations

import argparse
import sys
import textwrap
from pathlib import Path

from sdelab import distributed
from sdelab.cli.common import CLIError
from sdelab.runs import (
    format_table,
    likelihood_table,
    plot_run,
)
from sdelab.train.build import make_run_dataset, resolve_config
from sdelab.train.config import builtin_configs, load_config
from sdelab.train.hooks import likelihood_hook
from sdelab.train.loop import TrainingError, TrainingInterrupted, train


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


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Add this module's subcommands to ``sub``."""
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
