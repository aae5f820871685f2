"""Async servers pay for idle connections too: uvicorn and aiohttp holding 10,000 idle connections,
with and without ``httpready`` in front.

An event-loop server does not lose a worker to an idle client, but it still builds its
per-connection state (a transport, a protocol, a parser, buffers, timers) for every
accepted connection. Behind the filter an idle connection is a slot in the C core's
epoll set until it sends a request head. Measured on the server process: RSS before
and with the idle connections open, descriptors it holds, and the p50/p99 of legit
requests (connection per request) with none and with the idle ones open.

    python -m bench.asyncidle [--quick]          # writes bench/results/asyncidle.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import sys
import time
from typing import Any

from bench.common import Child, proc_cpu_seconds, proc_rss_bytes, py_load, raise_nofile, write_result

SERVERS = ("uvicorn-plain", "uvicorn-httpready", "aiohttp-plain", "aiohttp-httpready")
HOLD = 900.0


async def asgi_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})


def serve(kind: str) -> None:
    """Run one server on 127.0.0.1 (a selector asyncio loop for all four); print READY <port>."""
    raise_nofile(20_000)
    sock = socket.create_server(("127.0.0.1", 0), backlog=4096)
    port = sock.getsockname()[1]
    print(f"READY {port}", flush=True)
    server, filtered = kind.split("-")
    if server == "uvicorn":
        import uvicorn

        from acceptfilter.integrations import uvicorn as af_uvicorn

        config: dict[str, Any] = {"log_level": "error", "lifespan": "off", "access_log": False, "backlog": 4096}

        async def main() -> None:
            if filtered == "httpready":
                await af_uvicorn.serve(asgi_app, sock=sock, policy={"timeout": HOLD, "max_held": 50_000}, **config)
            else:
                await uvicorn.Server(uvicorn.Config(asgi_app, **config)).serve(sockets=[sock])

        with asyncio.Runner(loop_factory=asyncio.SelectorEventLoop) as runner:
            runner.run(main())
    else:
        from aiohttp import web

        from acceptfilter.integrations.aiohttp import run_app

        async def hello(request: web.Request) -> web.Response:
            return web.Response(text="ok")

        app = web.Application()
        app.router.add_get("/", hello)
        if filtered == "httpready":
            run_app(app, sock=sock, policy={"timeout": HOLD, "max_held": 50_000}, print=None, access_log=None,
                    backlog=4096)
        else:
            web.run_app(app, sock=sock, loop=asyncio.SelectorEventLoop(), print=None, access_log=None, backlog=4096)


class _Server(Child):
    """A bench.asyncidle server in its own process (same READY protocol as bench.servers)."""

    def __init__(self, kind: str) -> None:
        import subprocess

        from bench.common import ROOT

        self.argv = [sys.executable, "-m", "bench.asyncidle", "--serve", kind]
        self.proc = subprocess.Popen(self.argv, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     bufsize=1)
        line = self.readline(30)
        if not line.startswith("READY"):
            self.stop()
            raise RuntimeError(f"{kind}: server did not start (got {line!r})")
        self.port = int(line.split()[1])
        self.pid = self.proc.pid


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _ready(port: int, timeout: float = 30.0) -> None:
    stop_at = time.monotonic() + timeout
    while time.monotonic() < stop_at:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)


def measure(kind: str, n: int, *, legit: int, settle_s: float) -> dict[str, Any]:
    from bench.scale import _close_clients, _open_clients

    res: dict[str, Any] = {"server": kind, "idle_connections": n}
    with _Server(kind) as server:
        _ready(server.port)
        base = py_load("127.0.0.1", server.port, seconds=30, concurrency=1, max_requests=legit)
        rss0, fds0 = proc_rss_bytes(server.pid), _fds(server.pid)
        clients, opened = _open_clients(server.port, n, HOLD)
        try:
            res["client"] = opened
            stop_at, last, still = time.monotonic() + 90, -1, time.monotonic()
            while time.monotonic() < stop_at:  # until the server stops taking descriptors
                fds = _fds(server.pid)
                if fds >= fds0 + opened["held"] or time.monotonic() - still > 10:  # SYN retries take seconds
                    break
                if fds != last:
                    last, still = fds, time.monotonic()
                time.sleep(0.2)
            time.sleep(settle_s)
            rss1, fds1 = proc_rss_bytes(server.pid), _fds(server.pid)
            cpu0, t0 = proc_cpu_seconds(server.pid), time.monotonic()
            time.sleep(settle_s)
            cpu1, t1 = proc_cpu_seconds(server.pid), time.monotonic()
            during = py_load("127.0.0.1", server.port, seconds=30, concurrency=1, max_requests=legit)
            res.update({
                "rss_before_mib": round(rss0 / 2**20, 1),
                "rss_idle_open_mib": round(rss1 / 2**20, 1),
                "rss_bytes_per_idle_connection": round((rss1 - rss0) / max(1, opened["held"]), 1),
                "server_fds_with_idle_open": fds1 - fds0,
                "server_fds_after_legit_run": _fds(server.pid) - fds0,
                "idle_cpu_percent_of_core": round(100 * (cpu1 - cpu0) / (t1 - t0), 2),
                "legit_p50_ms_none_idle": round(base["p50_ms"], 3),
                "legit_p99_ms_none_idle": round(base["p99_ms"], 3),
                "legit_p50_ms_idle_open": round(during["p50_ms"], 3),
                "legit_p99_ms_idle_open": round(during["p99_ms"], 3),
                "legit_errors": base["errors"] + during["errors"],
            })
        finally:
            _close_clients(clients)
    return res


def run(*, quick: bool, n: int | None = None, servers: tuple[str, ...] = SERVERS) -> dict[str, Any]:
    n = n or (2_000 if quick else 10_000)
    legit = 200 if quick else 1000
    settle = 1.0 if quick else 3.0
    t0 = time.monotonic()
    results = [measure(kind, n, legit=legit, settle_s=settle) for kind in servers]
    by = {r["server"]: r for r in results}
    saved = {}
    for name in ("uvicorn", "aiohttp"):
        plain, filt = by.get(f"{name}-plain"), by.get(f"{name}-httpready")
        if plain and filt:
            saved[name] = {
                "rss_saved_mib": round(plain["rss_idle_open_mib"] - filt["rss_idle_open_mib"], 1),
                "rss_ratio": round(filt["rss_idle_open_mib"] / plain["rss_idle_open_mib"], 2),
            }
    return {
        "benchmark": "asyncidle",
        "config": {"idle_connections": n, "legit_requests": legit, "loop": "asyncio (selector)",
                   "filter": "httpready (C core)", "client": "bench.scale clients, 127.0.0.2.. sources"},
        "results": results,
        "saved": saved,
        "elapsed_s": round(time.monotonic() - t0, 1),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--serve", choices=SERVERS)
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    if args.serve:
        serve(args.serve)
        return 0
    from bench import machine

    raise_nofile(20_000)
    result = run(quick=args.quick)
    result = {"benchmark": "asyncidle", "quick": args.quick, "date": time.strftime("%Y-%m-%d"),
              "machine": machine.facts(), **result}
    print(json.dumps(result["saved"]), flush=True)
    print(write_result("asyncidle", result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
