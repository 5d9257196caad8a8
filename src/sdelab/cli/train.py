"""``sdelab train`` and ``sdelab demo``."""

from __future__ import annotations

import argparse
import json
import os
import re
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
from sdelab.train.loop import TrainingError, train
from sdelab.train.rundir import (
    LOCK_FILE,
    RunLock,
    config_changes,
    is_run_file,
    resume_config,
    saved_config,
)
from sdelab.utils import atomic_write

#: Marks a folder written by ``sdelab demo``: a second demo may replace it.
DEMO_MARK = ".sdelab-demo"


def _demo(args: argparse.Namespace) -> int:
    """Train a 2-D toy model, then write samples, density and trajectory plots and print a
    table of test NLL (probability-flow ODE) and bounds next to the data's true entropy.
    Running it again with the same --out replaces what the earlier demo wrote there; a folder
    holding any other file is refused (nothing is deleted)."""
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise CLIError(f"{out} is a file: pass another --out")
    with RunLock(out, "sdelab demo"):  # held from the replacement to the last file written
        return _demo_locked(args, out)


def _demo_locked(args: argparse.Namespace, out: Path) -> int:
    written = _claim_demo_folder(out)
    run_dir = out / "run"
    overrides = [f"train.steps={args.steps}", "train.log_every=100", "train.ckpt_every=2500"]
    config = load_config(args.toy, overrides)
    print(f"1/3 training {args.toy} for {args.steps} steps -> {run_dir}", flush=True)
    try:
        train(config, run_dir)
    except TrainingError as e:
        raise CLIError(str(e)) from None
    print(f"2/3 plots -> {out / 'plots'}", flush=True)

    def wrote(path: Path) -> None:
        _record_demo_file(out, written, path)
        _print_path(path)

    plot_run(run_dir, out / "plots", seed=args.seed, on_write=wrote)
    print(f"3/3 test likelihood on {args.n} held-out points", flush=True)
    table = format_table(likelihood_table(run_dir, n=args.n, seed=args.seed), args.n)
    _record_demo_file(out, written, out / "likelihood.md")  # recorded before it exists
    atomic_write(out / "likelihood.md", table + "\n")
    print(table)
    return 0


def _print_path(path: Path) -> None:
    print(f"    {path}", flush=True)


def _claim_demo_folder(out: Path) -> list[str]:
    """Make ``out`` a demo folder: new, empty, or an earlier demo's, whose files (those its
    mark records, and the run folder's training files) are deleted. Any other file refuses
    the folder before anything is deleted. Returns the new mark's record of written files.
    The caller holds ``out``'s lock."""
    entries = [p for p in out.iterdir() if p.name != LOCK_FILE]
    if entries:
        if not (out / DEMO_MARK).is_file():
            raise CLIError(
                f"{out} holds files the demo did not write: pass another --out or delete it"
            )
        ours, foreign = _demo_files(out)
        if foreign:
            shown = ", ".join(str(p) for p in foreign[:3])
            more = f" and {len(foreign) - 3} more" if len(foreign) > 3 else ""
            raise CLIError(
                f"{out} is an earlier demo's folder but also holds files the demo did not write "
                f"({shown}{more}): move them out, or pass another --out; nothing was deleted"
            )
        print(f"replacing the earlier demo in {out}", flush=True)
        for path in ours:
            path.unlink(missing_ok=True)
        for folder in sorted({p.parent for p in ours}, key=lambda p: -len(p.parts)):
            _remove_empty_folders(folder, out)
    written: list[str] = []
    _write_demo_mark(out, written)
    return written


def _demo_files(out: Path) -> tuple[list[Path], list[Path]]:
    """The files of an earlier demo folder split into the demo's (its mark, the files the mark
    records, the run folder's training files, atomic-write leftovers) and everyone else's."""
    recorded = _demo_mark_record(out)
    ours, foreign = [], []
    for root, dirs, files in os.walk(out):
        base = Path(root)
        links = [d for d in dirs if (base / d).is_symlink()]  # never followed; not ours
        for name in sorted(files + links):
            path = base / name
            rel = path.relative_to(out)
            if rel.as_posix() == LOCK_FILE:
                continue  # the lock this demo holds
            mine = not path.is_symlink() and (
                rel.as_posix() in recorded
                or rel.as_posix() == DEMO_MARK
                or (rel.parts[0] == "run" and is_run_file(Path(*rel.parts[1:])))
                or (rel.parent.as_posix() in (".", "plots") and _TMP_WRITE.match(rel.name))
            )
            (ours if mine else foreign).append(path)
    return ours, foreign


_TMP_WRITE = re.compile(r"^\..*\.tmp-\d+$")  # an atomic write cut short by a kill


def _demo_mark_record(out: Path) -> set[str]:
    """The files (relative to ``out``) an earlier demo's mark says it wrote. A mark of an
    older sdelab (plain text) recorded none: its plots (``plots/*.png``) and table count."""
    text = (out / DEMO_MARK).read_text(encoding="utf-8", errors="replace")
    try:
        record = json.loads(text)
        return {str(f) for f in record["files"]}
    except (json.JSONDecodeError, KeyError, TypeError):
        plots = out / "plots"
        older = [f"plots/{p.name}" for p in plots.glob("*.png")] if plots.is_dir() else []
        return {"likelihood.md", *older}


def _write_demo_mark(out: Path, written: list[str]) -> None:
    record = {"written_by": "sdelab demo (a new demo replaces these files)", "files": written}
    atomic_write(out / DEMO_MARK, json.dumps(record, indent=1) + "\n")


def _record_demo_file(out: Path, written: list[str], path: Path) -> None:
    written.append(path.relative_to(out).as_posix())
    _write_demo_mark(out, written)


def _remove_empty_folders(folder: Path, top: Path) -> None:
    """Remove ``folder`` and its parents up to (not including) ``top`` while they are empty."""
    while folder != top and folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()
        folder = folder.parent


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
scalars; sections: data, sde, model, loss, optim, train, eval (every key:
docs/reference/config.md). the run folder gets config.yaml/.json, metrics.jsonl,
checkpoints/, loss.png.
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
with the same --out replaces what the first wrote (OUT/.sdelab-demo lists it); a folder that
also holds any other file is refused and nothing is deleted.
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
