"""The servers the benchmarks measure, each run in its own process: ``python -m bench.servers KIND ...``.

Every server prints ``READY <port>`` once it listens. They are deliberately minimal
(a single-threaded accept -> recv -> sendall -> close loop), so what differs between
modes is how connections reach ``accept()``: plain, TCP_DEFER_ACCEPT, or a FilteredListener.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import sys
import threading
import time
from typing import Any

from bench.common import RESPONSE, raise_nofile

#: Overhead / surface modes: name -> (filter or None, core, kernel defer seconds)
MODES: dict[str, tuple[str | None, str, int]] = {
    "plain": (None, "", 0),
    "defer": (None, "", 1),
    "dataready-c": ("dataready", "c", 0),
    "httpready-c": ("httpready", "c", 0),
    "dataready-python": ("dataready", "python", 0),
    "httpready-python": ("httpready", "python", 0),
    # The kernel as stage one (wrap(defer_accept=1)): what accept() finds has sent data,
    # so the compiled matcher certifies it at accept (the fast path).
    "dataready-c-defer": ("dataready", "c", 1),
    "httpready-c-defer": ("httpready", "c", 1),
    "httpready-python-defer": ("httpready", "python", 1),
}



def answer_one(conn: socket.socket) -> None:
    """Read the request (one recv: the client sends it whole), answer, close."""
    try:
        conn.recv(65536)
        conn.sendall(RESPONSE)
    except OSError:
        pass
    conn.close()

def listen(host: str, port: int, backlog: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(backlog)
    return sock


def make_listener(mode: str, host: str, port: int, backlog: int, **kw: Any) -> Any:
    flt, core, defer = MODES[mode]
    sock = listen(host, port, backlog)
    if defer:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, defer)
    if flt is None:
        return sock
    import acceptfilter

    return acceptfilter.wrap(sock, flt, core=core, **kw)


def ready(lsock: Any) -> None:
    print(f"READY {lsock.getsockname()[1]}", flush=True)


def exit_with_parent() -> None:
    """Exit when stdin closes: a benchmark driver that dies leaves no server behind."""

    def watch() -> None:
        sys.stdin.read()
        os._exit(0)

    threading.Thread(target=watch, daemon=True).start()


def serve_echo(args: argparse.Namespace) -> None:
    """accept -> recv -> sendall -> close, forever (until SIGTERM)."""
    lsock = make_listener(args.mode, args.host, args.port, args.backlog)
    exit_with_parent()
    ready(lsock)
    accept = lsock.accept
    while True:
        answer_one(accept()[0])


def serve_echo_selector(args: argparse.Namespace) -> None:
    """The echo server the way selector-based servers (socketserver, asyncio) accept: wait for
    the listener's fd, then accept without blocking until nothing is left. With a
    FilteredListener nobody waits in accept(): the background thread surfaces everything."""
    import selectors

    lsock = make_listener(args.mode, args.host, args.port, args.backlog)
    lsock.setblocking(False)
    exit_with_parent()
    ready(lsock)
    sel = selectors.DefaultSelector()
    sel.register(lsock, selectors.EVENT_READ)
    accept = lsock.accept
    while True:
        sel.select()
        while True:
            try:
                conn, _ = accept()
            except BlockingIOError:
                break
            conn.setblocking(True)
            answer_one(conn)


def serve_surface(args: argparse.Namespace) -> None:
    """Record, per request, accept() time and head-read time minus the client's t0 (in the target)."""
    lsock = make_listener(args.mode, args.host, args.port, args.backlog)
    lsock.settimeout(1.0)
    ready(lsock)
    accept_ns: list[int] = []
    read_ns: list[int] = []
    stop_at = time.monotonic() + args.max_seconds
    while len(accept_ns) < args.count and time.monotonic() < stop_at:
        try:
            conn, _ = lsock.accept()
        except TimeoutError:
            continue
        t_acc = time.monotonic_ns()
        conn.settimeout(5.0)
        data = b""
        try:
            while b"\r\n\r\n" not in data:
                chunk = conn.recv(4096)
                if not chunk:
                    break
                data += chunk
            t_read = time.monotonic_ns()
            conn.sendall(RESPONSE)
        except OSError:
            conn.close()
            continue
        conn.close()
        try:
            t0 = int(data.split(b" ", 2)[1][1:])
        except (IndexError, ValueError):
            continue
        accept_ns.append(t_acc - t0)
        read_ns.append(t_read - t0)
    print(json.dumps({"accept_ns": accept_ns, "read_ns": read_ns}), flush=True)


def serve_scale(args: argparse.Namespace) -> None:
    """A FilteredListener holding idle connections; a thread answers legit requests.

    Commands on stdin, one JSON line back each: ``stats``. Exits at EOF.
    """
    raise_nofile(args.nofile)
    lsock = make_listener(args.mode, args.host, args.port, args.backlog, timeout=args.hold_timeout,
                          max_held=args.max_held, on_timeout="close")
    ready(lsock)

    def answer() -> None:
        while True:
            try:
                conn, _ = lsock.accept()
            except OSError:
                return
            answer_one(conn)

    threading.Thread(target=answer, daemon=True).start()
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "stats":
            st = lsock.stats()
            out = {k: st[k] for k in ("accepted", "held", "surfaced", "buffered_bytes", "fd_exhaustion")}
            out["nofile"] = list(resource.getrlimit(resource.RLIMIT_NOFILE))
            print(json.dumps(out), flush=True)
        else:
            print(json.dumps({"error": f"unknown command {cmd!r}"}), flush=True)


def serve_scale_workers(args: argparse.Namespace) -> None:
    """``--workers`` processes on one listen socket, each a FilteredListener with its own engine (the model of
    ``acceptfilter.workers``): together they hold more than one process's RLIMIT_NOFILE allows.

    ``stats`` answers the sum over workers, each worker's counts and their pids. Exits at EOF.
    """
    raise_nofile(args.nofile)
    lsock = listen(args.host, args.port, args.backlog)
    links: list[socket.socket] = []
    pids: list[int] = []
    for _ in range(args.workers):
        ours, theirs = socket.socketpair()
        pid = os.fork()
        if pid == 0:
            ours.close()
            for other in links:
                other.close()
            _scale_worker(lsock, theirs, args)
            os._exit(0)
        theirs.close()
        links.append(ours)
        pids.append(pid)
    lsock.close()
    for link in links:
        link.recv(16)  # each worker says it is wrapped and serving
    print(f"READY {args.port}", flush=True)
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "stats":
            each = []
            for link in links:
                link.sendall(b"s")
                each.append(json.loads(link.makefile().readline()))
            out: dict[str, Any] = {k: sum(int(e[k]) for e in each) for k in ("accepted", "held", "surfaced",
                                                                                 "buffered_bytes", "fd_exhaustion")}
            out["per_worker_held"] = [e["held"] for e in each]
            out["pids"] = pids
            out["nofile"] = list(resource.getrlimit(resource.RLIMIT_NOFILE))
            print(json.dumps(out), flush=True)
        else:
            print(json.dumps({"error": f"unknown command {cmd!r}"}), flush=True)
    for link in links:
        link.close()
    for pid in pids:
        os.waitpid(pid, 0)


def _scale_worker(lsock: socket.socket, link: socket.socket, args: argparse.Namespace) -> None:
    import select

    import acceptfilter

    listener = acceptfilter.wrap(lsock, "httpready", core="c", timeout=args.hold_timeout, max_held=args.max_held,
                                 on_timeout="close")
    # Wait on the readiness fd, then accept without blocking: the engine's own thread does the holding,
    # so its counters are current whenever the parent asks.
    listener.setblocking(False)
    poller = select.poll()
    poller.register(listener.fileno(), select.POLLIN)

    def answer() -> None:
        while True:
            poller.poll(1000)
            try:
                conn, _ = listener.accept()
            except BlockingIOError:
                continue
            except OSError:
                return
            conn.setblocking(True)
            answer_one(conn)

    threading.Thread(target=answer, daemon=True).start()
    link.sendall(b"r")
    while link.recv(1):
        st = listener.stats()
        link.sendall((json.dumps({k: st[k] for k in ("accepted", "held", "surfaced", "buffered_bytes",
                                                      "fd_exhaustion")}) + "\n").encode())
    listener.close()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.servers")
    p.add_argument("kind", choices=["echo", "echo-selector", "surface", "scale", "scale-workers"])
    p.add_argument("--mode", default="plain", choices=sorted(MODES))
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--backlog", type=int, default=4096)
    p.add_argument("--count", type=int, default=1000, help="surface: requests to record")
    p.add_argument("--max-seconds", type=float, default=60.0, help="surface: give up after this long")
    p.add_argument("--hold-timeout", type=float, default=300.0, help="scale: the listener's deadline")
    p.add_argument("--max-held", type=int, default=100_000, help="scale: the listener's max_held")
    p.add_argument("--nofile", type=int, default=120_000, help="scale: RLIMIT_NOFILE to ask for")
    p.add_argument("--workers", type=int, default=8, help="scale-workers: processes")
    args = p.parse_args(argv)
    if args.kind == "scale-workers" and not args.port:
        from bench.common import free_port

        args.port = free_port(args.host)
    {"echo": serve_echo, "echo-selector": serve_echo_selector, "surface": serve_surface, "scale": serve_scale,
     "scale-workers": serve_scale_workers}[args.kind](args)


if __name__ == "__main__":
    main()
