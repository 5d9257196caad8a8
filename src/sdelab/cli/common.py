"""What every subcommand shares: the one-line error, checked numeric options, ``KEY=VALUE``
options, files a command will write, joining a launched process group."""

from __future__ import annotations

import argparse
import math
import re
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

from sdelab import distributed
from sdelab.samplers.registry import sampler_options
from sdelab.train.build import resolve_device

__all__ = [
    "CLIError",
    "OneLineParser",
    "check_new_files",
    "check_sampler_options",
    "finite_float",
    "is_override",
    "join_launched_group",
    "nonneg_int",
    "note",
    "parse_options",
    "positive_float",
    "positive_int",
]


class CLIError(Exception):
    """An error shown to the user as one line, with exit code 2."""


class OneLineParser(argparse.ArgumentParser):
    """An argument parser whose errors are one line on stderr (``sdelab CMD: error: ...``,
    pointing at ``--help``) with exit code 2, like every other error of the CLI."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# ---- numbers ---------------------------------------------------------------------------------
def _number(text: str, kind: type) -> float | int:
    try:
        value = kind(text)
    except ValueError:
        what = "an integer" if kind is int else "a number"
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """argparse ``type=``: an integer ≥ 1."""
    value = _number(text, int)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def nonneg_int(text: str) -> int:
    """argparse ``type=``: an integer ≥ 0."""
    value = _number(text, int)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or a positive integer, got {text}")
    return value


def positive_float(text: str) -> float:
    """argparse ``type=``: a finite number > 0."""
    value = _number(text, float)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def finite_float(text: str) -> float:
    """argparse ``type=``: any finite number."""
    return _number(text, float)


# ---- KEY=VALUE -------------------------------------------------------------------------------
_OVERRIDE = re.compile(r"^[A-Za-z_][\w-]*(\.[\w-]+)*=")


def is_override(token: str) -> bool:
    """``token`` reads as a dotted ``KEY=VALUE`` override (and is not an existing file)."""
    return bool(_OVERRIDE.match(token)) and not Path(token).exists()


def parse_options(items: list[str]) -> dict[str, Any]:
    """``KEY=VALUE`` sampler options, values parsed as YAML scalars (``snr=0.16``)."""
    options: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise CLIError(f"bad option {item!r}: write KEY=VALUE, e.g. snr=0.16")
        try:
            options[key] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise CLIError(f"bad option {item!r}: {value!r} is not a value") from None
    return options


def check_sampler_options(sampler: str, options: dict[str, Any]) -> dict[str, Any]:
    """Check each option's name and type against the sampler's defaults (``colour=red``,
    ``snr=abc``, ``denoise=maybe`` are errors naming the valid names or the expected type)."""
    defaults = sampler_options(sampler)
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        raise CLIError(
            f"unknown option(s) {', '.join(unknown)} for sampler {sampler!r}: valid are "
            f"{', '.join(defaults)}"
        )
    for key, value in options.items():
        default = defaults[key]
        if isinstance(default, bool):
            ok, want = isinstance(value, bool), "true or false"
        elif isinstance(default, int):
            ok, want = isinstance(value, int) and not isinstance(value, bool), "an integer"
        elif isinstance(default, float) or default is None:
            ok = _is_number(value) or (default is None and value is None)
            want = "a number"
        elif isinstance(default, str):
            ok, want = isinstance(value, str), "a name"
        else:
            continue
        if not ok:
            raise CLIError(
                f"bad option {key}={value!r} for sampler {sampler!r}: expected {want} "
                f"(default {default!r})"
            )
        if isinstance(default, float) and isinstance(value, int):
            options[key] = float(value)
    return options


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


# ---- files -----------------------------------------------------------------------------------
def check_new_files(
    paths: Iterable[Path],
    force: bool = False,
    hint: str = "choose another --out or delete it first",
) -> list[Path]:
    """Every file a command will write, checked before it writes any (and before the work):
    none may exist (unless ``force``) or be a folder; ``hint`` says what to do instead."""
    paths = list(paths)
    for path in paths:
        if path.is_dir():
            raise CLIError(f"{path} is a folder: --out names a file")
        if path.exists() and not force:
            raise CLIError(f"{path} exists: {hint}")
    return paths


def join_launched_group():
    """Join the process group when started by torchrun / accelerate launch (else rank 0 of 1)."""
    return distributed.init(resolve_device("auto"))


def note(text: str) -> None:
    """A status line on stderr (stdout keeps the results)."""
    print(text, file=sys.stderr, flush=True)


#: ``--steps`` when not given: what suits each sampler (RK4 takes 4 evaluations a step; the
#: adaptive ODE methods use the grid only for output times; DPM-Solver is built for few steps).
DEFAULT_STEPS = {"ode": 100, "dpm_solver": 20}


def checkpoint_arg(text: str) -> int | str:
    """``--checkpoint``: ``best`` or a step number."""
    if text == "best":
        return text
    try:
        step = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not 'best' or a step number") from None
    if step < 0:
        raise argparse.ArgumentTypeError(f"a step number is >= 0, got {step}")
    return step


def add_weights_options(p: argparse.ArgumentParser) -> None:
    """``--weights ema|raw`` and ``--checkpoint best|STEP`` (default: the newest checkpoint)."""
    p.add_argument("--weights", default="ema", choices=("ema", "raw"), help="EMA or raw weights")
    p.add_argument(
        "--checkpoint",
        type=checkpoint_arg,
        default=None,
        metavar="best|STEP",
        help="which checkpoint: a step, or best (kept by eval.select_best; default: newest)",
    )
