"""The documentation site cannot drift from the code.

- every ```python block of every page under docs/ runs, in order, in one namespace per page, in
  a scratch folder; a ```pycon block (``>>>`` lines with their output) is checked as a doctest
  in that same namespace, so the outputs a page shows are the outputs the code gives;
- a block preceded by ``<!-- notest: REASON -->`` is not run (the reason says why);
- the generated reference pages (command line, config keys, layers) cover every command, every
  key and every import-linter layer;
- the user docs and the benchmark pages hold no work-log history (issue numbers, sessions), and
  every benchmark page says its command, date and machine.
"""

from __future__ import annotations

import doctest
import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = sorted(p for p in DOCS.rglob("*.md") if "screenshots" not in p.parts)
_FENCE = re.compile(r"(<!-- notest:[^>]*-->\s*\n)?```(python|pycon)[^\n]*\n(.*?)```", re.S)


def _hooks():
    spec = importlib.util.spec_from_file_location("sdelab_docs_hooks", DOCS / "hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _blocks(page: Path) -> list[tuple[str, str, int]]:
    """(language, code, line) of the page's blocks to run, in order."""
    text = page.read_text(encoding="utf-8")
    out = []
    for m in _FENCE.finditer(text):
        if m.group(1):  # marked as not run
            continue
        out.append((m.group(2), m.group(3), text[: m.start(2)].count("\n") + 1))
    return out


RUNNABLE = [p for p in PAGES if _blocks(p)]


def test_pages_have_code():
    names = {p.relative_to(DOCS).as_posix() for p in RUNNABLE}
    for page in (
        "tutorials/toy-2d.md",
        "tutorials/images.md",
        "tutorials/diffusers.md",
        "tutorials/vdm.md",
        "tutorials/discrete.md",
        "tutorials/controllable.md",
        "tutorials/ood.md",
        "how-to/likelihood-integrator.md",
        "concepts/bits-per-dim.md",
    ):
        assert page in names, f"{page} has no code block that runs"


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("page", RUNNABLE, ids=lambda p: p.relative_to(DOCS).as_posix())
def test_page_code_runs(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # blocks that write run folders write them here
    name = page.relative_to(DOCS).as_posix()
    namespace: dict = {"__name__": "docs"}
    runner = doctest.DocTestRunner(
        optionflags=doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS, verbose=False
    )
    parser = doctest.DocTestParser()
    for lang, code, line in _blocks(page):
        where = f"docs/{name}, block at line {line}"
        if lang == "python":
            try:
                exec(compile(code, where, "exec"), namespace)
            except Exception as e:  # name the block: the page is what needs fixing
                raise AssertionError(f"{where} failed: {e!r}\n{code}") from e
        else:
            test = parser.get_doctest(code, namespace, where, str(page), line)
            out: list[str] = []
            result = runner.run(test, out=out.append, clear_globs=False)
            assert result.failed == 0, f"{where}: the output shown is not what runs\n" + "".join(
                out
            )


def test_cli_reference_covers_every_command():
    from sdelab.cli import build_parser

    hooks = _hooks()
    page = hooks.cli_reference()
    for name in hooks._subparsers(build_parser()):
        assert f"## sdelab {name}\n" in page and f"usage: sdelab {name}" in page


def test_config_reference_covers_every_key():
    from sdelab.train.config import RunConfig

    page = _hooks().config_reference()
    for section, field in RunConfig.model_fields.items():
        for key in field.annotation.model_fields:
            assert f"| `{section}.{key}` |" in page, f"{section}.{key} is not in the reference"
    assert "| `optim.lr` | float | `0.001` | > 0 |" in page


def test_layers_reference_follows_pyproject():
    import tomllib

    page = _hooks().layers_reference()
    with open(ROOT / "pyproject.toml", "rb") as f:
        contracts = tomllib.load(f)["tool"]["importlinter"]["contracts"]
    for contract in contracts:
        assert f"## {contract['name']}" in page
        for layer in contract.get("layers", []):
            for module in layer.split(":"):
                assert f"`{module.strip()}`" in page


def test_nav_lists_every_page():
    """Every page is reachable from the navigation (mkdocs only notes orphans)."""
    nav = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    listed = set(re.findall(r"([\w./-]+\.md)\s*$", nav, re.M))
    missing = [p.relative_to(DOCS).as_posix() for p in PAGES]
    missing = [p for p in missing if p not in listed]
    assert not missing, f"pages not in mkdocs.yml's nav: {missing}"


_HISTORY = re.compile(r"\b(issue|session|item) \d+|\bissues? #?\d+", re.I)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(DOCS).as_posix())
def test_no_work_log_in_user_docs(page):
    bad = [
        f"line {i}: {ln.strip()}"
        for i, ln in enumerate(page.read_text(encoding="utf-8").splitlines(), 1)
        if _HISTORY.search(ln)
    ]
    assert not bad, f"docs/{page.relative_to(DOCS)} reads like a work log:\n" + "\n".join(bad)


BENCH_PAGES = sorted((DOCS / "benchmarks").glob("*.md"))


@pytest.mark.parametrize("page", BENCH_PAGES, ids=lambda p: p.name)
def test_benchmark_pages_say_command_date_machine(page):
    if page.name == "index.md":
        return
    text = page.read_text(encoding="utf-8")
    for word in ("Command", "Date", "Machine"):
        assert f"{word}:" in text or f"**{word}**" in text, f"{page.name} lacks its {word}"
