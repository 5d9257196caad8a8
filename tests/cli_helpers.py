"""Helpers shared by the CLI tests (imported by name: pytest puts tests/ on sys.path)."""

from __future__ import annotations

import json
from pathlib import Path

from sdelab.cli import main


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    """Run ``sdelab ARGV...`` in-process; returns (exit code, stdout, stderr) — also for the
    argument parser's own errors and ``--help`` / ``--version``, which exit."""
    try:
        code = main(list(argv))
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 0 if e.code is None else 2
    out, err = capsys.readouterr()
    return code, out, err


def recorded(out: str) -> dict:
    """The JSON record a ``likelihood`` command wrote: the file its ``recorded in PATH`` line
    names."""
    lines = [ln for ln in out.splitlines() if ln.startswith("recorded in ")]
    assert len(lines) == 1, out
    return json.loads(Path(lines[0].removeprefix("recorded in ")).read_text())
