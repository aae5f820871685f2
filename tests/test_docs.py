"""The docs site builds with ``mkdocs build --strict``, and every ```python block in docs/ and the README runs.

The blocks run through pytest-markdown-docs in a child pytest, one per page, with the plugin in
tests/doc_snippets.py: a snippet that starts a server is sent a request and stopped with Ctrl-C,
as a reader trying it would. Fragments say so in their info string (```` ```python notest ````).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = [*sorted(p.relative_to(ROOT).as_posix() for p in DOCS.rglob("*.md")), "README.md"]
# A fence whose info string starts with a Python language name (what pytest-markdown-docs runs).
PY_FENCE = re.compile(r"^[ \t]*(`{3,}|~{3,})(py|python|python3)\b(?P<options>[^\n]*)$", re.M)


def runnable_blocks(page: str) -> int:
    text = (ROOT / page).read_text()
    return sum("notest" not in m["options"].split() for m in PY_FENCE.finditer(text))


def test_mkdocs_build_strict(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                         cwd=ROOT, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert out.returncode == 0, out.stdout + out.stderr
    site = tmp_path / "site"
    cli = (site / "reference" / "cli" / "index.html").read_text()
    assert "acceptfilter serve" in cli and "--on-timeout" in cli, "the CLI reference was not generated"
    api = (site / "reference" / "api" / "index.html").read_text()
    assert "FilteredListener" in api and "Builder" in api, "the API reference was not generated"
    assert (site / "assets" / "bench.png").exists()
    assert "python notest" not in (site / "writing-filters" / "matchers" / "index.html").read_text()


def test_every_page_is_in_the_nav() -> None:
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())

    def pages(node: object) -> list[str]:
        if isinstance(node, str):
            return [node]
        if isinstance(node, list):
            return [p for item in node for p in pages(item)]
        if isinstance(node, dict):
            return [p for v in node.values() for p in pages(v)]
        return []

    listed = set(pages(config["nav"]))
    on_disk = {p.removeprefix("docs/") for p in PAGES if p.startswith("docs/")}
    assert on_disk == listed, (sorted(on_disk - listed), sorted(listed - on_disk))


@pytest.mark.parametrize("page", [p for p in PAGES if runnable_blocks(p)])
def test_python_blocks_run_as_pasted(page: str) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "--markdown-docs", "-p", "tests.doc_snippets", "-p", "no:cacheprovider",
         "-q", "-o", "addopts=", "--rootdir", str(ROOT), page],
        cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-3000:]
    assert f"{runnable_blocks(page)} passed" in out.stdout, out.stdout[-3000:]


def test_fragments_are_marked_and_snippet_options_are_known() -> None:
    """Every Python fence is runnable, or a fragment marked ``notest``: no other words are silently ignored."""
    known = {"notest", "continuation"}
    for page in PAGES:
        for m in PY_FENCE.finditer((ROOT / page).read_text()):
            unknown = set(m["options"].split()) - known
            assert not unknown, f"{page}: unknown fence options {unknown} in {m.group(0)!r}"
