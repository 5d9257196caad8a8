"""The package declares ranges (users on other torch versions can install it); this project's
own install pins exact versions through constraints.txt, which the Makefile uses."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_torch_is_a_range_in_the_metadata_and_pinned_for_the_project():
    meta = (ROOT / "pyproject.toml").read_text()
    deps = re.search(r"^dependencies = \[(.*?)^\]", meta, re.M | re.S).group(1)
    (torch_dep,) = re.findall(r'"(torch[<>=!~ ][^"]*)"', deps)
    assert ">=" in torch_dep and "==" not in torch_dep
    pins = [ln for ln in (ROOT / "constraints.txt").read_text().splitlines() if "==" in ln]
    assert any(re.fullmatch(r"torch==\d+\.\d+\.\d+", p.strip()) for p in pins)
    makefile = (ROOT / "Makefile").read_text()
    assert "-c constraints.txt" in makefile
    stamp = re.search(r"^\$\(STAMP\):(.*)$", makefile, re.M)
    assert stamp and "constraints.txt" in stamp.group(1)  # a new pin reinstalls
