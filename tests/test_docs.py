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


def test_readme_is_short_and_its_links_resolve() -> None:
    """The README is an introduction (at most 250 lines) whose links into the docs lead somewhere."""
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", readme)
    local = [link for link in links if "://" not in link]
    assert len(local) >= 20, local
    missing = [link for link in local if not (ROOT / link).exists()]
    assert not missing, missing
    for command in ("./scripts/serve.sh", "./scripts/test.sh"):
        assert command in readme


def test_snippet_runner_fails_what_a_reader_would_see_fail(tmp_path: Path) -> None:
    """The runner passes a server that answers HTTP, and fails a NameError and a server that answers nothing."""
    page = tmp_path / "page.md"
    page.write_text('''
```python
import http.server

server = http.server.ThreadingHTTPServer(("127.0.0.1", 8000), http.server.SimpleHTTPRequestHandler)
server.serve_forever()
```

```python
print(Handler)
```

```python
import socket

sock = socket.create_server(("127.0.0.1", 8000))
while True:
    sock.accept()[0].close()
```

```python notest
this is not Python
```
''')
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "--markdown-docs", "-p", "tests.doc_snippets", "-p", "no:cacheprovider",
         "-q", "-o", "addopts=", "--rootdir", str(ROOT), str(page)],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert "2 failed, 1 passed" in out.stdout, out.stdout[-4000:]
    assert "NameError: name 'Handler' is not defined" in out.stdout
    assert "did not answer GET / with HTTP: b''" in out.stdout


def test_license_and_changelog() -> None:
    """LICENSE is the BSD-2-Clause text the metadata declares; CHANGELOG.md keeps a changelog and is in the site."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == "BSD-2-Clause"
    license_text = (ROOT / "LICENSE").read_text()
    assert license_text.startswith("BSD 2-Clause License") and "acceptfilter developers" in license_text
    assert license_text.count("Redistributions") == 2 and "Neither the name" not in license_text  # 2, not 3 clauses
    changelog = (ROOT / "CHANGELOG.md").read_text()
    assert "Keep a Changelog" in changelog
    assert changelog.index("## [Unreleased]") < changelog.index(f"## [{project['version']}]")
    assert '--8<-- "CHANGELOG.md"' in (DOCS / "changelog.md").read_text()
