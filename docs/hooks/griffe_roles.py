"""Griffe extension for the API reference: Sphinx roles in docstrings (``:class:`fasthess.X```) become code spans.

fasthess's docstrings use reST cross-reference roles; mkdocstrings renders Markdown, where they would show as
raw text. ``:role:`~a.b.C``` becomes ```C``` and ``:role:`a.b.C``` becomes ```a.b.C```.
"""
from __future__ import annotations

import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:py:)?(?:class|func|meth|mod|attr|data|exc|obj):`(~?)([^`]+)`")


def _code(match: re.Match) -> str:
    tilde, target = match.groups()
    return f"`{target.rsplit('.', 1)[-1] if tilde else target}`"


class SphinxRolesToCode(griffe.Extension):
    def on_object(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = _ROLE.sub(_code, obj.docstring.value)
