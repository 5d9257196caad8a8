"""The ``sdelab`` command line: one module per subcommand group, each adding its parsers.

``sdelab demo | train`` (:mod:`~sdelab.cli.train`), ``sample`` (:mod:`~sdelab.cli.sample`),
``likelihood`` (:mod:`~sdelab.cli.likelihood`), ``stats | evaluate`` (:mod:`~sdelab.cli.quality`),
``plot`` (:mod:`~sdelab.cli.plot`), ``inpaint | colorize | train-classifier``
(:mod:`~sdelab.cli.control`), ``train-dequantizer`` (:mod:`~sdelab.cli.dequantizer`). Every error
the user can fix is one line on stderr (``sdelab CMD: error: ...``) with exit code 2; Ctrl-C
is one line and exit code 130, SIGTERM one line and 143: the training commands (``train``,
``train-classifier``, ``train-dequantizer``) first save a checkpoint and name it,
``evaluate`` and ``likelihood`` say that their finished batches are kept and how to continue
them. A full disk and a failed allocation are one line and exit code 2
too. ``sdelab --debug CMD`` (or ``SDELAB_DEBUG=1``) raises every error with its traceback instead
(for maintainers: a bug deep inside then does not read like bad input).
"""

from __future__ import annotations

import argparse
import errno
import os
import pickle
import re
import signal
import sys
import threading

import torch

from sdelab import __version__, distributed
from sdelab.cli import control, dequantizer, likelihood, plot, quality, sample, train
from sdelab.cli.common import CLIError, OneLineParser, is_override
from sdelab.train.skeleton import TrainingInterrupted

__all__ = ["CLIError", "main"]

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
    parser.add_argument(
        "--debug",
        action="store_true",
        help="show errors with their traceback instead of one line (also SDELAB_DEBUG=1)",
    )
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


#: ``OSError`` numbers of a disk that cannot take more (full, quota, file-size limit).
_DISK_FULL = {errno.ENOSPC, errno.EFBIG, getattr(errno, "EDQUOT", errno.ENOSPC)}


def _debug(args: argparse.Namespace) -> bool:
    """``--debug`` or ``SDELAB_DEBUG=1``: errors raise with their traceback."""
    return bool(getattr(args, "debug", False)) or os.environ.get("SDELAB_DEBUG", "") not in (
        "",
        "0",
    )


def _disk_full(e: OSError, command: str) -> str:
    """One line for a write that the disk refused; a temp file's name is shown as the file
    it was to become (atomic writes leave nothing half-written)."""
    name = e.filename or "a file"
    m = re.fullmatch(r"(.*/)?\.(.+)\.tmp-\d+", str(name))
    if m:
        name = (m.group(1) or "") + m.group(2)
    then = (
        "sdelab train --resume continues from the last checkpoint"
        if command == "train"
        else "no half-written file was left"
    )
    return (
        f"cannot write {name}: {e.strerror} (the disk is full or a file-size limit was "
        f"reached): free some space or write elsewhere, and run it again; {then}"
    )


def _out_of_memory(e: BaseException) -> bool:
    """An allocation that failed (CPU or GPU), as opposed to any other ``RuntimeError``."""
    if isinstance(e, MemoryError | torch.OutOfMemoryError):
        return True
    text = str(e)
    return isinstance(e, RuntimeError) and (
        "can't allocate memory" in text or "out of memory" in text.lower()
    )


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

    SIGTERM and Ctrl-C end the command with one line on stderr and exit code 143 / 130; in a
    training loop (:class:`~sdelab.train.skeleton.TrainSkeleton`) after saving a checkpoint,
    which the line names."""
    main_thread = threading.current_thread() is threading.main_thread()
    old = signal.signal(signal.SIGTERM, _raise_terminated) if main_thread else None
    try:
        return args.func(args), True
    except TrainingInterrupted as e:  # a checkpoint was saved (on every rank's same step)
        print(f"sdelab {args.command}: {e}", file=sys.stderr)
        return 128 + e.signum, True
    except _USER_ERRORS as e:
        print(f"sdelab {args.command}: error: {e}", file=sys.stderr)
        if _debug(args):
            raise
        return 2, False
    except OSError as e:
        if e.errno not in _DISK_FULL or _debug(args):
            raise
        print(f"sdelab {args.command}: error: {_disk_full(e, args.command)}", file=sys.stderr)
        return 2, False
    except (MemoryError, RuntimeError) as e:
        if not _out_of_memory(e) or _debug(args):
            raise
        m = re.search(r"tried to allocate (\d[\d.,]*\s*[A-Za-z]+)", str(e), re.IGNORECASE)
        what = f" (tried to allocate {m.group(1)})" if m else ""
        print(
            f"sdelab {args.command}: error: not enough memory{what}: ask for less at once "
            "(a smaller --n, --batch-size or --steps)",
            file=sys.stderr,
        )
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
