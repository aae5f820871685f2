"""bench/workercpu.py: the processes it tells apart, the paired arithmetic and the benchmark page's lines.

The benchmark itself needs wrk (``./scripts/bench.sh`` installs it); these checks run a real
gunicorn with the acceptfilter integration and drive it with the benchmarks' own Python client.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import report, workercpu  # noqa: E402
from bench.common import free_port, process_tree, py_load  # noqa: E402
from bench.slowclient import start_gunicorn, stop, wait_port  # noqa: E402


@pytest.mark.parametrize("protected", [False, True], ids=["plain", "acceptfilter"])
def test_cpu_is_split_into_workers_arbiter_and_filter_process(tmp_path: Path, protected: bool) -> None:
    port = free_port()
    proc = start_gunicorn(port, protected, tmp_path)
    try:
        assert wait_port(port, timeout=60), (tmp_path / f"gunicorn-{port}.log").read_text()
        want = 4 + (1 if protected else 0)  # 4 sync workers, and the filter process if protected
        deadline = time.monotonic() + 60
        while len(process_tree(proc.pid)) - 1 < want and time.monotonic() < deadline:
            time.sleep(0.1)
        parts = [workercpu.part_of(proc.pid, pid) for pid in process_tree(proc.pid)]
        assert sorted(parts) == sorted(["arbiter"] + ["workers"] * 4 + ["filter_process"] * (1 if protected else 0))

        before = workercpu.cpu_by_part(proc.pid)
        served = 0
        while time.monotonic() < deadline:  # until the workers' CPU has moved by a few clock ticks
            got = py_load("127.0.0.1", port, seconds=5, concurrency=4, max_requests=300)
            assert got["errors"] == 0, got
            served += got["requests"]
            if workercpu.cpu_by_part(proc.pid)["workers"] - before["workers"] >= 0.05:
                break
        after = workercpu.cpu_by_part(proc.pid)
        assert after["workers"] - before["workers"] >= 0.05, (served, before, after)
        assert after["server"] == pytest.approx(after["workers"] + after["arbiter"] + after["filter_process"])
        assert after["arbiter"] >= before["arbiter"] and after["filter_process"] >= before["filter_process"]
        if not protected:
            assert after["filter_process"] == 0.0
    finally:
        stop(proc)


def _sample(rps: float, workers: float, machine: float) -> dict[str, Any]:
    return {"rps": rps, "requests": int(rps), "errors": 0, "processes": {"workers": 4, "filter_process": 0},
            "cpu_us": {"workers": workers, "arbiter": 0.0, "filter_process": 0.0, "server": workers,
                       "machine": machine}}


def test_summary_pairs_the_set_ups_within_each_start() -> None:
    # Three starts; per start a set-up's value is the mean of all its samples (two instances here).
    blocks = [
        {"plain": [[_sample(100, 100, 150)], [_sample(100, 102, 150)]],
         "acceptfilter": [[_sample(97, 103, 153)], [_sample(97, 105, 153)]]},
        {"plain": [[_sample(100, 110, 150)], [_sample(100, 104, 150)]],
         "acceptfilter": [[_sample(98, 112, 153)], [_sample(98, 110, 153)]]},
        {"plain": [[_sample(100, 100, 150), _sample(100, 100, 150)]],
         "acceptfilter": [[_sample(99, 104, 153), _sample(99, 100, 153)]]},
    ]
    r = workercpu.summarize(blocks)
    assert r["starts"] == 3
    # start means: plain 101, 107, 100; acceptfilter 104, 111, 102 -> differences 3, 4, 2
    diff = r["difference_us"]["workers"]
    assert diff["starts"] == [3.0, 4.0, 2.0]
    assert diff["median"] == pytest.approx(3.0)
    assert (diff["q1"], diff["q3"]) == (pytest.approx(2.0), pytest.approx(4.0))  # nearest rank
    assert r["difference_us"]["machine"]["median"] == pytest.approx(3.0)
    assert r["difference_us"]["filter_process"]["median"] == 0.0
    assert r["ratio"]["rps"]["median"] == pytest.approx(0.98)
    assert r["ratio"]["workers"]["median"] == pytest.approx(104 / 101)
    assert r["setups"]["plain"]["instances_workers_cpu_us_median"] == [100, 102, 110, 104, 100]
    assert r["setups"]["acceptfilter"]["samples"] == 6


def test_the_readme_lines() -> None:
    blocks = [{"plain": [[_sample(10_000, 110.0, 160.0)] * 3], "acceptfilter": [[_sample(9_900, 112.6, 163.4)] * 3]},
              {"plain": [[_sample(10_000, 108.0, 160.0)] * 3], "acceptfilter": [[_sample(9_900, 110.6, 163.4)] * 3]}]
    d = {"config": {"gunicorn": "sync x4", "wrk_connections": 16, "seconds_per_sample": 3.0,
                    "method": "two starts"}, "results": workercpu.summarize(blocks)}
    text = "\n".join(report._workercpu(d))
    assert "| the workers | 109.0 | 111.6 | +2.6 (+2.6 to +2.6) | 1.024x |" in text
    assert "| the whole machine (wrk included) | 160.0 | 163.4 | +3.4 (+3.4 to +3.4) | 1.021x |" in text
    assert "| the filter process | 0.0 | 0.0 | +0.0 (+0.0 to +0.0) | - |" in text
    assert "9,900 against 10,000 (0.990x" in text
    assert "108.0-110.0 µs plain, 110.6-112.6 µs with acceptfilter" in text
    assert "not run: needs wrk" in "\n".join(report._workercpu({"unavailable": "needs wrk"}))
