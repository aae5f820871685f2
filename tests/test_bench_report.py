"""The docs' benchmark numbers (docs/benchmarks.md) are what the committed JSON renders (bench/report.py --check)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import report  # noqa: E402


def test_docs_block_matches_the_committed_results() -> None:
    out = subprocess.run([sys.executable, "bench/report.py", "--check"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_check_fails_when_the_block_was_edited_by_hand(tmp_path: Path) -> None:
    page = (ROOT / "docs" / "benchmarks.md").read_text()
    edited = page.replace(report.END, "| a number typed by hand |\n" + report.END)
    (tmp_path / "benchmarks.md").write_text(edited)
    assert report.main(["--check", "--page", str(tmp_path / "benchmarks.md")]) == 1


def test_the_one_command_is_documented() -> None:
    page = (ROOT / "docs" / "benchmarks.md").read_text()
    assert "./scripts/bench.sh" in page and "./scripts/bench.sh --quick" in page
    assert (ROOT / "scripts" / "bench.sh").stat().st_mode & 0o111
