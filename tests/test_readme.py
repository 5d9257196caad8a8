"""The README's Python blocks run as written (in order, in one namespace, in a scratch folder),
so the README cannot drift from the API."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S)


def test_readme_has_python_blocks():
    assert len(BLOCKS) >= 5


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_readme_python_blocks_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # blocks that write run folders write them here
    namespace: dict = {"__name__": "readme"}
    for i, block in enumerate(BLOCKS):
        try:
            exec(compile(block, f"README.md python block {i}", "exec"), namespace)
        except Exception as e:  # name the block: the README is what needs fixing
            raise AssertionError(f"README python block {i} failed: {e!r}\n{block}") from e
