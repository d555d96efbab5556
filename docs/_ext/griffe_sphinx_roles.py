"""Griffe extension: render Sphinx roles of skntk's numpy-style docstrings as inline code.

The docstrings are written for both ``help()`` and Sphinx-style readers (``:class:`FeatureBlocks```,
``:func:`~skntk.io.read_structures```). mkdocstrings does not know these roles; this extension turns
them into plain inline code (a leading ``~`` keeps only the last dotted component), so the API
reference shows ``FeatureBlocks`` instead of ``:class:`FeatureBlocks```.
"""

from __future__ import annotations

import re

import griffe

_ROLE = re.compile(r":(?:py:)?(?:class|func|meth|mod|attr|data|exc|obj|const|term):`(~?)([^`]+)`")


_DIRECTIVE = re.compile(r"^\.\. (warning|note)::", re.MULTILINE)


def _replace(match: re.Match) -> str:
    target = match.group(2).strip()
    if match.group(1):
        target = target.rsplit(".", 1)[-1]
    return f"`{target}`"


class SphinxRoles(griffe.Extension):
    def on_instance(self, *, obj: griffe.Object, **kwargs) -> None:  # noqa: ARG002
        if obj.docstring is not None:
            value = _ROLE.sub(_replace, obj.docstring.value)
            obj.docstring.value = _DIRECTIVE.sub(lambda m: f"**{m.group(1).title()}:**", value)

    def on_attribute_instance(self, *, attr: griffe.Attribute, **kwargs) -> None:  # noqa: ARG002
        """Sphinx-style ``#:`` comments above a module constant become its docstring."""
        if attr.docstring is not None or attr.lineno is None or attr.filepath is None:
            return
        try:
            lines = attr.lines_collection[attr.filepath]
        except KeyError:
            return
        comment, i = [], attr.lineno - 2
        while i >= 0 and lines[i].lstrip().startswith("#:"):
            comment.insert(0, lines[i].lstrip()[2:].removeprefix(" "))
            i -= 1
        if comment:
            attr.docstring = griffe.Docstring("\n".join(comment), parent=attr)
            attr.docstring.value = _ROLE.sub(_replace, attr.docstring.value)
