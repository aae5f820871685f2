"""The chaos run (issue 24): scripts/chaos.py, bounded, against ``serve --workers 2`` and gunicorn.

500 idle + 100 slowloris + legit clients; SIGHUP, SIGKILL of a worker, a lowered fd limit, a relay backend
whose connects hang, SIGTERM. What the script checks (and this test asserts through its report): no legit
request lost except those docs/operations/signals.md allows, no traceback in any output, every status
line adds up, exit status 0 after SIGTERM. ``AF_CHAOS_SECONDS`` sets the seconds per server (default 25).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_chaos_run_loses_no_legit_request_and_every_status_line_adds_up(tmp_path: Path) -> None:
    seconds = float(os.environ.get("AF_CHAOS_SECONDS", "25"))
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "chaos.py"), "--duration", str(seconds),
                          "--keep", str(tmp_path)], capture_output=True, text=True, timeout=2 * seconds + 300)
    assert out.stdout.strip(), out.stderr[-3000:]
    reports = json.loads(out.stdout)
    assert [r["server"] for r in reports] == ["serve", "gunicorn"]
    for report in reports:
        assert report["problems"] == [], json.dumps(report, indent=1)
        assert report["legit_ok"] > 0 and report["exit_status"] == 0
        assert [e.split(" ", 1)[1].split(" ")[0] for e in report["events"]] == [
            "SIGHUP", "SIGKILL", "fd", "fd", "SIGHUP", "SIGTERM"], report["events"]
    serve = reports[0]
    assert serve["fd_limit_reached"] and serve["status_lines"] > 0 and serve["status_lines_broken"] == 0
    assert out.returncode == 0
