"""Issue 15, item 3: five bugs a first RESP filter had, each found by a plain `acceptfilter fuzz NAME` in 30 s.

The filter declares its ``examples`` (tests/planted_filters.py); nothing else is passed on
the command line. Each run starts in a fresh directory, so no hypothesis database from an
earlier run can hand it the answer.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.planted_filters import PLANTED

TESTS = Path(__file__).parent
BUDGET = 30.0  # seconds, from the issue: a plain fuzz run must find each bug within this


def fuzz(name: str, cwd: Path) -> tuple[subprocess.CompletedProcess[str], float]:
    env = {**os.environ, "PYTHONPATH": str(TESTS.parent), "PYTHONDONTWRITEBYTECODE": "1"}
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "acceptfilter.cli", "fuzz", "--import", str(TESTS / "planted_filters.py"), name],
                          capture_output=True, text=True, timeout=BUDGET * 4, cwd=cwd, env=env)
    return proc, time.monotonic() - start


@pytest.mark.parametrize(("name", "invariant"), sorted(PLANTED.items()))
def test_plain_fuzz_finds_the_planted_bug(name: str, invariant: str, tmp_path: Path) -> None:
    proc, took = fuzz(name, tmp_path)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert f"FAIL  {name}: [{invariant}]" in proc.stdout, proc.stdout
    assert "Traceback" not in proc.stderr
    assert took < BUDGET, f"found, but after {took:.1f}s"


def test_the_filter_without_a_bug_passes(tmp_path: Path) -> None:
    proc, _ = fuzz("respready", tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "ok    respready: 1000 examples" in proc.stdout
