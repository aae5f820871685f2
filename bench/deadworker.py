"""What a dead worker costs: one engine per worker on a shared listen socket vs SO_REUSEPORT shards.

Two worker processes, each with its own engine (``httpready``, C core) answering
connection-per-request. Idle clients are held by both. Worker A is stopped
(SIGSTOP: it accepts nothing more), complete requests are sent, then A is killed
(SIGKILL). Counted: requests answered vs lost (reset or closed unanswered), and
held idle connections that were closed under their clients.

    python -m bench.deadworker [--quick]        # writes bench/results/deadworker.json
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import select
import signal
import socket
import sys
import threading
import time
from typing import Any

from bench.common import free_port, raise_nofile, write_result
from bench.servers import answer_one

IP_BIND_ADDRESS_NO_PORT = 24


def _worker(sock: socket.socket) -> None:
    import acceptfilter

    listener = acceptfilter.wrap(sock, "httpready", timeout=120, on_timeout="close")
    while True:
        try:
            conn, _ = listener.accept()
        except OSError:
            os._exit(0)
        threading.Thread(target=answer_one, args=(conn,), daemon=True).start()


def _listen(port: int, reuse_port: bool) -> socket.socket:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    s.bind(("127.0.0.1", port))
    s.listen(4096)
    return s


def _connect(port: int, i: int) -> socket.socket:
    s = socket.socket()
    s.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
    s.bind((f"127.0.0.{2 + i // 20_000}", 0))  # many source ports: SO_REUSEPORT hashes on them
    s.setblocking(False)
    rc = s.connect_ex(("127.0.0.1", port))
    if rc not in (0, errno.EINPROGRESS):
        s.close()
        raise OSError(rc, os.strerror(rc))
    return s


def _lost(s: socket.socket) -> bool:
    """Closed or reset under the client (an idle connection must still be open)."""
    try:
        return s.recv(1) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


def _answered(socks: list[socket.socket], timeout: float) -> int:
    got = {s.fileno(): b"" for s in socks}
    by_fd = {s.fileno(): s for s in socks}
    poller = select.poll()
    for fd in by_fd:
        poller.register(fd, select.POLLIN)
    open_ = set(by_fd)
    stop_at = time.monotonic() + timeout
    while open_ and time.monotonic() < stop_at:
        for fd, _ in poller.poll(200):
            try:
                chunk = by_fd[fd].recv(4096)
            except OSError:
                chunk = b""
            got[fd] += chunk
            if not chunk:
                open_.discard(fd)
                poller.unregister(fd)
    return sum(1 for v in got.values() if v.startswith(b"HTTP/1.1 200"))


def _wait_connected(socks: list[socket.socket], timeout: float) -> None:
    poller = select.poll()
    for s in socks:
        poller.register(s.fileno(), select.POLLOUT)
    pending = {s.fileno() for s in socks}
    stop_at = time.monotonic() + timeout
    while pending and time.monotonic() < stop_at:
        for fd, _ in poller.poll(200):
            pending.discard(fd)
            poller.unregister(fd)


def one(mode: str, *, idle: int, requests: int) -> dict[str, Any]:
    port = free_port()
    reuse = mode == "reuseport"
    shared = None if reuse else _listen(port, False)
    pids = []
    for _ in range(2):
        sock = _listen(port, True) if reuse else shared
        assert sock is not None
        pid = os.fork()
        if pid == 0:
            _worker(sock)
        pids.append(pid)
        if reuse:
            sock.close()
    if shared is not None:
        shared.close()
    time.sleep(0.5)  # both engines running (a bench, not a test)
    held = [_connect(port, i) for i in range(idle)]
    time.sleep(1.0)
    a = pids[0]
    os.kill(a, signal.SIGSTOP)
    time.sleep(0.2)
    req = []
    for i in range(requests):
        s = _connect(port, idle + i)
        req.append(s)
    _wait_connected(req, 5)
    for s in req:
        try:
            s.sendall(b"GET / HTTP/1.1\r\nHost: b\r\nConnection: close\r\n\r\n")
        except OSError:
            pass
    time.sleep(0.5)
    os.kill(a, signal.SIGKILL)
    os.waitpid(a, 0)
    answered = _answered(req, 10)
    time.sleep(0.5)
    lost_held = sum(1 for s in held if _lost(s))
    for s in held + req:
        s.close()
    os.kill(pids[1], signal.SIGKILL)
    os.waitpid(pids[1], 0)
    return {"mode": mode, "requests_sent_while_worker_stopped": requests, "answered": answered,
            "lost": requests - answered, "idle_held": idle, "idle_closed_when_worker_died": lost_held}


def run(*, quick: bool) -> dict[str, Any]:
    raise_nofile(20_000)
    idle, requests = (200, 100) if quick else (2000, 1000)
    rounds = 1 if quick else 3
    results = [one(mode, idle=idle, requests=requests) for _ in range(rounds) for mode in ("shared", "reuseport")]
    return {"benchmark": "deadworker",
            "config": {"workers": 2, "filter": "httpready (C core)", "idle": idle, "requests": requests,
                       "rounds": rounds},
            "results": results}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    from bench import machine

    result = {"benchmark": "deadworker", "quick": args.quick, "date": time.strftime("%Y-%m-%d"),
              "machine": machine.facts(), **run(quick=args.quick)}
    print(json.dumps(result["results"], indent=1))
    print(write_result("deadworker", result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
