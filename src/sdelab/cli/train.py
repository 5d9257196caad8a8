"""``sdelab train`` and ``sdelab demo``."""

from __future__ import annotations

import argparse
import shutil
import sys
import textwrap
from pathlib import Path

from sdelab import distributed
from sdelab.cli.common import CLIError, is_override, nonneg_int, positive_int
from sdelab.runs import (
    format_table,
    likelihood_table,
    plot_run,
)
from sdelab.train.build import make_run_dataset, resolve_config
from sdelab.train.checkpoint import list_checkpoints
from sdelab.train.config import builtin_configs, load_config
from sdelab.train.hooks import eval_hook_for
from sdelab.train.loop import TrainingError, TrainingInterrupted, train
from sdelab.train.rundir import RunLock, config_changes, resume_config, saved_config

#: Marks a folder written by ``sdelab demo``: a second demo may replace it.
DEMO_MARK = ".sdelab-demo"


def _demo(args: argparse.Namespace) -> int:
    """Train a 2-D toy model, then write samples, density and trajectory plots and print a
    table of test NLL (probability-flow ODE) and bounds next to the data's true entropy.
    The demo owns its --out folder: running it again replaces what an earlier demo wrote
    there (a folder with other files is refused)."""
    out = Path(args.out)
    _claim_demo_folder(out)
    run_dir = out / "run"
    overrides = [f"train.steps={args.steps}", "train.log_every=100", "train.ckpt_every=2500"]
    config = load_config(args.toy, overrides)
    print(f"1/3 training {args.toy} for {args.steps} steps -> {run_dir}", flush=True)
    try:
        train(config, run_dir)
    except TrainingInterrupted as e:
        print(f"sdelab demo: {e}", file=sys.stderr)
        return 128 + e.signum
    except TrainingError as e:
        raise CLIError(str(e)) from None
    print(f"2/3 plots -> {out / 'plots'}", flush=True)
    plot_run(run_dir, out / "plots", seed=args.seed, on_write=_print_path)
    print(f"3/3 test likelihood on {args.n} held-out points", flush=True)
    table = format_table(likelihood_table(run_dir, n=args.n, seed=args.seed), args.n)
    (out / "likelihood.md").write_text(table + "\n", encoding="utf-8")
    print(table)
    return 0


def _print_path(path: Path) -> None:
    print(f"    {path}", flush=True)


def _claim_demo_folder(out: Path) -> None:
    """Make ``out`` an empty demo folder: new, empty, or an earlier demo's (then replaced)."""
    if out.exists() and not out.is_dir():
        raise CLIError(f"{out} is a file: pass another --out")
    if out.is_dir() and any(out.iterdir()):
        if not (out / DEMO_MARK).is_file():
            raise CLIError(
                f"{out} holds files the demo did not write: pass another --out or delete it"
            )
        with RunLock(out / "run", "sdelab demo"):  # not while another demo trains there
            pass
        print(f"replacing the earlier demo in {out}", flush=True)
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / DEMO_MARK).write_text("written by sdelab demo; a new demo replaces this folder\n")


def _split_positionals(args: argparse.Namespace) -> tuple[str | None, list[str]]:
    """CONFIG and the KEY=VALUE overrides, wherever they stood on the line."""
    tokens = ([args.config] if args.config is not None else []) + list(args.overrides)
    configs = [t for t in tokens if not is_override(t)]
    config = configs[0] if configs else None
    # a second non-override is a bad override: load_config says how to write one
    return config, [t for t in tokens if t is not config]


def _train(args: argparse.Namespace) -> int:
    """Train a score model from a YAML config (a path or a built-in name) plus overrides;
    --resume continues a run from its own saved config (CONFIG may be left out)."""
    config_arg, overrides = _split_positionals(args)
    saved = saved_config(args.out) if args.resume and args.out else None
    if saved is not None:
        config = _resume_config(Path(args.out), saved, config_arg, overrides)
    elif config_arg is None:
        if args.resume and args.out:
            raise CLIError(
                f"{args.out} holds no run to resume (no checkpoint, no config.json): "
                "pass the CONFIG to start it"
            )
        raise CLIError("CONFIG is required: a YAML file or a built-in name (see --help)")
    else:
        config = load_config(config_arg, overrides)
    dataset = make_run_dataset(config)
    if args.dry_run:
        print(resolve_config(config, dataset).to_yaml(), end="")
        return 0
    if not args.out:
        raise CLIError("--out DIR is required: the run folder to write")
    dataset.load()  # image data are read lazily: missing files fail here, not mid-run
    try:
        hook = eval_hook_for(config)
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


def _resume_config(out: Path, saved, config_arg: str | None, overrides: list[str]):
    """The run's saved config with the command line's overrides; say what changes, and which
    values of a given CONFIG are not used."""
    given = None
    if config_arg is not None:
        given = load_config(config_arg, overrides)
        given = resolve_config(given, make_run_dataset(given))
    config = resume_config(saved, overrides, out, given)
    ckpts = list_checkpoints(out)
    at = f"step {ckpts[-1][0]}" if ckpts else "step 0 (no checkpoint yet)"
    changes = config_changes(saved, config)
    shown = ", ".join(f"{k} {a!r} -> {b!r}" for k, a, b in changes) or "nothing changed"
    print(f"resuming {out} from {at} with its saved config; {shown}", flush=True)
    if given is not None:
        ignored = [(k, b) for k, _, b in config_changes(config, given) if k.split(".")[0] != "data"]
        if ignored:
            keys = ", ".join(f"{k}={b!r}" for k, b in ignored[:4])
            print(
                f"note: {config_arg}'s own {keys} not used on resume (the run's saved values "
                "are kept; override them as KEY=VALUE to change them)",
                file=sys.stderr,
            )
    return config


_TRAIN_EPILOG = """\
examples:
  sdelab train checkerboard --out runs/checker
  sdelab train toy/8gaussians optim.lr=3e-4 train.steps=5000 --out runs/8g
  sdelab train my.yaml loss.weighting=likelihood loss.time_sampling=importance --out runs/ml
  sdelab train --resume --out runs/checker                    # continue after a kill
  sdelab train --resume --out runs/checker train.steps=20000  # train on for longer
  sdelab train sdeflow_swissroll --dry-run                     # print the resolved config

overrides are KEY=VALUE with dotted keys (anywhere on the line), values parsed as YAML
scalars; sections: data, sde, model, loss, optim, train, eval (see README "Training on 2-D
toys"). the run folder gets config.yaml/.json, metrics.jsonl, checkpoints/, loss.png.
--resume continues from the run's own saved config; only the overrides you type change it,
and only the loop's keys (train.*, eval.*) and optim.lr / optim.grad_clip may change.
SIGTERM/SIGINT save a checkpoint and exit with 128+signal; --resume continues exactly.
progress with an ETA and the loss goes to stderr (plain lines when it is not a terminal).
"""

_DEMO_EPILOG = """\
examples:
  sdelab demo                                  # checkerboard, ~3 minutes on a laptop CPU
  sdelab demo --toy 8gaussians --steps 3000 --out runs/demo-8g
  make demo                                    # the same as the first, re-runnable

writes OUT/run (the run folder), OUT/plots/*.png and OUT/likelihood.md; a second demo
with the same --out replaces the first.
"""


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Add this module's subcommands to ``sub``."""
    p = sub.add_parser(
        "demo",
        help="train a 2-D toy, plot it, print its likelihood table",
        description=_demo.__doc__,
        epilog=_DEMO_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--toy", default="checkerboard", help="built-in toy config (checkerboard)")
    p.add_argument(
        "--steps", type=positive_int, default=10000, help="training steps (default 10000)"
    )
    p.add_argument("--n", type=positive_int, default=2000, help="test points for the table (2000)")
    p.add_argument("--seed", type=nonneg_int, default=0, help="random seed (default 0)")
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
    p.add_argument(
        "config",
        nargs="?",
        metavar="CONFIG",
        help="YAML file or built-in config name (not needed with --resume of a run)",
    )
    p.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. optim.lr=3e-4"
    )
    p.add_argument("--out", metavar="DIR", help="run folder (must be empty unless --resume)")
    p.add_argument(
        "--resume", action="store_true", help="continue the run in --out from its last checkpoint"
    )
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    p.set_defaults(func=_train)
