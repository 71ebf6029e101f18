"""The documentation: the site builds under `mkdocs build --strict` (a broken link, a missing
anchor or a page left out of the nav fails it), the API page covers the public surface, and
the README stays short, links only to files that exist, and shows CI's commands."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import precision_doctor

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
MAX_README_LINES = 160
MAX_IMAGE_BYTES = 300_000
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def relative_links(path: Path) -> list[str]:
    """The link targets in a Markdown file that point into the repository (not URLs, not
    anchors of the page itself), outside code blocks."""
    text = re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.S)
    return [t for t in LINK.findall(text) if not re.match(r"^[a-z][a-z0-9+.-]*:", t) and not t.startswith("#")]


def test_relative_links_finds_links(tmp_path: Path) -> None:
    # Guards the link check against passing vacuously.
    md = tmp_path / "x.md"
    md.write_text('[a](docs/a.md) ![b](img/b.png "t") [c](https://x.org) [d](#top)\n```\n[e](no.md)\n```\n')
    assert relative_links(md) == ["docs/a.md", "img/b.png"]


def test_readme_is_short() -> None:
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= MAX_README_LINES, f"README.md has {len(lines)} lines; the detail belongs in docs/"


@pytest.mark.parametrize("name", ["README.md", "CONTRIBUTING.md", "CHANGELOG.md"])
def test_relative_links_resolve(name: str) -> None:
    path = ROOT / name
    links = relative_links(path)
    if name == "README.md":
        assert len(links) >= 10  # the docs pages, the screenshot, LICENSE, ...
    missing = [t for t in links if not (path.parent / t.split("#")[0]).exists()]
    assert not missing, f"{name} links to files that do not exist: {missing}"


def test_readme_images_are_small() -> None:
    images = [t for t in relative_links(README) if t.lower().endswith((".png", ".jpg", ".jpeg", ".gif", ".svg"))]
    assert images, "the README shows the app"
    for t in images:
        size = (ROOT / t).stat().st_size
        assert size < MAX_IMAGE_BYTES, f"{t} is {size} bytes"


def test_readme_shows_ci_commands() -> None:
    """The README's test commands are CI's: every check `.ci/run` runs after installing."""
    readme = README.read_text(encoding="utf-8")
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    checks = [
        line for line in ci if line and not line.startswith(("#", "set ", "cd ", "export ", "python -m pip", "bash "))
    ]
    assert {"ruff check .", "mypy", "python -m pytest"} <= set(checks)
    assert any(c.startswith("mkdocs build --strict") for c in checks)
    missing = [c for c in checks if c not in readme]
    assert not missing, f".ci/run runs {missing}, which the README does not show"
    assert "bash .ci/install_browser.sh" in readme and "root" in readme


def test_api_page_covers_the_public_surface() -> None:
    api = (ROOT / "docs" / "api.md").read_text(encoding="utf-8")
    documented = set(re.findall(r"^::: precision_doctor\.(\w+)", api, flags=re.M))
    public = set(precision_doctor.__all__) - {"__version__"}
    assert public - documented == set(), "public names missing from docs/api.md"
    assert documented - public == set(), "docs/api.md documents names outside precision_doctor.__all__"


def test_doctest_fences() -> None:
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        pytest.importorskip("griffe", reason="pip install -e '.[docs]'")
        from griffe_doctest import fence_doctests
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    text = "Text.\n\n>>> x = 1\n>>> x + 1\n2\n\nMore:\n\n    >>> f()\n    ...\n"
    assert fence_doctests(text) == (
        "Text.\n\n```pycon\n>>> x = 1\n>>> x + 1\n2\n```\n\nMore:\n\n    ```pycon\n    >>> f()\n    ...\n    ```\n"
    )
    assert fence_doctests("no examples") == "no examples"


@pytest.mark.slow
def test_mkdocs_build_strict(tmp_path: Path) -> None:
    pytest.importorskip("mkdocs", reason="pip install -e '.[docs]'")
    pytest.importorskip("material", reason="pip install -e '.[docs]'")
    pytest.importorskip("mkdocstrings_handlers.python", reason="pip install -e '.[docs]'")
    site = tmp_path / "site"
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    pages = {p.relative_to(site).as_posix() for p in site.rglob("index.html")}
    expected = {f"{p.stem}/index.html" for p in (ROOT / "docs").glob("*.md") if p.stem != "index"}
    assert expected <= pages, f"pages not built: {sorted(expected - pages)}"
    api = (site / "api" / "index.html").read_text(encoding="utf-8")
    # mkdocstrings rendered the docstrings, not just the headings.
    assert "Analyze one training step" in api
    assert "When a statistic becomes a flag" in api
    # Docstring examples are highlighted console code (scripts/griffe_doctest.py), not quotes.
    assert '<span class="gp">&gt;&gt;&gt; </span>' in api
    assert "<blockquote>" not in api
    assert (site / "images" / "app.png").exists()
