"""A small HTTP server for Prometheus scrapes (``--metrics-port``)."""

from __future__ import annotations

import http.server
import socket
import threading
from collections.abc import Callable
from typing import Any

from .listen import listen_error


def serve_metrics(bind: str, port: int, stats: Callable[[], dict[str, Any]]) -> http.server.HTTPServer:
    """A small HTTP server for Prometheus: ``/metrics`` in the text format, read from stats() at scrape time."""
    from ...metrics import exposition

    class Source:
        def stats(self) -> dict[str, Any]:
            return stats()

    class Metrics(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path.split("?", 1)[0] not in ("/metrics", "/"):
                self.send_error(404, "only /metrics here")
                return
            body = exposition(Source())
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass  # scrapes every few seconds would bury the access log

    host = "127.0.0.1" if bind.startswith("unix:") else bind.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET

    class Server(http.server.ThreadingHTTPServer):
        address_family = family
        daemon_threads = True

    try:
        server = Server((host, port), Metrics)
    except OSError as exc:
        raise listen_error(f"{host}:{port}" if family == socket.AF_INET else f"[{host}]:{port}", exc, "--metrics-port") from None
    threading.Thread(target=server.serve_forever, name="acceptfilter-metrics", daemon=True).start()
    return server
