"""The README's Python blocks run as written (in order, in one namespace, in a scratch folder),
so the README cannot drift from the API."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S)


def test_readme_has_python_blocks():
    assert len(BLOCKS) >= 2


def test_readme_is_short_and_no_work_log():
    """The README is a front page (the rest is on the docs site): at most 200 lines, with no
    issue numbers or work-log words, and no pointer to the old results notebook."""
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 200
    bad = [ln for ln in text.splitlines() if re.search(r"\b(issue|session|item) \d+", ln, re.I)]
    assert not bad and "RESULTS.md" not in text, bad


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_readme_python_blocks_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # blocks that write run folders write them here
    namespace: dict = {"__name__": "readme"}
    for i, block in enumerate(BLOCKS):
        try:
            exec(compile(block, f"README.md python block {i}", "exec"), namespace)
        except Exception as e:  # name the block: the README is what needs fixing
            raise AssertionError(f"README python block {i} failed: {e!r}\n{block}") from e


def test_docs_ncsn_example_runs_verbatim(tmp_path, monkeypatch, capsys):
    """The NCSN training command of the discrete-models tutorial, as written (the continuation
    joined), trains; only train.steps is added to keep it short."""
    import shlex

    from sdelab.cli import main

    page = README.parent / "docs" / "tutorials" / "discrete.md"
    text = page.read_text(encoding="utf-8").replace("\\\n", " ")
    (line,) = [ln for ln in text.splitlines() if "--out runs/ncsn" in ln]
    args = shlex.split(line.split("#")[0])
    assert args[:2] == ["sdelab", "train"]
    monkeypatch.chdir(tmp_path)
    assert main([*args[1:], "train.steps=2"]) == 0, capsys.readouterr().err


def test_top_level_help_keeps_the_case_of_names(capsys):
    from cli_helpers import run_cli

    code, out, _ = run_cli(capsys, "--help")
    flat = " ".join(out.split())  # argparse wraps the lines
    assert code == 0 and "Song et al. 2021" in flat and "RGB" in flat


def test_readme_links_resolve():
    """Every relative link or image of the README points at a file of the repository (the
    docs pages it sends readers to included)."""
    root = README.parent
    text = README.read_text(encoding="utf-8")
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)
    local = [t for t in targets if not re.match(r"[a-z]+://|mailto:", t)]
    missing = [t for t in local if not (root / t).exists()]
    assert not missing, f"README links to missing files: {missing}"


def test_readme_shell_commands_parse():
    """Every ``sdelab`` command of the README's bash blocks parses, and every ``sdelab train``
    config loads with its overrides (the recipes' second stages with ``train.init_from``)."""
    import shlex

    from sdelab.cli import parse_args
    from sdelab.train.config import load_config

    text = README.read_text(encoding="utf-8")
    lines = [
        ln.split("#")[0].strip()
        for block in re.findall(r"```bash\n(.*?)```", text, re.S)
        for ln in block.splitlines()
    ]
    commands = [shlex.split(ln) for ln in lines if ln.startswith("sdelab ")]
    assert sum(c[1] == "train" for c in commands) >= 5
    for argv in commands:
        args = parse_args(argv[1:])
        assert args.command == argv[1]
        if argv[1] == "train":
            overrides = [a for a in argv[3:] if "=" in a and not a.startswith("-")]
            load_config(argv[2], overrides)
