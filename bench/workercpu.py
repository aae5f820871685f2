"""Where the everyday tax goes: CPU per request of gunicorn's workers, plain against acceptfilter.

The slow-client benchmark judges the tax in requests/s over fresh starts, which on two cores
moves by a few percent from one start to the next. This one asks a narrower question with a
steadier answer: how much CPU does a request cost each process, with and without the filter?

Both set-ups are gunicorn sync x4 serving the same trivial WSGI app, unattacked; the
acceptfilter one is the documented integration (``ACCEPTFILTER_FILTER=httpready gunicorn -c
python:acceptfilter.gunicorn``), so every request goes through the workers' first look (one
``recv(MSG_PEEK)`` and the compiled matcher in ``acceptfilter._look``).

A started gunicorn keeps a speed of its own for as long as it runs: from one start to the next,
plain gunicorn's workers spent from 110 to 128 µs per request here, far more than the difference
being looked for. So
the comparison is made over many fresh starts. Each start runs one instance of each set-up side
by side; wrk runs against them in turn for a few rounds (ABBA); each sample divides the CPU time
``/proc`` counts for the arbiter, the workers, the filter process and the whole machine by the
requests wrk completed. A start gives one difference (the mean of the acceptfilter samples minus
the mean of the plain ones), and the result is the median over starts, with quartiles.
"""

from __future__ import annotations

import importlib.util
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from statistics import fmean
from typing import Any

from bench.common import (
    have_wrk,
    machine_busy_seconds,
    median,
    percentile,
    proc_cpu_seconds,
    process_tree,
    run_wrk,
)
from bench.slowclient import PROTECTED_ENV, acceptfilter_gunicorn_available, start_setup

SETUPS = ("plain", "acceptfilter")
#: The same servers as the slow-client benchmark's unattacked set-ups, started by its start_setup().
AS_SLOWCLIENT_SETUP = {"plain": "no-attack", "acceptfilter": "no-attack-acceptfilter"}
#: What each sample splits the CPU into. "server" is the three together; "machine" is every
#: process on every core (wrk included), from /proc/stat.
PARTS = ("workers", "arbiter", "filter_process", "server", "machine")


def _is_filter_process(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"acceptfilter.integrations.gunicorn.filter_process" in f.read()
    except OSError:
        return False


def part_of(arbiter: int, pid: int) -> str:
    """Which part of a gunicorn ``pid`` is: the arbiter, a worker or the filter process."""
    return "arbiter" if pid == arbiter else "filter_process" if _is_filter_process(pid) else "workers"


def parts_of(arbiter: int) -> dict[int, str]:
    """Every process of a gunicorn, and which part it is."""
    return {pid: part_of(arbiter, pid) for pid in process_tree(arbiter)}


def cpu_by_part(arbiter: int, parts: dict[int, str] | None = None) -> dict[str, float]:
    """CPU seconds so far of a gunicorn's arbiter, its workers and its filter process (if any).

    ``parts`` is :func:`parts_of` taken once for a sample's before and after. A process that is
    gone counts 0, so a sample is only valid while the set of processes stays the same:
    :func:`sample` checks that and refuses the sample otherwise.
    """
    out = dict.fromkeys(("workers", "arbiter", "filter_process"), 0.0)
    for pid, part in (parts or parts_of(arbiter)).items():
        try:
            out[part] += proc_cpu_seconds(pid)
        except (FileNotFoundError, ProcessLookupError):
            continue
    out["server"] = out["workers"] + out["arbiter"] + out["filter_process"]
    return out


def sample(arbiter: int, port: int, *, seconds: float, connections: int) -> dict[str, Any]:
    """One wrk run against one instance: requests/s, errors and microseconds of CPU per request."""
    parts = parts_of(arbiter)
    before, machine_before = cpu_by_part(arbiter, parts), machine_busy_seconds()
    got = run_wrk(f"http://127.0.0.1:{port}/", seconds=seconds, connections=connections, threads=2)
    after, machine_after = cpu_by_part(arbiter, parts), machine_busy_seconds()
    if sorted(process_tree(arbiter)) != sorted(parts):
        return {"error": "a process of the server was replaced during the sample", **got}
    if not got.get("requests"):
        return {"error": "wrk completed no request", **got}
    per_request = {part: (after[part] - before[part]) / got["requests"] * 1e6 for part in PARTS[:-1]}
    per_request["machine"] = (machine_after - machine_before) / got["requests"] * 1e6
    processes = {part: list(parts.values()).count(part) for part in ("workers", "filter_process")}
    return {"rps": got["rps"], "requests": got["requests"], "errors": int(got["errors"]) + int(got["non_2xx"]),
            "processes": processes, "cpu_us": per_request}


def _quartiles(xs: list[float]) -> dict[str, float]:
    return {"median": median(xs), "q1": percentile(xs, 25), "q3": percentile(xs, 75)}


Block = dict[str, list[list[dict[str, Any]]]]
"""One start: ``block[setup][instance]`` is that instance's samples, one per round."""


def summarize(blocks: list[Block]) -> dict[str, Any]:
    """Per set-up medians, each instance's median (their spread is why there are many starts),
    and the paired comparison: per start, each set-up's mean over its samples, then acceptfilter
    minus (or over) plain, and the median and quartiles of those over the starts."""

    def values(block: Block, setup: str, part: str) -> list[float]:
        """Requests/s, or CPU µs per request of ``part``, of every sample of ``setup`` in ``block``."""
        return [float(s["rps"] if part == "rps" else s["cpu_us"][part]) for inst in block[setup] for s in inst]

    out: dict[str, Any] = {"starts": len(blocks), "setups": {}, "difference_us": {}, "ratio": {}}
    for setup in SETUPS:
        flat = [s for block in blocks for inst in block[setup] for s in inst]
        out["setups"][setup] = {
            "samples": len(flat),
            "rps_median": median([s["rps"] for s in flat]),
            "errors": sum(s["errors"] for s in flat),
            "processes": flat[0]["processes"],
            "cpu_us_median": {part: median([s["cpu_us"][part] for s in flat]) for part in PARTS},
            "instances_workers_cpu_us_median": [round(median([s["cpu_us"]["workers"] for s in inst]), 1)
                                                for block in blocks for inst in block[setup]],
        }
    for part in PARTS:
        diffs = [fmean(values(b, "acceptfilter", part)) - fmean(values(b, "plain", part)) for b in blocks]
        out["difference_us"][part] = {**_quartiles(diffs), "starts": [round(d, 1) for d in diffs]}
    for part in ("workers", "server", "machine", "rps"):  # the arbiter and the filter process are ~0 in both
        ratios = [fmean(values(b, "acceptfilter", part)) / fmean(values(b, "plain", part)) for b in blocks]
        out["ratio"][part] = _quartiles(ratios)
    return out


def one_start(tmp: Path, *, start: int, instances: int, rounds: int, seconds: float,
              connections: int) -> Block | str:
    """Start ``instances`` of each set-up, measure them ``rounds`` times, stop them.

    Returns the samples, or why they could not be taken.
    """
    with ExitStack() as stack:
        servers: list[tuple[str, int, int, int]] = []  # (setup, instance, port, arbiter pid)
        for i in range(instances):
            # Interleaved (plain, acceptfilter, acceptfilter, plain, ...) and flipped every other
            # start, so that neither set-up always starts first or runs first in a round.
            for setup in SETUPS if (start + i) % 2 == 0 else SETUPS[::-1]:
                started = start_setup(stack, AS_SLOWCLIENT_SETUP[setup], tmp, idle=0, slowloris=0,
                                      attack_seconds=0)
                if "error" in started:
                    return str(started["error"])
                servers.append((setup, i, started["port"], started["pid"]))
        for _setup, _i, port, _pid in servers:
            run_wrk(f"http://127.0.0.1:{port}/", seconds=1, connections=connections, threads=2)  # warm up
        block: Block = {s: [[] for _ in range(instances)] for s in SETUPS}
        for r in range(rounds):
            for setup, i, port, pid in servers if r % 2 == 0 else servers[::-1]:
                got = sample(pid, port, seconds=seconds, connections=connections)
                if "error" in got:  # once more: a worker may have been replaced meanwhile
                    got = sample(pid, port, seconds=seconds, connections=connections)
                    if "error" in got:
                        return f"start {start}, round {r}, {setup} {i}: {got['error']} (twice)"
                block[setup][i].append(got)
        return block


def run(*, quick: bool, starts: int | None = None, instances: int = 1, rounds: int | None = None,
        seconds: float | None = None) -> dict[str, Any]:
    starts = starts or (2 if quick else 16)
    rounds = rounds or (2 if quick else 4)
    seconds = seconds or (1.0 if quick else 3.0)
    connections = 16
    out: dict[str, Any] = {
        "benchmark": "workercpu",
        "config": {"gunicorn": "sync, 4 workers, --backlog 4096, trivial WSGI app, no attack",
                   "acceptfilter": " ".join(f"{k}={v}" for k, v in PROTECTED_ENV.items())
                   + " gunicorn -c python:acceptfilter.gunicorn ...",
                   "starts": starts, "instances": instances, "rounds": rounds, "seconds_per_sample": seconds,
                   "wrk_connections": connections,
                   "method": f"{starts} fresh starts of {instances} instance(s) of each set-up, running side by "
                             f"side; {rounds} rounds per start, wrk against each instance in turn (ABBA); CPU "
                             "from /proc per request; the median over starts of each start's difference of the "
                             "set-ups' means"}}
    if not have_wrk() or importlib.util.find_spec("gunicorn") is None:
        out["unavailable"] = "needs wrk and gunicorn (./scripts/bench.sh installs them)"
        return out
    if not acceptfilter_gunicorn_available():
        out["unavailable"] = "acceptfilter.gunicorn (the gunicorn integration) is not installed"
        return out
    t0 = time.monotonic()
    blocks: list[Block] = []
    for start in range(starts):
        with tempfile.TemporaryDirectory(prefix="af-bench-") as tmp:
            got = one_start(Path(tmp), start=start, instances=instances, rounds=rounds, seconds=seconds,
                            connections=connections)
        if isinstance(got, str):
            out["error"] = got
            return out
        blocks.append(got)
    out["results"] = summarize(blocks)
    out["elapsed_s"] = round(time.monotonic() - t0, 1)
    return out
