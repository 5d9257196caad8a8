"""The ``sdelab`` command line: one module per subcommand group, each adding its parsers.

``sdelab demo | train`` (:mod:`~sdelab.cli.train`), ``sample`` (:mod:`~sdelab.cli.sample`),
``likelihood`` (:mod:`~sdelab.cli.likelihood`), ``stats | evaluate`` (:mod:`~sdelab.cli.quality`),
``plot`` (:mod:`~sdelab.cli.plot`), ``inpaint | colorize | train-classifier``
(:mod:`~sdelab.cli.control`), ``train-dequantizer`` (:mod:`~sdelab.cli.dequantizer`). Every error
the user can fix is one line on stderr (``sdelab CMD: error: ...``) with exit code 2; Ctrl-C
outside training (which saves a checkpoint and exits 130 itself) is one line and exit code 130,
SIGTERM one line and 143; ``evaluate`` and ``likelihood`` say that their finished batches are
kept and how to continue them.
"""

from __future__ import annotations

import argparse
import os
import pickle
import signal
import sys
import threading

from sdelab import __version__, distributed
from sdelab.cli import control, dequantizer, likelihood, plot, quality, sample, train
from sdelab.cli.common import CLIError, OneLineParser, is_override

__all__ = ["CLIError", "build_parser", "main"]

#: The subcommand modules, in the order ``--help`` lists them.
_MODULES = (train, sample, likelihood, quality, plot, control, dequantizer)

#: What a user can fix: shown as one line, exit code 2.
_USER_ERRORS = (
    CLIError,
    ValueError,
    FileNotFoundError,
    FileExistsError,
    IsADirectoryError,
    NotADirectoryError,
    PermissionError,
    pickle.UnpicklingError,  # an unsafe or broken pickle (data.image_formats.UnsafePickleError)
)


def build_parser() -> argparse.ArgumentParser:
    """The ``sdelab`` argument parser with every subcommand."""
    parser = OneLineParser(
        prog="sdelab",
        description="Continuous-time score-based diffusion models with first-class likelihood.",
        epilog="examples:\n  sdelab demo\n  sdelab train checkerboard train.steps=2000 --out "
        "runs/cb\n  sdelab sample runs/cb --sampler ode --n 5000 --out s.npy\n"
        "  sdelab likelihood runs/cb\n  python -m sdelab --version\n"
        "each command has its own --help with examples.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"sdelab {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    for module in _MODULES:
        module.add_parsers(sub)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse a command line; ``KEY=VALUE`` overrides may stand anywhere after the command
    (``sdelab train checkerboard --out runs/cb train.steps=1500``)."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        keyvals = [e for e in extra if is_override(e)]
        rest = [e for e in extra if not is_override(e)]
        if rest or not hasattr(args, "overrides"):
            parser.error(f"unrecognized arguments: {' '.join(rest or extra)}")
        args.overrides = [*args.overrides, *keyvals]
    return args


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``sdelab`` console script.

    A process started by ``torchrun`` / ``accelerate launch`` does not return: after every
    rank has finished (a barrier) it leaves the process group and ends with ``os._exit``
    (see :func:`sdelab.distributed.leave`).
    """
    args = parse_args(argv)
    code, together = _run(args)
    if distributed.leave(wait=together):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


class Terminated(BaseException):
    """SIGTERM outside a training loop (which saves and stops itself), raised like Ctrl-C's
    ``KeyboardInterrupt`` so that ``finally`` blocks and context managers still run."""


def _raise_terminated(signum, frame) -> None:
    raise Terminated()


#: Commands whose finished work survives a stop (``RUN/eval/`` stores): what to say about it.
_RESUMABLE = {
    "evaluate": "its finished chunks are kept in {run}/eval/quality: run the same command with "
    "--resume to continue",
    "likelihood": "its finished batches are kept in {run}/eval/likelihood: run the same "
    "command with --resume to continue",
}


def _stopped(args: argparse.Namespace, signum: int) -> int:
    """The one line a command stopped by a signal prints; returns 128 + signum."""
    resumable = _RESUMABLE.get(args.command)
    run = getattr(args, "run", None)
    if resumable is not None and run is not None:
        what = resumable.format(run=run)
    else:
        what = "nothing more was written"
    how = "interrupted (Ctrl-C)" if signum == signal.SIGINT else "stopped by SIGTERM"
    print(f"sdelab {args.command}: {how}; {what}", file=sys.stderr)
    return 128 + signum


def _run(args: argparse.Namespace) -> tuple[int, bool]:
    """The command's exit code, and whether it ended as it does on every rank (a returned code,
    which every rank reaches) rather than by an error or a signal of this rank alone.

    SIGTERM and Ctrl-C outside training (which saves a checkpoint and returns 128+signal
    itself) end the command with one line on stderr and exit code 143 / 130."""
    main_thread = threading.current_thread() is threading.main_thread()
    old = signal.signal(signal.SIGTERM, _raise_terminated) if main_thread else None
    try:
        return args.func(args), True
    except _USER_ERRORS as e:
        print(f"sdelab {args.command}: error: {e}", file=sys.stderr)
        return 2, False
    except KeyboardInterrupt:
        return _stopped(args, signal.SIGINT), False
    except Terminated:
        return _stopped(args, signal.SIGTERM), False
    except BaseException:
        distributed.leave(wait=False)
        raise
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, old)
