"""Defaults that protect (issue 14, item 1), and seed 004 still fixed, with nothing configured.

Worker-per-connection servers close what times out (a FIN, which a load
balancer sees) instead of surfacing it onto a worker; a connection that
sends its request before the deadline is served. The numbers under attack
(1,000 idle + 200 slowloris) are in bench/defaults.py and docs/benchmarks.md; gunicorn's
case is in test_gunicorn.py.
"""

from __future__ import annotations

import http.server
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from acceptfilter.integrations.socketserver import install
from acceptfilter.policy import WORKER_ON_TIMEOUT

from .conftest import QuietHandler, wait_for


def _fin_within(sock: socket.socket, seconds: float) -> bool:
    """True if the peer closed with a FIN (recv gives b""), not an RST, within ``seconds``."""
    sock.settimeout(seconds)
    try:
        return sock.recv(10) == b""
    except ConnectionResetError:
        return False


@pytest.fixture
def threading_server() -> Iterator[tuple[http.server.ThreadingHTTPServer, list[int]]]:
    handled: list[int] = []

    class Handler(QuietHandler):
        def handle(self) -> None:
            handled.append(1)
            super().handle()

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    yield server, handled
    server.shutdown()
    server.server_close()


REPLY_408 = b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"


def _answer(sock: socket.socket, seconds: float) -> bytes:
    """Everything the server sends until its FIN (an RST after a complete answer counts as the end too)."""
    sock.settimeout(seconds)
    got = b""
    try:
        while chunk := sock.recv(4096):
            got += chunk
    except ConnectionResetError:
        pass
    return got


def test_socketserver_install_defaults_idle_held_partial_408(threading_server: tuple[http.server.ThreadingHTTPServer, list[int]]) -> None:
    """Idle is not slow: the idle client outlives the partial deadline and is served when it sends;
    the slowloris head gets 408 Request Timeout and a FIN at the deadline; no handler thread sees it."""
    server, handled = threading_server
    listener = install(server, "httpready", timeout=0.5)  # only the deadline shortened, for the test's sake
    assert WORKER_ON_TIMEOUT == "close" and listener.idle_timeout == 620
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = listener.getsockname()[1]
    idle = socket.create_connection(("127.0.0.1", port), timeout=10)
    slow = socket.create_connection(("127.0.0.1", port), timeout=10)
    slow.sendall(b"GET / HTTP/1.1\r\n")  # a slowloris head that never ends
    try:
        assert _answer(slow, 10) == REPLY_408
        wait_for(lambda: listener.stats()["timeout_replies"] == 1 and listener.stats()["dropped"] == 1, timeout=10)
        time.sleep(0.5)  # well past the partial deadline: the idle one is still held
        stats = listener.stats()
        assert (stats["held_idle"], stats["held_partial"], stats["timed_out_idle"]) == (1, 0, 0)
        assert handled == []  # neither reached a handler thread
        idle.sendall(b"GET / HTTP/1.0\r\n\r\n")  # a balancer's pre-opened connection, used late
        assert _answer(idle, 10).startswith(b"HTTP/1.0 200")
        assert handled == [1]
    finally:
        idle.close()
        slow.close()


def test_on_timeout_surface_is_still_available(threading_server: tuple[http.server.ThreadingHTTPServer, list[int]]) -> None:
    server, handled = threading_server
    listener = install(server, "httpready", idle_timeout=0.3, on_timeout="surface")
    threading.Thread(target=server.serve_forever, daemon=True).start()
    with socket.create_connection(("127.0.0.1", listener.getsockname()[1]), timeout=10):
        wait_for(lambda: handled == [1], timeout=10)  # surfaced to a handler at the idle limit
