"""socketserver / http.server behind a filter, answering a real curl."""

from __future__ import annotations

import http.server
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator

import pytest

import acceptfilter
from acceptfilter.integrations.socketserver import FilterMixIn, install

from .conftest import QuietHandler

CURL = shutil.which("curl")
needs_curl = pytest.mark.skipif(CURL is None, reason="curl is not installed (scripts/test.sh installs it)")


class CountingHandler(QuietHandler):
    """Counts the connections the application actually sees."""

    seen: list[str] = []
    lock = threading.Lock()

    def setup(self) -> None:
        with self.lock:
            self.seen.append(repr(self.client_address))
        super().setup()

    def body(self) -> bytes:
        info = acceptfilter.connection_info(self.request)
        return f"hello {info['host'] if info else None} {info.reason if info else None}\n".encode()


class FilteredThreadingServer(FilterMixIn, http.server.ThreadingHTTPServer):
    accept_filter = "httpready"
    accept_filter_options = {"timeout": 10}
    daemon_threads = True


@pytest.fixture
def server(core: str) -> Iterator[http.server.ThreadingHTTPServer]:
    CountingHandler.seen = []
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), CountingHandler)
    srv.daemon_threads = True
    install(srv, "httpready", timeout=10, core=core)
    t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05})
    t.start()
    yield srv
    srv.shutdown()
    srv.server_close()
    t.join(5)


@needs_curl
def test_http_server_answers_curl_through_httpready(server: http.server.ThreadingHTTPServer) -> None:
    port = server.server_address[1]
    idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(20)]
    out = subprocess.run([CURL, "-sS", "--max-time", "5", f"http://127.0.0.1:{port}/"],
                         capture_output=True, text=True, check=True)
    assert out.stdout == f"hello 127.0.0.1:{port} ready\n"
    # The application saw exactly one connection: the 20 idle ones are held.
    assert len(CountingHandler.seen) == 1
    assert server.socket.stats()["held"] == 20  # type: ignore[attr-defined]
    for c in idle:
        c.close()


def test_mixin_filters_at_activation() -> None:
    CountingHandler.seen = []
    srv = FilteredThreadingServer(("127.0.0.1", 0), CountingHandler)
    assert isinstance(srv.socket, acceptfilter.FilteredListener)
    t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05})
    t.start()
    try:
        port = srv.server_address[1]
        slow = socket.create_connection(("127.0.0.1", port))
        slow.sendall(b"GET / HTTP/1.1\r\nHo")
        client = socket.create_connection(("127.0.0.1", port), timeout=5)
        client.sendall(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")
        assert client.recv(4096).startswith(b"HTTP/1.0 200")
        assert len(CountingHandler.seen) == 1
        slow.sendall(b"st: y\r\n\r\n")
        slow.settimeout(5)
        assert slow.recv(4096).startswith(b"HTTP/1.0 200")  # BaseHTTPRequestHandler answers as HTTP/1.0
        assert len(CountingHandler.seen) == 2
        slow.close()
        client.close()
    finally:
        srv.shutdown()
        srv.server_close()
        t.join(5)
    with pytest.raises(OSError):
        srv.socket.accept()


def test_install_twice_is_refused(server: http.server.ThreadingHTTPServer) -> None:
    with pytest.raises(ValueError, match="already has an accept filter"):
        install(server, "dataready")


@pytest.mark.parametrize("queue_size", [5, 1000])
def test_a_tiny_listen_backlog_is_raised(queue_size: int) -> None:
    """socketserver listens with a backlog of 5, which a burst overflows (the hostile soak saw a
    handshake-completed client reset); install() raises it to MIN_BACKLOG and keeps a larger one."""
    from acceptfilter import diag
    from acceptfilter.integrations.socketserver import MIN_BACKLOG

    class Server(http.server.HTTPServer):
        request_queue_size = queue_size

    srv = Server(("127.0.0.1", 0), QuietHandler)
    try:
        assert diag.listen_backlog(srv.socket) == queue_size
        raw = srv.socket
        install(srv, "httpready")
        assert diag.listen_backlog(raw) == max(queue_size, MIN_BACKLOG)
    finally:
        srv.server_close()


def test_single_threaded_server_is_not_pinned_by_idle_clients(core: str) -> None:
    """The classic case: one worker, idle connections would block it forever."""
    srv = http.server.HTTPServer(("127.0.0.1", 0), CountingHandler)
    install(srv, "httpready", timeout=30, core=core)
    t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05})
    t.start()
    try:
        port = srv.server_address[1]
        idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(5)]
        start = time.monotonic()
        for _ in range(3):
            c = socket.create_connection(("127.0.0.1", port), timeout=3)
            c.sendall(b"GET / HTTP/1.0\r\n\r\n")
            assert c.recv(4096).startswith(b"HTTP/1.0 200")
            c.close()
        assert time.monotonic() - start < 3
        for c in idle:
            c.close()
    finally:
        srv.shutdown()
        srv.server_close()
        t.join(5)
