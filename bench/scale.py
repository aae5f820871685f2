"""Scale: hold 10,000 and 50,000 idle connections on a FilteredListener, and 100,000 across processes.

The client (its own process) opens N connections spread over several 127.0.0.x source
addresses (IP_BIND_ADDRESS_NO_PORT, so each source has its own ephemeral port range) and
leaves them idle. Measured on the server process: user-space memory per held connection
(RSS delta / N, after they are held), CPU while they sit idle (utime + stime from
/proc/PID/stat), and the p50/p99 latency of legit requests meanwhile vs. with none held.
"""

from __future__ import annotations

import argparse
import errno
import json
import resource
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

from bench.common import ROOT, Child, proc_cpu_seconds, proc_rss_bytes, py_load, raise_nofile

IP_BIND_ADDRESS_NO_PORT = 24
PER_SOURCE = 20_000  # well under the ~28k ephemeral ports of one source address


PER_CLIENT = 15_000  # connections per client process (each process has its own RLIMIT_NOFILE)


def client(port: int, count: int, hold: float, first: int = 0) -> None:
    """Open ``count`` idle connections (numbered from ``first``: that picks the source address), print
    one JSON line, keep them until stdin closes or ``hold`` s pass."""
    limit = raise_nofile(count + 1000)
    socks: list[socket.socket] = []
    failed = 0
    for i in range(first, first + min(count, limit - 100)):
        s = socket.socket()
        s.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
        s.bind((f"127.0.0.{2 + i // PER_SOURCE}", 0))
        s.setblocking(False)
        rc = s.connect_ex(("127.0.0.1", port))
        if rc not in (0, errno.EINPROGRESS):
            failed += 1
            s.close()
            continue
        socks.append(s)
        if i % 1000 == 999:
            time.sleep(0.02)  # let the server drain its accept queue
    print(json.dumps({"held": len(socks), "failed": failed, "nofile": limit}), flush=True)
    import select

    select.select([sys.stdin], [], [], hold)
    for s in socks:
        s.close()


def level(mode: str, n: int, *, idle_s: float, legit: int) -> dict[str, Any]:
    hold = 600.0
    res: dict[str, Any] = {"connections": n, "mode": mode}
    limit = raise_nofile(n + 10_000)  # what the server process will get (same privileges)
    if limit < n + 1000:
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        res["unreachable"] = (f"RLIMIT_NOFILE hard limit is {hard:,} and this machine does not allow raising it "
                              f"(no CAP_SYS_RESOURCE): one process cannot hold {n:,} connections")
        return res
    with Child(["scale", "--mode", mode, "--hold-timeout", str(hold), "--max-held", str(n + 10_000),
                "--nofile", str(n + 10_000)]) as server:
        time.sleep(0.5)
        base = py_load("127.0.0.1", server.port, seconds=30, concurrency=1, max_requests=legit)
        rss0 = proc_rss_bytes(server.pid)
        clients, opened = _open_clients(server.port, n, hold)
        try:
            res["client"] = opened
            held, st = _wait_held(server, opened["held"], limit=60, patience=3)
            res["held"] = held
            res["server_nofile"] = st["nofile"]
            if held < n:
                res["note"] = (f"only {held:,} of {n:,} held: the server's RLIMIT_NOFILE is {st['nofile'][0]:,} "
                               f"(hard limit {st['nofile'][1]:,}; raising it needs CAP_SYS_RESOURCE, which this "
                               "machine does not give)" if st["nofile"][0] < n + 100 else
                               f"only {held:,} of {n:,} held (clients opened {opened['held']:,})")
            res.update(_idle_and_legit(server, held, rss0, base, idle_s=idle_s, legit=legit,
                                       rss=lambda: proc_rss_bytes(server.pid),
                                       cpu=lambda: proc_cpu_seconds(server.pid)))
            res["server_stats"] = server.ask("stats")
        finally:
            _close_clients(clients)
    return res


def _open_clients(port: int, n: int, hold: float) -> tuple[list[subprocess.Popen[str]], dict[str, int]]:
    clients = []
    for first in range(0, n, PER_CLIENT):
        clients.append(subprocess.Popen(
            [sys.executable, "-m", "bench.scale", "--client", "--port", str(port), "--first", str(first),
             "--count", str(min(PER_CLIENT, n - first)), "--hold", str(hold)],
            cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True))
    opened = {"held": 0, "failed": 0}
    for cl in clients:
        assert cl.stdout is not None
        one = json.loads(cl.stdout.readline() or "{}")
        opened["held"] += int(one.get("held", 0))
        opened["failed"] += int(one.get("failed", 0))
    return clients, opened


def _close_clients(clients: list[subprocess.Popen[str]]) -> None:
    for cl in clients:
        if cl.stdin is not None:
            cl.stdin.close()
    for cl in clients:
        try:
            cl.wait(60)
        except subprocess.TimeoutExpired:
            cl.kill()


def level_workers(n: int, workers: int, *, idle_s: float, legit: int) -> dict[str, Any]:
    """``n`` idle connections held by ``workers`` processes on one listen socket (acceptfilter.workers' model):
    beyond what one process's RLIMIT_NOFILE allows. RSS and CPU are summed over the workers."""
    hold = 900.0
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    res: dict[str, Any] = {"connections": n, "mode": f"httpready-c x{workers} processes", "workers": workers}
    # max_held above the fd limit: a full worker backs off at EMFILE (and the others accept) instead of
    # evicting its oldest held connection.
    with Child(["scale-workers", "--workers", str(workers), "--hold-timeout", str(hold), "--max-held", str(nofile + 1000),
                "--nofile", str(nofile), "--backlog", "65535"], ready_timeout=60) as server:
        pids = server.ask("stats")["pids"]

        def rss() -> int:
            return sum(proc_rss_bytes(p) for p in pids)

        def cpu() -> float:
            return sum(proc_cpu_seconds(p) for p in pids)

        time.sleep(0.5)
        base = py_load("127.0.0.1", server.port, seconds=30, concurrency=1, max_requests=legit)
        rss0 = rss()
        clients, opened = _open_clients(server.port, n, hold)
        try:
            res["client"] = opened
            held, st = _wait_held(server, opened["held"], limit=120, patience=5)
            res["held"] = held
            res["per_worker_held"] = st.get("per_worker_held")
            res["server_nofile_per_process"] = st.get("nofile")
            res.update(_idle_and_legit(server, held, rss0, base, idle_s=idle_s, legit=legit, rss=rss, cpu=cpu))
            res["server_stats"] = {k: v for k, v in server.ask("stats").items() if k != "pids"}
            if held < n:
                res["note"] = f"only {held:,} of {n:,} held (clients opened {opened['held']:,})"
        finally:
            _close_clients(clients)
    return res


def _wait_held(server: Child, opened: int, *, limit: float, patience: float) -> tuple[int, dict[str, Any]]:
    """Poll the server until it holds what the clients opened, or stops making progress."""
    held = last = 0
    st: dict[str, Any] = {}
    stop_at = time.monotonic() + limit
    still_since = time.monotonic()
    while time.monotonic() < stop_at:
        st = server.ask("stats")
        held = int(st["held"])
        if held >= opened or time.monotonic() - still_since > patience:
            break  # all there, or no progress for a while
        if held != last:
            last, still_since = held, time.monotonic()
        time.sleep(0.25)
    return held, st


def _idle_and_legit(server: Child, held: int, rss0: int, base: dict[str, Any], *, idle_s: float, legit: int,
                    rss: Callable[[], int], cpu: Callable[[], float]) -> dict[str, Any]:
    """Memory per held connection, idle CPU, and legit latency with everything held."""
    time.sleep(1.0)
    rss1 = rss()
    cpu0, t0 = cpu(), time.monotonic()
    time.sleep(idle_s)
    cpu1, t1 = cpu(), time.monotonic()
    during = py_load("127.0.0.1", server.port, seconds=30, concurrency=1, max_requests=legit)
    return {
        "rss_before_mib": round(rss0 / 2**20, 1),
        "rss_held_mib": round(rss1 / 2**20, 1),
        "bytes_per_held_connection": round((rss1 - rss0) / held, 1) if held else None,
        "idle_seconds": idle_s,
        "idle_cpu_percent_of_core": round(100 * (cpu1 - cpu0) / (t1 - t0), 2),
        "legit_p50_ms_none_held": round(base["p50_ms"], 3),
        "legit_p99_ms_none_held": round(base["p99_ms"], 3),
        "legit_p50_ms_held": round(during["p50_ms"], 3),
        "legit_p99_ms_held": round(during["p99_ms"], 3),
        "legit_errors": base["errors"] + during["errors"],
    }


def run(*, quick: bool, levels: list[int] | None = None, cores: list[str] | None = None,
        idle_s: float | None = None, legit: int | None = None,
        across: list[tuple[int, int]] | None = None) -> dict[str, Any]:
    levels = levels or ([10_000] if quick else [10_000, 50_000])
    #: (connections, worker processes): past one process's hard RLIMIT_NOFILE
    across = across if across is not None else ([] if quick else [(100_000, 8)])
    cores = cores or (["c"] if quick else ["c", "python"])
    idle_s = idle_s or (5.0 if quick else 10.0)
    legit = legit or (300 if quick else 1000)
    t0 = time.monotonic()
    results = [level(f"httpready-{core}", n, idle_s=idle_s, legit=legit) for n in levels for core in cores]
    results += [level_workers(n, w, idle_s=idle_s, legit=legit) for n, w in across]
    c_rows = [r for r in results if r["mode"].startswith("httpready-c") and r.get("bytes_per_held_connection") is not None]
    return {
        "benchmark": "scale",
        "config": {"levels": levels, "cores": cores, "across_processes": across, "idle_seconds": idle_s,
                   "legit_requests": legit,
                   "filter": "httpready", "sources": "127.0.0.2.. (20,000 connections per source address)"},
        "results": results,
        "goals": {
            "c_bytes_per_conn_le_256": bool(c_rows) and all(r["bytes_per_held_connection"] <= 256 for r in c_rows),
            "c_idle_cpu_le_1pct": bool(c_rows) and all(r["idle_cpu_percent_of_core"] <= 1.0 for r in c_rows),
            # "unchanged" within noise: at most 1.5x, or 0.5 ms more, than with none held
            "c_legit_p99_unchanged": bool(c_rows) and all(
                r["legit_p99_ms_held"] <= max(1.5 * r["legit_p99_ms_none_held"], r["legit_p99_ms_none_held"] + 0.5)
                for r in c_rows),
        },
        "elapsed_s": round(time.monotonic() - t0, 1),
    }


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--client", action="store_true")
    p.add_argument("--port", type=int)
    p.add_argument("--count", type=int, default=10_000)
    p.add_argument("--hold", type=float, default=600.0)
    p.add_argument("--first", type=int, default=0)
    a = p.parse_args()
    if a.client:
        client(a.port, a.count, a.hold, a.first)
