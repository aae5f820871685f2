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
    (tmp_path / "benchmarks.md").write_text(f"# x\n\n{report.START}\n{report.END}\n")
    assert report.main(["--results", str(tmp_path), "--page", str(tmp_path / "benchmarks.md"), "--no-plot"]) == 0
    text = (tmp_path / "benchmarks.md").read_text()
    assert "`httpready`, C core" in text and "Machine:" in text
    assert report.main(["--check", "--results", str(tmp_path), "--page", str(tmp_path / "benchmarks.md")]) == 0


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


def test_cpu_of_a_process_tree_and_of_the_machine() -> None:
    """What the slow-client benchmark divides by the requests: a parent's whole tree, and the machine."""
    import subprocess
    import time

    from bench.common import machine_busy_seconds, process_tree, tree_cpu_seconds

    spin = "import time\nend = time.process_time() + 0.5\nwhile time.process_time() < end: pass\ntime.sleep(60)"
    parent = subprocess.Popen([sys.executable, "-c", f"import subprocess, sys, time\n"
                               f"subprocess.Popen([sys.executable, '-c', {spin!r}]); time.sleep(60)"])
    try:
        deadline = time.monotonic() + 60
        while len(process_tree(parent.pid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        tree = process_tree(parent.pid)
        assert tree[0] == parent.pid and len(tree) == 2, tree
        machine_before = machine_busy_seconds()
        while tree_cpu_seconds(tree[1:]) < 0.5 and time.monotonic() < deadline:  # the grandchild spins 0.5 s
            time.sleep(0.05)
        assert tree_cpu_seconds(tree) >= 0.5
        assert machine_busy_seconds() - machine_before > 0  # the spinning showed up machine-wide too
        assert tree_cpu_seconds([tree[1], 2**22 + 7]) == tree_cpu_seconds([tree[1]])  # a gone pid counts 0
    finally:
        for pid in reversed(process_tree(parent.pid)):
            subprocess.run(["kill", str(pid)], check=False)
        parent.wait(10)


def test_paired_cpu_is_rendered() -> None:
    paired = {"base": "no-attack", "other": "no-attack-acceptfilter", "ratio_median": 0.98, "ratio_q1": 0.97,
              "ratio_q3": 0.99, "rps_other_median": 9800.0, "rps_base_median": 10000.0, "errors_other": 0,
              "cpu_us": {"no-attack": {"server": 100.0, "machine": 150.0},
                         "no-attack-acceptfilter": {"server": 102.0, "machine": 153.0}}}
    d = {"config": {"gunicorn": "g", "attack": "a", "wrk_connections": 16, "rounds": 1, "seconds_per_sample": 1.0,
                    "nginx": "n", "paired": "p"}, "results": {}, "paired": {"everyday_tax": paired}}
    text = "\n".join(report._slowclient(d))
    assert "**0.980x**" in text
    assert "the whole machine 153.0 against 150.0 µs (+2.0%), the server's processes 102.0 against 100.0 µs (+2.0%)" in text
