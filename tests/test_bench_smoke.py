"""The benchmark code paths still run and produce sane JSON (small counts, own client, no wrk)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import machine, overhead, report, surface  # noqa: E402
from bench.common import parse_wrk, write_result  # noqa: E402


def test_overhead_runs_and_renders(tmp_path: Path) -> None:
    result = overhead.run(quick=True, client="python", modes=["plain", "httpready-c"], rounds=1, seconds=0.5)
    res = result["results"]
    for mode in ("plain", "httpready-c"):
        assert res[mode]["conn_per_s"] > 50, res
        assert res[mode]["errors"] == 0, res
    assert res["plain"]["ratio_to_plain"] == pytest.approx(1.0)
    write_result("overhead", {"benchmark": "overhead", "quick": True, "date": "2000-01-01",
                              "machine": machine.facts(), **result}, tmp_path)
    json.loads((tmp_path / "overhead.json").read_text())
    (tmp_path / "README.md").write_text(f"# x\n\n{report.START}\n{report.END}\n")
    assert report.main(["--results", str(tmp_path), "--readme", str(tmp_path / "README.md"), "--no-plot"]) == 0
    text = (tmp_path / "README.md").read_text()
    assert "`httpready`, C core" in text and "Machine:" in text
    assert report.main(["--check", "--results", str(tmp_path), "--readme", str(tmp_path / "README.md")]) == 0


def test_surface_measures_both_sides() -> None:
    d = surface.measure("httpready-c", rate=200, count=20)
    assert len(d["accept_ns"]) == 20 and d["errors"] == 0
    assert all(0 < a <= r < 5e9 for a, r in zip(d["accept_ns"], d["read_ns"], strict=True))


def test_wrk_output_is_parsed() -> None:
    out = """Running 2s test @ http://127.0.0.1:1/
  Latency Distribution
     50%  410.00us
     75%  1.20ms
     99%    2.50ms
  24000 requests in 2.00s, 1.2MB read
  Socket errors: connect 0, read 3, write 0, timeout 2
  Non-2xx or 3xx responses: 4
Requests/sec:  12000.50
"""
    r = parse_wrk(out)
    assert r["requests"] == 24000 and r["rps"] == 12000.5
    assert r["p50_ms"] == pytest.approx(0.41) and r["p99_ms"] == pytest.approx(2.5)
    assert r["errors"] == 9 and r["timeouts"] == 2 and r["non_2xx"] == 4
