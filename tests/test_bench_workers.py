"""The multi-process benchmarks still run and give sane numbers (tiny counts; the real runs are in bench/)."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import asyncidle, deadworker, scale  # noqa: E402


def test_scale_holds_across_processes() -> None:
    r = scale.level_workers(2_000, 2, idle_s=0.5, legit=20)
    assert r["held"] == 2_000 and sum(r["per_worker_held"]) == 2_000
    assert r["legit_errors"] == 0 and r["bytes_per_held_connection"] is not None


def test_deadworker_shared_socket_answers_every_request() -> None:
    r = deadworker.one("shared", idle=40, requests=30)
    assert r["answered"] == 30 and r["lost"] == 0, r


def test_asyncidle_measures_both_sides() -> None:
    d = asyncidle.run(quick=True, n=200, servers=("uvicorn-plain", "uvicorn-httpready"))
    assert [r["server"] for r in d["results"]] == ["uvicorn-plain", "uvicorn-httpready"]
    for r in d["results"]:
        assert r["client"]["held"] == 200 and r["legit_errors"] == 0, r
    assert "uvicorn" in d["saved"]
