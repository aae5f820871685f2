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


def test_socketserver_install_defaults_to_close(threading_server: tuple[http.server.ThreadingHTTPServer, list[int]]) -> None:
    server, handled = threading_server
    listener = install(server, "httpready", timeout=0.5)  # only the deadline shortened, for the test's sake
    assert WORKER_ON_TIMEOUT == "close"
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = listener.getsockname()[1]
    idle = socket.create_connection(("127.0.0.1", port), timeout=10)
    slow = socket.create_connection(("127.0.0.1", port), timeout=10)
    slow.sendall(b"GET / HTTP/1.1\r\n")  # a slowloris head that never ends
    try:
        assert _fin_within(idle, 10)
        slow.settimeout(10)
        try:
            assert slow.recv(10) == b""
        except ConnectionResetError:
            pass  # closed with its partial head unread: the kernel may answer with an RST
        wait_for(lambda: listener.stats()["dropped"] == 2, timeout=10)
        assert handled == []  # neither reached a handler thread
        with socket.create_connection(("127.0.0.1", port), timeout=10) as c:
            c.sendall(b"GET / HTTP/1.0\r\n\r\n")
            assert c.recv(100).startswith(b"HTTP/1.0 200")
        assert handled == [1]
    finally:
        idle.close()
        slow.close()


def test_on_timeout_surface_is_still_available(threading_server: tuple[http.server.ThreadingHTTPServer, list[int]]) -> None:
    server, handled = threading_server
    listener = install(server, "httpready", timeout=0.3, on_timeout="surface")
    threading.Thread(target=server.serve_forever, daemon=True).start()
    with socket.create_connection(("127.0.0.1", listener.getsockname()[1]), timeout=10):
        wait_for(lambda: handled == [1], timeout=10)  # surfaced to a handler at the deadline
