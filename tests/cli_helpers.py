"""Helpers shared by the CLI tests (imported by name: pytest puts tests/ on sys.path)."""

from __future__ import annotations

from sdelab.cli import main


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    """Run ``sdelab ARGV...`` in-process; returns (exit code, stdout, stderr)."""
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err
