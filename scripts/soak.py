#!/usr/bin/env python3
"""Hostile-client soak: a real threaded http.server behind httpready, under every kind of abuse at once.

    python scripts/soak.py --seconds 60              # what CI runs (tests/test_reliability.py)
    python scripts/soak.py --seconds 600 --core c    # the documented 10-minute run

Legit clients run beside idle connections, slowloris, random garbage, connect-then-RST,
half-close after a complete request, connect-and-close and oversized heads. Exits non-zero
(and says why) unless: every legit request got a correct response; the accounting invariant
held at every sample; the process RSS stopped growing after warm-up; the fd count went back
to its baseline after close(). Prints a JSON report. Loopback only; every loop is bounded.
"""

from __future__ import annotations

import argparse
import http.server
import json
import logging
import os
import random
import socket
import struct
import sys
import threading
import time
from typing import Any

from acceptfilter.engine import OUTCOMES
from acceptfilter.integrations.socketserver import install


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"
    timeout = 5  # a surfaced idle/slow connection must not pin a thread forever

    def do_GET(self) -> None:
        body = f"ok {self.path}".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def log_error(self, format: str, *args: Any) -> None:
        pass


class Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # clients that vanish mid-reply are part of the abuse


def rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


class ServerSide(logging.Handler):
    """What the engine said about each connection it did not surface (its debug lines name the
    peer), by client port: a failed client's port finds what the server did to it."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.by_port: dict[int, str] = {}

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if " from ('127.0.0.1', " in text:
            port = int(text.split(" from ('127.0.0.1', ", 1)[1].split(")", 1)[0])
            self.by_port[port] = text  # a port used again overwrites: the newest is the one that matters

    def explain(self, port: int) -> str:
        return self.by_port.get(port, "the engine logged nothing for this port (surfaced, or never accepted)")


class Soak:
    def __init__(self, port: int, seconds: float, seed: int) -> None:
        self.port = port
        self.until = time.monotonic() + seconds
        self.lock = threading.Lock()
        self.counts: dict[str, int] = {}
        self.failures: list[str] = []
        #: (client port, what failed) for failures the server side may explain
        self.failed_ports: list[tuple[int, str]] = []
        self.rng = random.Random(seed)

    def running(self) -> bool:
        return time.monotonic() < self.until

    def count(self, key: str, n: int = 1) -> None:
        with self.lock:
            self.counts[key] = self.counts.get(key, 0) + n

    def fail(self, why: str, conn: socket.socket | None = None, since: float | None = None) -> None:
        if since is not None:
            why += f" ({time.monotonic() - since:.3f} s after connecting)"
        with self.lock:
            if len(self.failures) < 20:
                self.failures.append(why)
                if conn is not None:
                    try:
                        self.failed_ports.append((conn.getsockname()[1], why))
                    except OSError:
                        pass
        self.count("legit_failures")

    def connect(self) -> socket.socket | None:
        try:
            return socket.create_connection(("127.0.0.1", self.port), timeout=10)
        except OSError:
            return None

    # -- client kinds ------------------------------------------------------
    def legit(self, wid: int) -> None:
        i = 0
        while self.running():
            i += 1
            path = f"/w{wid}/{i}"
            c = self.connect()
            if c is None:
                self.fail(f"{path}: connect failed")
                continue
            since = time.monotonic()
            try:
                c.sendall(f"GET {path} HTTP/1.0\r\nHost: soak\r\n\r\n".encode())
                reply = b""
                while chunk := c.recv(4096):
                    reply += chunk
                if not (reply.startswith(b"HTTP/1.0 200") and reply.endswith(f"ok {path}".encode())):
                    self.fail(f"{path}: bad reply {reply[:60]!r}", c, since)
                else:
                    self.count("legit_ok")
            except OSError as exc:
                self.fail(f"{path}: {exc}", c, since)
            finally:
                c.close()

    def idle(self) -> None:
        held: list[socket.socket] = []
        while self.running():
            c = self.connect()
            if c:
                held.append(c)
                self.count("idle")
            if len(held) > 200:
                held.pop(0).close()
            time.sleep(0.02)
        for c in held:
            c.close()

    def slowloris(self) -> None:
        conns: list[socket.socket] = []
        head = b"GET /slow HTTP/1.1\r\nHost: soak\r\nX-Slow: " + b"a" * 10000
        pos: dict[int, int] = {}
        while self.running():
            if len(conns) < 100:
                c = self.connect()
                if c:
                    conns.append(c)
                    self.count("slowloris")
            for c in list(conns):
                p = pos.get(id(c), 0)
                try:
                    c.sendall(head[p : p + 1])
                    pos[id(c)] = p + 1
                except OSError:
                    conns.remove(c)
                    c.close()
            time.sleep(0.3)
        for c in conns:
            c.close()

    def garbage(self) -> None:
        while self.running():
            c = self.connect()
            if c:
                try:
                    c.sendall(bytes(self.rng.getrandbits(8) for _ in range(self.rng.randint(1, 3000))))
                except OSError:
                    pass
                c.close()
                self.count("garbage")
            time.sleep(0.01)

    def resets(self) -> None:
        while self.running():
            c = self.connect()
            if c:
                if self.rng.random() < 0.5:
                    try:
                        c.sendall(b"GET / HTTP/1.1\r\nHo")
                    except OSError:
                        pass
                c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                c.close()
                self.count("rst")
            time.sleep(0.01)

    def half_close(self) -> None:
        while self.running():
            c = self.connect()
            if c is None:
                continue
            since = time.monotonic()
            try:
                c.sendall(b"GET /half HTTP/1.0\r\n\r\n")
                c.shutdown(socket.SHUT_WR)
                reply = b""
                while chunk := c.recv(4096):
                    reply += chunk
                if not reply.endswith(b"ok /half"):
                    self.fail(f"half-close: bad reply {reply[:60]!r}", c, since)
                else:
                    self.count("half_close_ok")
            except OSError as exc:
                self.fail(f"half-close: {exc}", c, since)
            finally:
                c.close()
            time.sleep(0.01)

    def connect_close(self) -> None:
        while self.running():
            c = self.connect()
            if c:
                c.close()
                self.count("connect_close")
            time.sleep(0.005)

    def oversized(self) -> None:
        while self.running():
            c = self.connect()
            if c:
                try:
                    c.sendall(b"GET /big HTTP/1.1\r\nX: " + b"b" * 40000)
                except OSError:
                    pass
                c.close()
                self.count("oversized")
            time.sleep(0.05)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--core", choices=("c", "python"), default="c")
    ap.add_argument("--legit-workers", type=int, default=4)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()

    baseline_fds = fd_count()
    server_side = ServerSide()
    engine_log = logging.getLogger("acceptfilter")
    engine_log.addHandler(server_side)
    engine_log.setLevel(logging.DEBUG)
    srv = Server(("127.0.0.1", 0), Handler)
    listener = install(srv, "httpready", timeout=2, core=args.core, max_held=2000)
    server_thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    server_thread.start()
    soak = Soak(srv.server_address[1], args.seconds, args.seed)
    kinds = [soak.idle, soak.slowloris, soak.garbage, soak.resets, soak.half_close, soak.connect_close, soak.oversized]
    threads = [threading.Thread(target=soak.legit, args=(i,)) for i in range(args.legit_workers)]
    threads += [threading.Thread(target=k) for k in kinds]
    for t in threads:
        t.start()

    invariant_breaks: list[dict[str, int]] = []
    rss: list[int] = []
    start = time.monotonic()
    while soak.running():
        time.sleep(min(1.0, max(0.0, soak.until - time.monotonic())))
        s = listener.stats()
        outcomes = sum(s[name] for name in OUTCOMES)
        # The engine thread may be mid-batch: accepted can run ahead by at most one batch.
        if not 0 <= s["accepted"] - (outcomes + s["held"]) <= 512:
            invariant_breaks.append({"accepted": s["accepted"], "outcomes": outcomes, "held": s["held"]})
        rss.append(rss_kib())
    for t in threads:
        t.join(30)
    srv.shutdown()
    final = listener.stats()
    srv.server_close()
    server_thread.join(10)
    time.sleep(0.5)  # handler threads finishing surfaced slow connections (their timeout is 5 s)
    deadline = time.monotonic() + 10
    while fd_count() > baseline_fds and time.monotonic() < deadline:
        time.sleep(0.1)
    outcomes = sum(final[name] for name in OUTCOMES)
    warm = rss[len(rss) // 4] if rss else 0
    report = {
        "seconds": round(time.monotonic() - start, 1),
        "core": args.core,
        "clients": soak.counts,
        "engine": {k: v for k, v in final.items() if not isinstance(v, dict)},
        "invariant_exact_after_close": final["accepted"] == outcomes and final["held"] == 0,
        "invariant_breaks": invariant_breaks[:5],
        "rss_kib": {"after_warmup": warm, "end": rss[-1] if rss else 0, "max": max(rss, default=0)},
        "fds": {"baseline": baseline_fds, "after_close": fd_count()},
        "failures": soak.failures,
        "failures_server_side": [f"{why} -> {server_side.explain(port)}" for port, why in soak.failed_ports],
    }
    problems = []
    if soak.counts.get("legit_failures"):
        problems.append(f"{soak.counts['legit_failures']} legit requests failed")
    if not soak.counts.get("legit_ok"):
        problems.append("no legit request succeeded")
    if invariant_breaks or not report["invariant_exact_after_close"]:
        problems.append("accounting invariant broken")
    if rss and rss[-1] - warm > 20 * 1024:
        problems.append(f"RSS grew by {(rss[-1] - warm) // 1024} MiB after warm-up")
    if fd_count() > baseline_fds:
        problems.append(f"fd leak: {fd_count()} open after close, baseline {baseline_fds}")
    report["problems"] = problems
    print(json.dumps(report, indent=2))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
