"""What every subcommand shares: the one-line error, ``KEY=VALUE`` options, joining a launched
process group."""

from __future__ import annotations

from typing import Any

import yaml

from sdelab import distributed
from sdelab.train.build import resolve_device

__all__ = ["CLIError", "join_launched_group", "parse_options"]


class CLIError(Exception):
    """An error shown to the user as one line, with exit code 2."""


def parse_options(items: list[str]) -> dict[str, Any]:
    """``KEY=VALUE`` sampler options, values parsed as YAML scalars (``snr=0.16``)."""
    options: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise CLIError(f"bad option {item!r}: write KEY=VALUE, e.g. snr=0.16")
        options[key] = yaml.safe_load(value)
    return options


def join_launched_group():
    """Join the process group when started by torchrun / accelerate launch (else rank 0 of 1)."""
    return distributed.init(resolve_device("auto"))
