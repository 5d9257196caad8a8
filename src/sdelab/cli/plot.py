"""``sdelab plot``: the standard plots of a 2-D run."""

from __future__ import annotations

import argparse

from sdelab.cli.common import nonneg_int
from sdelab.runs import (
    plot_run,
)


def _plot(args: argparse.Namespace) -> int:
    """Write a 2-D run's plots: loss, samples vs data, model density, λ=0/λ=1 trajectories
    (each path is printed as it is written)."""
    plot_run(args.run, args.out, seed=args.seed, on_write=lambda path: print(path, flush=True))
    return 0


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Add this module's subcommands to ``sub``."""
    p = sub.add_parser(
        "plot",
        help="plot a trained 2-D run",
        description=_plot.__doc__,
        epilog="examples:\n  sdelab plot runs/checker                 # -> runs/checker/plots/\n"
        "  sdelab plot runs/checker --out figs --seed 1\n\n"
        "writes loss.png, samples_ode.png, samples_euler_maruyama.png, density.png and\n"
        "trajectories.png; 2-D runs only (image runs: sdelab sample writes a PNG grid).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("run", metavar="RUN", help="run folder written by sdelab train")
    p.add_argument("--out", default=None, help="output folder (default RUN/plots)")
    p.add_argument("--seed", type=nonneg_int, default=0, help="random seed (default 0)")
    p.set_defaults(func=_plot)
