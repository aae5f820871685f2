"""Defaults that protect: each server model with acceptfilter's DEFAULT settings under idle + slowloris.

Issue 14, item 1. For every integration's server model — gunicorn sync (4
workers), gunicorn gthread (2 x 4 threads), ``acceptfilter serve`` (http.server's
thread per connection) and uvicorn (async, through ``acceptfilter run``) — with
nothing but the integration's own defaults, measure legit requests (own client,
open loop: a request every 1/rate s, one connection each, 10 s timeout) while an attacker
holds idle connections and slowloris ones (bench/slowclient.py's attack, which
reopens whatever the server closes). The worker-per-connection models are also
run with the issue-14 default (``on_timeout=surface``, idle ones at the same 5 s deadline) to show why it changed,
and every model without an attack for its normal latency.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from bench.common import ROOT, free_port, median, percentile
from bench.slowclient import start_attack, stop, wait_port

REQUEST = b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n"

#: model -> (argv after the python executable, the old-default environment/arguments, async?)
MODELS: dict[str, dict[str, Any]] = {
    "gunicorn-sync": {"argv": ["-m", "gunicorn", "-c", "python:acceptfilter.gunicorn", "-w", "4", "-k", "sync",
                               "--backlog", "4096", "--log-level", "warning", "bench.wsgiapp:app", "-b"],
                      "old": {"env": {"ACCEPTFILTER_ON_TIMEOUT": "surface", "ACCEPTFILTER_IDLE_TIMEOUT": "5"}}},
    "gunicorn-gthread": {"argv": ["-m", "gunicorn", "-c", "python:acceptfilter.gunicorn", "-w", "2", "-k", "gthread",
                                  "--threads", "4", "--backlog", "4096", "--log-level", "warning", "bench.wsgiapp:app",
                                  "-b"],
                         "old": {"env": {"ACCEPTFILTER_ON_TIMEOUT": "surface", "ACCEPTFILTER_IDLE_TIMEOUT": "5"}}},
    "serve": {"argv": ["-m", "acceptfilter.cli", "serve", "--no-status", "--backlog", "4096", "--directory", "{tmp}",
                       "--port"], "old": {"args": ["--on-timeout", "surface", "--idle-timeout", "5"]}},
    "uvicorn": {"argv": ["-m", "acceptfilter.cli", "run", "--", "uvicorn", "bench.wsgiapp:asgi_app", "--log-level",
                         "warning", "--backlog", "4096", "--port"], "old": None},
    # waitress's own defaults (4 threads, connection_limit 100) behind the integration's defaults.
    "waitress": {"argv": ["-c", "import sys; from acceptfilter.integrations.waitress import serve; "
                                "from bench.wsgiapp import app; serve(app, port=int(sys.argv[1]), backlog=4096)"],
                 "old": None},
}


def start_server(stack: ExitStack, model: str, tmp: str, *, old: bool = False,
                 nofile: int | None = None, extra: list[str] | None = None) -> tuple[int, str]:
    """Start ``model`` with its defaults (``old``: the issue-14 ones), ended by ``stack``: (port, error).

    ``nofile``: the server's soft fd limit (``ulimit -n``), which its max_held default derives from;
    ``extra``: more arguments (for ``serve``: they replace ``--no-status``).
    """
    import resource

    port = free_port()
    argv, env = _argv(model, port, tmp, old)
    if extra:  # serve: its status line instead of --no-status
        argv = [a for a in argv if a != "--no-status"] + extra
    log_path = Path(tmp) / f"server-{port}.log"
    log = stack.enter_context(open(log_path, "wb"))  # noqa: SIM115 - lives as long as the process

    def limit() -> None:
        if nofile is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))

    server = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, preexec_fn=limit)
    stack.callback(stop, server)
    if not wait_port(port):
        return port, "server did not start: " + log_path.read_text()[-500:]
    return port, ""


def _argv(model: str, port: int, tmp: str, old: bool) -> tuple[list[str], dict[str, str]]:
    spec = MODELS[model]
    argv = [sys.executable, *(a.replace("{tmp}", tmp) for a in spec["argv"])]
    argv.append(f"127.0.0.1:{port}" if argv[-1] == "-b" else str(port))
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACCEPTFILTER_")}
    if old:
        env.update(spec["old"].get("env", {}))
        argv += spec["old"].get("args", [])
    return argv, env


def legit(port: int, seconds: float, rate: float) -> dict[str, Any]:
    """Open loop: one request (own connection, 10 s timeout) every 1/rate s for ``seconds``.

    A closed loop would hide a starved server: its few clients would each wait
    10 s on one failing request and the fraction would stay high. Here every
    scheduled request counts: served (a 200) or not.
    """
    lat: list[float] = []
    failed = [0]
    lock = threading.Lock()

    def one() -> None:
        t0 = time.perf_counter()
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                s.settimeout(max(0.1, 10 - (time.perf_counter() - t0)))
                s.sendall(REQUEST)
                data = b""
                while chunk := s.recv(4096):
                    data += chunk
            ok = data.startswith((b"HTTP/1.1 200", b"HTTP/1.0 200"))
        except OSError:
            ok = False
        with lock:
            if ok:
                lat.append((time.perf_counter() - t0) * 1000)
            else:
                failed[0] += 1

    threads: list[threading.Thread] = []
    start = time.monotonic()
    for n in range(int(seconds * rate)):
        delay = start + n / rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        t = threading.Thread(target=one, daemon=True)
        t.start()
        threads.append(t)
    for t in threads:
        t.join(15)
    total = len(lat) + failed[0]
    return {"served": len(lat), "failed": failed[0], "served_fraction": len(lat) / total if total else 0.0,
            "p50_ms": median(lat), "p99_ms": percentile(lat, 99)}


def measure(model: str, *, attack: bool, old: bool, seconds: float, idle: int, slowloris: int,
            rate: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="af-defaults-") as tmp, ExitStack() as stack:
        port, error = start_server(stack, model, tmp, old=old)
        if error:
            return {"error": error}
        res: dict[str, Any] = {}
        if attack:
            _, res["attack"] = start_attack(stack, port, idle=idle, slowloris=slowloris, seconds=seconds + 60)
        res.update(legit(port, seconds, rate))
        return res


#: Balancer rows: a pre-opened connection first used after this many seconds (AWS ALB's default
#: idle timeout is 60 s, Azure's 4 min; 8 s is the case issue 23 was filed with).
BALANCER_IDLE = (8.0, 60.0, 300.0)
#: --quick leaves the 300 s row out (it would be the whole run's length) rather than shorten it.
BALANCER_IDLE_QUICK = (8.0, 60.0)


def _pool(port: int, size: int, idle: float) -> dict[str, Any]:
    from acceptfilter.testing.pool import BalancerPool

    r = BalancerPool(("127.0.0.1", port), size=size, idle=idle, uses=2, timeout=30).run()
    return {"connections": size, "sent": r.sent, "answered": r.answered, "unanswered": r.unanswered,
            "server_closed_before_reuse": r.server_closed, "connect_errors": r.connect_errors}


def balancer(model: str, *, size: int, idles: tuple[float, ...]) -> dict[str, Any]:
    """One server with its defaults, one pool per idle time, all at once (idle time costs no CPU)."""
    with tempfile.TemporaryDirectory(prefix="af-balancer-") as tmp, ExitStack() as stack:
        port, error = start_server(stack, model, tmp)
        if error:
            return {"error": error}
        out: dict[str, Any] = {}
        threads = [threading.Thread(target=lambda i=i: out.__setitem__(f"reuse-after-{i:g}s", _pool(port, size, i)))
                   for i in idles]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return dict(sorted(out.items(), key=lambda kv: float(kv[0].split("-")[-1][:-1])))


def evictions(*, size: int, idle: int, slowloris: int, nofile: int = 1024) -> dict[str, Any]:
    """``serve`` at ``ulimit -n nofile`` (its max_held derives from it) under an attack from one address
    (127.0.0.2) larger than max_held, and a balancer's pool from another (8 s idle): who is evicted."""
    import re

    with tempfile.TemporaryDirectory(prefix="af-evict-") as tmp, ExitStack() as stack:
        port, error = start_server(stack, "serve", tmp, nofile=nofile, extra=["--status-interval", "1"])
        if error:
            return {"error": error}
        _, said = start_attack(stack, port, idle=idle, slowloris=slowloris, seconds=120)
        res = {"ulimit_n": nofile, "attack": said, **_pool(port, size, 8.0)}
        time.sleep(1.5)  # one more status line after the pool's last request
        log = "\n".join(p.read_text(errors="replace") for p in Path(tmp).glob("server-*.log"))
        held = re.findall(r"max held (\d+)", log)
        lines = re.findall(r"status: accepted (\d+) .*? evicted (\d+)", log)
        res["max_held"] = int(held[-1]) if held else None
        res["accepted"], res["evicted"] = (int(x) for x in lines[-1]) if lines else (None, None)
        return res


def run(*, quick: bool, seconds: float | None = None, idle: int = 1000, slowloris: int = 200,
        models: list[str] | None = None, pool: int = 20) -> dict[str, Any]:
    seconds = seconds or (8.0 if quick else 20.0)
    rate = 50.0 if quick else 100.0
    results: dict[str, Any] = {}
    for model in models or list(MODELS):
        r: dict[str, Any] = {
            "no-attack": measure(model, attack=False, old=False, seconds=min(seconds, 8.0), idle=0, slowloris=0,
                                 rate=rate),
            "attack-defaults": measure(model, attack=True, old=False, seconds=seconds, idle=idle, slowloris=slowloris,
                                       rate=rate),
        }
        if MODELS[model]["old"] is not None:
            r["attack-old-default"] = measure(model, attack=True, old=True, seconds=seconds, idle=idle,
                                              slowloris=slowloris, rate=rate)
        results[model] = r
        print(f"   {model}: {json.dumps({k: (v.get('served_fraction'), v.get('p50_ms')) for k, v in r.items()})}",
              flush=True)
    # Balancer rows: every model at once, each with a pool per idle time (real time: the 300 s
    # row waits 300 s), and the eviction row alongside.
    rows: dict[str, Any] = {}
    idles = BALANCER_IDLE_QUICK if quick else BALANCER_IDLE
    runners = [threading.Thread(target=lambda m=m: rows.__setitem__(m, balancer(m, size=pool, idles=idles)))
               for m in models or list(MODELS)]
    runners.append(threading.Thread(target=lambda: rows.__setitem__(
        "evictions", evictions(size=pool, idle=idle, slowloris=slowloris))))
    for t in runners:
        t.start()
    for t in runners:
        t.join()
    evicted = rows.pop("evictions")
    rows = {m: rows[m] for m in models or list(MODELS)}  # in MODELS' order, not the order they finished
    print(f"   balancer: {json.dumps({m: {k: v.get('answered') for k, v in r.items()} for m, r in rows.items()})}",
          flush=True)
    print(f"   evictions: {json.dumps(evicted)}", flush=True)
    goals = {m: r["attack-defaults"].get("served_fraction", 0) >= 0.95 for m, r in results.items()}
    balancer_ok = {m: all(g.get("answered") == g.get("sent") and g.get("unanswered") == 0 for g in r.values())
                   for m, r in rows.items()}
    return {
        "config": {"attack": f"{idle} idle + {slowloris} slowloris connections (reopened when closed)",
                   "legit": f"{rate:g} requests/s for {seconds:g} s (open loop), one connection each, 10 s timeout",
                   "defaults": "the integration's own (deadline 5 s from the first byte, then 408 and close; "
                               "idle limit 620 s; max_held from the fd limit)"},
        "results": results,
        "balancer": {"config": f"{pool} connections per idle time, opened ahead, each used after the idle time "
                               "then reused once after the keep-alive response; real time, all models at once",
                     "results": rows},
        "evictions": evicted,
        "goals": {"served_ge_95pct_with_defaults": goals, "balancer_all_answered": balancer_ok},
    }
