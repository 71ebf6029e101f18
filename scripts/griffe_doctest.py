"""A griffe extension for the documentation site (mkdocs.yml loads it): the package's
docstring examples (`>>>` lines and their output, which pytest runs as doctests) are shown as
Python console code blocks instead of being read as Markdown quotes."""

from __future__ import annotations

from typing import Any

import griffe


def fence_doctests(text: str) -> str:
    """Wrap each run of doctest lines (from a `>>>` line to the next blank line) in a
    ```pycon fence, at the run's indentation (tests/test_docs.py checks it)."""
    out: list[str] = []
    lines = text.split("\n")
    i = 0
    while i < len(lines):
        line = lines[i]
        stripped = line.lstrip()
        if stripped.startswith(">>>") and (i == 0 or not lines[i - 1].lstrip().startswith("```")):
            indent = line[: len(line) - len(stripped)]
            block = []
            while i < len(lines) and lines[i].strip():
                block.append(lines[i])
                i += 1
            out += [f"{indent}```pycon", *block, f"{indent}```"]
            continue
        out.append(line)
        i += 1
    return "\n".join(out)


class DoctestFences(griffe.Extension):
    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None and ">>>" in obj.docstring.value:
            obj.docstring.value = fence_doctests(obj.docstring.value)
