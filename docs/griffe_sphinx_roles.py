"""A griffe extension: the docstrings' Sphinx roles (:class:`~a.b.C`, :func:`f`, ...) as code.

The package's docstrings are read by Python's ``help()`` too, so they keep their Sphinx roles;
on the site these become code spans (``C``, ``f``) instead of literal ``:class:`` text.
"""

from __future__ import annotations

import re

import griffe

_ROLE = re.compile(r":(?:py:)?(?:class|func|meth|mod|data|attr|exc|obj|const):`~?([^`]+)`")


def _short(match: re.Match) -> str:
    target = match.group(1)
    if match.group(0).split("`")[1].startswith("~"):
        target = target.rsplit(".", 1)[-1]
    return f"`{target}`"


class SphinxRoles(griffe.Extension):
    def on_instance(self, *, obj, **kwargs) -> None:
        if obj.docstring is not None:
            text = _ROLE.sub(_short, obj.docstring.value)
            text = text.replace("``", "`")
            obj.docstring.value = text.replace(".. code-block:: yaml", "")
