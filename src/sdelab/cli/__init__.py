"""The ``sdelab`` command line: one module per subcommand group, each adding its parsers.

``sdelab demo | train`` (:mod:`~sdelab.cli.train`), ``sample`` (:mod:`~sdelab.cli.sample`),
``likelihood`` (:mod:`~sdelab.cli.likelihood`), ``stats | evaluate`` (:mod:`~sdelab.cli.quality`),
``plot`` (:mod:`~sdelab.cli.plot`),
``inpaint | colorize | train-classifier`` (:mod:`~sdelab.cli.control`), ``train-dequantizer``
(:mod:`~sdelab.cli.dequantizer`). Every error the user can
fix is one line on stderr (``sdelab CMD: error: ...``) with exit code 2.
"""

from __future__ import annotations

import argparse
import sys

import torch.distributed as dist

from sdelab.cli import control, dequantizer, likelihood, plot, quality, sample, train
from sdelab.cli.common import CLIError

__all__ = ["CLIError", "build_parser", "main"]

#: The subcommand modules, in the order ``--help`` lists them.
_MODULES = (train, sample, likelihood, quality, plot, control, dequantizer)


def build_parser() -> argparse.ArgumentParser:
    """The ``sdelab`` argument parser with every subcommand."""
    parser = argparse.ArgumentParser(
        prog="sdelab",
        description="Continuous-time score-based diffusion models with first-class likelihood.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for module in _MODULES:
        module.add_parsers(sub)
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
