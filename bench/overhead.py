"""Overhead: connection-per-request throughput of one minimal server, by how connections reach accept().

Modes (one server process each, started fresh for every sample): plain ``accept()``, kernel
``TCP_DEFER_ACCEPT``, FilteredListener with ``dataready`` and ``httpready`` on the C core and on the
pure-Python core. Load: wrk with ``Connection: close`` (or the own threaded client with
``client="python"``). The modes alternate A, B, C, ... for several rounds; the result is the median
conn/s per mode and its ratio to plain.
"""

from __future__ import annotations

import time
from typing import Any

from bench.common import Child, have_wrk, median, py_load, run_wrk

MODES = ["plain", "defer", "dataready-c", "httpready-c", "dataready-c-defer", "httpready-c-defer", "dataready-python",
         "httpready-python", "httpready-python-defer"]


def measure(mode: str, *, seconds: float, connections: int, client: str) -> dict[str, Any]:
    with Child(["echo", "--mode", mode]) as child:
        if client == "wrk":
            return run_wrk(f"http://127.0.0.1:{child.port}/", seconds=seconds, connections=connections)
        return py_load("127.0.0.1", child.port, seconds=seconds, concurrency=min(connections, 4))


def run(*, quick: bool, client: str | None = None, modes: list[str] | None = None, rounds: int | None = None,
        seconds: float | None = None) -> dict[str, Any]:
    client = client or ("wrk" if have_wrk() else "python")
    modes = modes or MODES
    # Many short samples beat a few long ones on a machine whose load drifts: each round runs
    # every mode back to back, and the ratio to plain is taken within the round.
    rounds = rounds or (5 if quick else 9)
    seconds = seconds or (1.0 if quick else 3.0)
    connections = 8
    samples: dict[str, list[dict[str, Any]]] = {m: [] for m in modes}
    t0 = time.monotonic()
    for r in range(rounds):
        order = modes if r % 2 == 0 else modes[::-1]  # A,B,C.. then ..C,B,A: no mode always goes first
        for mode in order:
            samples[mode].append(measure(mode, seconds=seconds, connections=connections, client=client))
    plain = median([s["rps"] for s in samples["plain"]]) if "plain" in samples else float("nan")
    results: dict[str, Any] = {}
    for mode in modes:
        rps = [s["rps"] for s in samples[mode]]
        per_round = [s["rps"] / p["rps"] for s, p in zip(samples[mode], samples.get("plain", []), strict=False)
                     if p["rps"]]
        results[mode] = {
            "conn_per_s": median(rps),
            "ratio_to_plain": median(rps) / plain if plain else float("nan"),
            "paired_ratio_median": median(per_round),
            "p99_ms": median([s["p99_ms"] for s in samples[mode]]),
            "errors": sum(int(s["errors"]) for s in samples[mode]),
            "samples_conn_per_s": [round(x, 1) for x in rps],
        }
    c, py = results.get("httpready-c"), results.get("httpready-python")
    return {
        "benchmark": "overhead",
        "config": {"client": client, "rounds": rounds, "seconds_per_sample": seconds, "connections": connections,
                   "server": "single-threaded Python accept -> recv -> sendall -> close",
                   "request": "GET / HTTP/1.1 with Connection: close (one connection per request)"},
        "results": results,
        "goals": {
            "httpready_c_vs_plain_ge_0.95": bool(c and c["paired_ratio_median"] >= 0.95),
            "c_core_ahead_of_python_core": bool(c and py and c["conn_per_s"] > py["conn_per_s"]),
        },
        "elapsed_s": round(time.monotonic() - t0, 1),
    }
