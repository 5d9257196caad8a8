"""MkDocs hooks: the reference pages that are generated from the code, so they cannot drift.

- ``reference/cli.md``: ``sdelab CMD --help`` of every command, from the argparse parsers;
- ``reference/config.md``: every key of the run config, its type, default and validation, from
  the pydantic schema (``sdelab.train.config``);
- ``reference/layers.md``: the package's layers and import rules, from pyproject.toml's
  import-linter contracts.

``mkdocs.yml`` names this file under ``hooks:``; ``tests/test_docs.py`` imports it to check the
pages. The functions return Markdown; nothing is written to ``docs/``.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import types
import typing
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT / "src") not in sys.path:  # build from the checkout's sources, installed or not
    sys.path.insert(0, str(ROOT / "src"))

#: generated page -> the function that writes it
GENERATED = {
    "reference/cli.md": "cli_reference",
    "reference/config.md": "config_reference",
    "reference/layers.md": "layers_reference",
}


# ---------------------------------------------------------------- command line


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def cli_reference() -> str:
    """``sdelab --help`` and ``sdelab CMD --help`` for every command, as argparse prints them."""
    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "100"  # argparse wraps at the terminal width: make it fixed
    try:
        from sdelab.cli import build_parser

        parser = build_parser()
        commands = _subparsers(parser)
        out = [
            "# Command line",
            "",
            "Generated from the argparse parsers of `sdelab.cli` when the site is built: this is "
            "what `sdelab --help` and `sdelab CMD --help` print. Errors are one line on stderr "
            "with exit code 2; `sdelab --debug CMD` shows the traceback instead.",
            "",
            "| command | what it does |",
            "|---|---|",
        ]
        for name, sub in commands.items():
            line = (sub.description or "").strip().split("\n")[0].rstrip(".")
            out.append(f"| [`sdelab {name}`](#sdelab-{name}) | {line} |")
        out += ["", "## sdelab", "", "```text", parser.format_help().rstrip(), "```", ""]
        for name, sub in commands.items():
            out += [f"## sdelab {name}", "", "```text", sub.format_help().rstrip(), "```", ""]
        return "\n".join(out)
    finally:
        if old is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = old


# ---------------------------------------------------------------- config


def _type_name(annotation) -> str:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Literal:
        return " \\| ".join(repr(a).replace("'", "") for a in args)
    if origin in (typing.Union, types.UnionType):
        return " \\| ".join(_type_name(a) for a in args)
    if origin is not None:
        inner = ", ".join(_type_name(a) for a in args if a is not Ellipsis)
        return f"{getattr(origin, '__name__', str(origin))}[{inner}]"
    if annotation is type(None):
        return "null"
    return getattr(annotation, "__name__", str(annotation))


_BOUNDS = {"ge": "≥", "gt": ">", "le": "≤", "lt": "<", "multiple_of": "multiple of"}


def _constraints(field) -> list[str]:
    rules = []
    for meta in field.metadata:
        for attr, sign in _BOUNDS.items():
            value = getattr(meta, attr, None)
            if value is not None:
                rules.append(f"{sign} {value:g}" if attr != "multiple_of" else f"{sign} {value}")
        for attr, word in (("min_length", "at least"), ("max_length", "at most")):
            value = getattr(meta, attr, None)
            if value is not None:
                rules.append(f"{word} {value} items")
    return rules


def _choices() -> dict[str, list[str]]:
    """Keys whose values come from a registry in the code, checked by a validator."""
    from sdelab.data import DATASETS
    from sdelab.losses import SECOND_ORDER_FORMS, TIME_SAMPLERS, WEIGHTINGS
    from sdelab.nets.embeddings import TIME_EMBEDDINGS
    from sdelab.parametrization import KINDS
    from sdelab.samplers import SAMPLERS
    from sdelab.sde import SCHEDULES

    return {
        "data.name": list(DATASETS),
        "sde.name": list(SCHEDULES),
        "model.embedding": list(TIME_EMBEDDINGS),
        "loss.parametrization": list(KINDS),
        "loss.weighting": list(WEIGHTINGS),
        "loss.time_sampling": list(TIME_SAMPLERS),
        "loss.second_order_form": list(SECOND_ORDER_FORMS),
        "eval.sampler": [*SAMPLERS, "chain", "null"],
    }


def _default(field) -> str:
    if field.default_factory is not None:
        value = field.default_factory()
    else:
        value = field.default
    if value is None:
        return "`null`"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, tuple):
        value = list(value)
    return f"`{value}`"


def _docstring(cls) -> str:
    import inspect

    return " ".join(inspect.getdoc(cls).split()).replace("``", "`")


def _data_option_keys() -> str:
    """The option keys each kind of data set takes (from the dataset factories' signatures)."""
    from sdelab.data import DATASETS, dataset_options

    groups: dict[tuple[str, ...], list[str]] = {}
    for name in DATASETS:
        groups.setdefault(tuple(dataset_options(name)), []).append(name)
    parts = []
    for keys, names in groups.items():
        listed = ", ".join(f"`{k}`" for k in keys) or "none"
        shown = names if len(names) <= 3 else names[:2] + ["…"]
        parts.append(f"{'/'.join(shown)}: keys {listed}")
    return "; ".join(parts)


def config_reference() -> str:
    """Every key of :class:`sdelab.train.config.RunConfig` with type, default and checks."""
    from sdelab.train.config import EVAL_OPTIONS, RunConfig

    choices = _choices()
    out = [
        "# Run configuration",
        "",
        "Generated from the pydantic schema in `sdelab/train/config.py` when the site is built. "
        "A config is a YAML file with these seven sections; every key is optional and a file "
        "names only what it changes. On the command line, `KEY=VALUE` with a dotted key "
        "overrides any of them (`optim.lr=3e-4`, `sde.kwargs.beta_max=10`); values are YAML "
        "scalars. An unknown key or a bad value is a one-line error naming the key and the "
        "valid choices; `sdelab train CONFIG --dry-run` prints the resolved config.",
        "",
    ]
    for section, sfield in RunConfig.model_fields.items():
        cls = sfield.annotation
        out += [f"## `{section}`", "", _docstring(cls), ""]
        out += ["| key | type | default | validation |", "|---|---|---|---|"]
        for key, field in cls.model_fields.items():
            dotted = f"{section}.{key}"
            rules = _constraints(field)
            if dotted in choices:
                rules.append("one of " + ", ".join(f"`{c}`" for c in choices[dotted]))
            if dotted == "eval.options":
                rules.append("keys " + ", ".join(f"`{k}`" for k in EVAL_OPTIONS))
            if dotted == "data.options":
                rules.append(_data_option_keys())
            out.append(
                f"| `{dotted}` | {_type_name(field.annotation)} | {_default(field)} | "
                f"{'; '.join(rules) or '—'} |"
            )
        out.append("")
    out += [
        "Checks that involve several keys (e.g. `loss.objective: vdm` needs "
        "`loss.weighting: likelihood` and a VDM schedule, `ddpm` needs `sde.name: vp`, "
        "`train.batch_size` must divide by `train.grad_accum`) are made when the config is "
        "loaded, each a one-line `ConfigError` naming the fix.",
        "",
    ]
    return "\n".join(out)


# ---------------------------------------------------------------- layers


def _first_line(module: str) -> str:
    try:
        doc = importlib.import_module(module).__doc__ or ""
    except ImportError as e:  # a contract naming a module that does not exist is a bug
        raise RuntimeError(f"pyproject.toml's import-linter contract names {module}: {e}") from e
    para = doc.strip().split("\n\n")[0]
    return " ".join(para.split()).replace("``", "`").replace("|", "\\|")


def layers_reference() -> str:
    """The import-linter contracts of pyproject.toml, with each module's first docstring line."""
    with open(ROOT / "pyproject.toml", "rb") as f:
        config = tomllib.load(f)["tool"]["importlinter"]
    out = [
        "# Package layers",
        "",
        "Generated from the import-linter contracts in `pyproject.toml` when the site is built; "
        "`lint-imports` (run by `make test` and `make lint`) enforces them. The rule: a module "
        "either computes on `(score_fn, schedule, tensors)` or handles configs and run folders, "
        "never both, and imports only point down. Modules on one row are independent of each "
        "other.",
        "",
    ]
    for contract in config["contracts"]:
        out += [f"## {contract['name']}", ""]
        if contract["type"] == "layers":
            containers = contract.get("containers", [""])
            for container in containers:
                if container:  # layers named relative to a package
                    out += [f"Inside `{container}`:", ""]
                out += ["| layer (top first) | module | what it is |", "|---:|---|---|"]
                for i, layer in enumerate(contract["layers"], 1):
                    for module in (m.strip() for m in layer.split(":")):
                        full = f"{container}.{module}" if container else module
                        out.append(f"| {i} | `{module}` | {_first_line(full)} |")
                out.append("")
        elif contract["type"] == "forbidden":
            src = ", ".join(f"`{m}`" for m in contract["source_modules"])
            bad = ", ".join(f"`{m}`" for m in contract["forbidden_modules"])
            out.append(f"{src} must not import {bad}.")
        else:
            out.append(f"A `{contract['type']}` contract (see `pyproject.toml`).")
        out.append("")
    return "\n".join(out)


# ---------------------------------------------------------------- MkDocs hooks


def on_files(files, config):
    from mkdocs.structure.files import File

    for path, func in GENERATED.items():
        files.append(File.generated(config, path, content=globals()[func]()))
    return files
