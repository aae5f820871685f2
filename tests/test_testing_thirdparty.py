"""A third-party filter from a test file: fuzzed with one call, one fixture line and one CLI command."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from acceptfilter.testing import check_filter
from tests.thirdparty_filter import HelloReady

TESTS = Path(__file__).parent
CLI = [sys.executable, "-m", "acceptfilter.cli"]


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=120, cwd=TESTS.parent, env=env)


def test_one_call() -> None:
    check_filter(HelloReady(), max_examples=100)


def test_one_fixture_line(filter_checker: Callable[..., None]) -> None:
    filter_checker(HelloReady(max_bytes=32), max_examples=100)


def test_one_cli_command() -> None:
    proc = run_cli("fuzz", "--import", "tests/thirdparty_filter.py", "helloready", "--examples", "100")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "ok    helloready" in proc.stdout


def test_cli_reports_counterexample() -> None:
    proc = run_cli("fuzz", "--import", "tests/broken_filters.py", "broken-final", "--examples", "100")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "FAIL  broken-final: [final-wait]" in proc.stdout
    assert "Traceback" not in proc.stderr


def test_cli_all_builtins() -> None:
    proc = run_cli("fuzz", "all", "--examples", "30")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "ok    httpready" in proc.stdout and "ok    dataready" in proc.stdout


def test_cli_unknown_name_is_clear() -> None:
    proc = run_cli("fuzz", "nosuchfilter")
    assert proc.returncode == 2
    assert "unknown filter 'nosuchfilter'" in proc.stderr and "Traceback" not in proc.stderr


def test_cli_bad_import_is_clear() -> None:
    proc = run_cli("fuzz", "--import", "no_such_module_xyz", "dataready")
    assert proc.returncode == 2
    assert "--import no_such_module_xyz failed" in proc.stderr and "Traceback" not in proc.stderr


def test_docs_example_runs(tmp_path: Path) -> None:
    """The docs' "Testing and fuzzing a filter" example is a working test file."""
    page = (TESTS.parent / "docs" / "writing-filters" / "testing.md").read_text()
    code = page.split("```python\n", 1)[1].split("```", 1)[0]
    (tmp_path / "test_hello.py").write_text(code)
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--filter-examples", "30", "test_hello.py"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "2 passed" in proc.stdout


def test_pytest_plugin_is_import_light() -> None:
    """Every pytest run of every project imports the plugin: it must not pull in hypothesis."""
    code = "import sys, acceptfilter.testing.pytest_plugin; print('hypothesis' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.stdout.strip() == "False", proc.stdout + proc.stderr


def test_cli_all_names_filters_it_cannot_build(tmp_path: Path) -> None:
    """'fuzz all' cannot guess required arguments: it says so per filter instead of skipping silently."""
    plugin = tmp_path / "needs_arg.py"
    plugin.write_text(
        "from acceptfilter import ACCEPT, Filter\n"
        "class NeedsArg(Filter):\n"
        "    name = 'needsarg'\n"
        "    def __init__(self, *, word: str = '', max_bytes: int = 16384, timeout: float | None = None) -> None:\n"
        "        super().__init__(max_bytes=max_bytes, timeout=timeout)\n"
        "        if not word:\n"
        "            raise ValueError('needsarg needs word=...')\n"
        "    def check(self, data, final):\n"
        "        return ACCEPT\n"
    )
    proc = run_cli("fuzz", "--import", str(plugin), "all", "--examples", "20")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "skip  needsarg: cannot build it without arguments" in proc.stdout
    skipped = sum(line.startswith("skip  ") for line in proc.stdout.splitlines())
    assert skipped >= 1 and f"{skipped} skipped" in proc.stdout  # every skip is named and counted
    proc = run_cli("fuzz", "--import", str(plugin), "needsarg:word=hi", "--examples", "20")
    assert proc.returncode == 0 and "ok    needsarg:word=hi" in proc.stdout, proc.stdout + proc.stderr


def test_cli_all_goes_on_past_a_broken_plugin(tmp_path: Path) -> None:
    """Issue 15, item 6: one plugin that fails to import is reported; every other filter is still fuzzed."""
    site = tmp_path / "site"
    dist = site / "brokenplugin-1.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: brokenplugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[acceptfilter.filters]\nbrokenready = brokenplugin:BrokenReady\n")
    (site / "brokenplugin.py").write_text("import no_such_dependency_xyz\n")
    env = {**os.environ, "PYTHONPATH": str(site), "PYTHONDONTWRITEBYTECODE": "1"}
    proc = subprocess.run([*CLI, "fuzz", "all", "--examples", "20"], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path, env=env)
    assert proc.returncode == 1, proc.stdout + proc.stderr  # a broken plugin is a failure, but not a stop
    assert "BROKEN brokenready: filter 'brokenready' from brokenplugin 1.0 failed to load" in proc.stdout
    assert "ok    httpready" in proc.stdout and "ok    dataready" in proc.stdout
    assert "1 broken (failed to load)" in proc.stdout and "Traceback" not in proc.stderr


def test_cli_payloads_file_seeds_the_fuzzer(tmp_path: Path) -> None:
    """--payloads FILE: escaped seeds, one a line, added to the built-in inputs (here they reach the bug)."""
    seeds = tmp_path / "seeds.txt"
    seeds.write_text("# greetings\nHELLO bob\\n\nHELLO \\x00\\xff\\n\n")
    plugin = tmp_path / "picky.py"
    plugin.write_text(
        "from acceptfilter import ACCEPT, REJECT, WAIT, Filter\n"
        "class Picky(Filter):\n"
        "    name = 'picky'\n"
        "    def check(self, data, final):\n"
        "        if data.startswith(b'HELLO ') and b'\\n' in data:\n"
        "            data.split(b' ')[1].decode('ascii')  # planted: raises on a non-ASCII name\n"
        "            return ACCEPT\n"
        "        return REJECT if final or len(data) >= self.max_bytes or not b'HELLO '.startswith(data[:6]) else WAIT\n"
    )
    proc = run_cli("fuzz", "--import", str(plugin), "--payloads", str(seeds), "picky", "--examples", "300")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "FAIL  picky: [raises]" in proc.stdout and "UnicodeDecodeError" in proc.stdout
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n")
    proc = run_cli("fuzz", "--payloads", str(empty), "dataready")
    assert proc.returncode == 2 and "no payloads in it" in proc.stderr
