"""A griffe extension: the package's docstrings, as written for ``help()``, read well on the site.

- Sphinx roles (:class:`~a.b.C`, :func:`f`, ...) become code spans (``C``, ``f``);
- an argument line that documents several parameters at once (``scale, shift: the map ...``)
  becomes one entry per parameter, so the Google-style parser checks each against the
  signature (a documented parameter that does not exist still fails ``mkdocs build --strict``).
"""

from __future__ import annotations

import re

import griffe

_ROLE = re.compile(r":(?:py:)?(?:class|func|meth|mod|data|attr|exc|obj|const):`(~?)([^`]+)`")
_GROUP = re.compile(r"^(\s+)(\*{0,2}\w+(?:, \*{0,2}\w+)+):(\s.*)?$")
_SECTION = re.compile(r"^\s*(Args|Arguments|Parameters|Attributes):\s*$")


def _role(match: re.Match) -> str:
    target = match.group(2)
    return f"`{target.rsplit('.', 1)[-1] if match.group(1) else target}`"


def _split_groups(text: str) -> str:
    lines = text.split("\n")
    out: list[str] = []
    in_args = False
    for line in lines:
        if _SECTION.match(line):
            in_args = True
        elif line.strip() and not line.startswith((" ", "\t")):
            in_args = False
        m = _GROUP.match(line) if in_args else None
        if m:
            indent, names, rest = m.group(1), m.group(2).split(", "), (m.group(3) or "")
            for other in names[1:]:
                out.append(f"{indent}{other}: see `{names[0]}`.")
            out.append(f"{indent}{names[0]}:{rest}")
        else:
            out.append(line)
    return "\n".join(out)


class SphinxRoles(griffe.Extension):
    def on_instance(self, *, obj, **kwargs) -> None:
        if obj.docstring is None:
            return
        text = _ROLE.sub(_role, obj.docstring.value).replace("``", "`")
        text = text.replace(".. code-block:: yaml", "")
        obj.docstring.value = _split_groups(text)
