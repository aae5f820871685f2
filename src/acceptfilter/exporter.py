"""A small HTTP server for Prometheus scrapes: ``/metrics`` in the text format, built at scrape time.

What it exports is a port (every engine publishing on it, summed, with the
kernel's view: :class:`acceptfilter.metrics.PortCollector`) or a callable that
returns one engine's stats (a UNIX socket has no port). It runs in a thread
(:func:`start`) or, in a parent process that must not start one (``--workers``),
a request at a time from the parent's own loop (:meth:`MetricsServer.serve_for`).
"""

from __future__ import annotations

import http.server
import socket
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from .errors import listen_error

__all__ = ["MetricsServer", "metrics_server", "parse_address", "start"]


def parse_address(text: str, option: str) -> tuple[str, int]:
    """``PORT`` (on 127.0.0.1) or ``HOST:PORT`` (``[::]:9100``), one line naming ``option`` otherwise."""
    from .errors import AcceptFilterError

    host, sep, port = str(text).strip().rpartition(":")
    try:
        number = int(port)
    except ValueError:
        number = -1
    if not 0 <= number <= 65535:
        raise AcceptFilterError(f"{option} takes PORT or HOST:PORT, not {text!r}")
    return (host.strip("[]") if sep and host else "127.0.0.1"), number

Source = int | Sequence[int] | Callable[[], dict[str, Any]]


def _body(source: Source) -> bytes:
    from .metrics import exposition

    if not callable(source):
        return exposition(source)

    class Stats:
        def stats(self) -> dict[str, Any]:
            return source()  # type: ignore[operator]

    return exposition(Stats())


class _Handler(http.server.BaseHTTPRequestHandler):
    timeout = 10  # a scraper that stalls does not hold a threadless parent for long

    def do_GET(self) -> None:
        if self.path.split("?", 1)[0] not in ("/metrics", "/"):
            self.send_error(404, "only /metrics here")
            return
        body = _body(self.server.source)  # type: ignore[attr-defined]
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # scrapes every few seconds would bury the access log


class MetricsServer(http.server.ThreadingHTTPServer):
    """The scrape endpoint; ``source`` is what it exports."""

    daemon_threads = True
    #: A gunicorn reload starts the new filter process before the old one exits: both may bind it meanwhile.
    allow_reuse_port = True
    #: False: each scrape is answered in the thread that calls serve_for() (a threadless parent).
    threaded = False
    source: Source

    def serve_for(self, seconds: float) -> None:
        """Answer scrapes for about ``seconds``, in this thread (a supervising parent's idle time)."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            self.timeout = left
            self.handle_request()

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self.threaded:
            self.finish_request(request, client_address)  # no thread: answered here, then closed
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    @property
    def url(self) -> str:
        host, port = str(self.server_address[0]), int(self.server_address[1])
        return f"http://{f'[{host}]' if ':' in host else host}:{port}/metrics"


def metrics_server(host: str, port: int, source: Source, *, option: str = "--metrics-port") -> MetricsServer:
    """Bind the scrape endpoint at ``host:port`` (one line naming ``option`` if it cannot)."""
    host = host.strip("[]") or "127.0.0.1"
    family = socket.AF_INET6 if ":" in host else socket.AF_INET

    class Server(MetricsServer):
        address_family = family

    try:
        server = Server((host, port), _Handler)
    except OSError as exc:
        raise listen_error(f"{host}:{port}" if family == socket.AF_INET else f"[{host}]:{port}", exc, option) from None
    server.source = source
    return server


def start(server: MetricsServer) -> threading.Thread:
    """Serve scrapes from a daemon thread."""
    server.threaded = True
    thread = threading.Thread(target=server.serve_forever, name="acceptfilter-metrics", daemon=True)
    thread.start()
    return thread
