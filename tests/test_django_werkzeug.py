"""Django's runserver and werkzeug's dev server (both socketserver-based) through httpready, with curl."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from werkzeug.serving import make_server

from acceptfilter.integrations.socketserver import install
from acceptfilter.integrations.wsgi import environ_info

from .conftest import wait_for
from .serverutil import IDLE, SLOW, Counter, close_all, curl, interrupt, needs_curl, open_held, wait_held

ROOT = Path(__file__).parent.parent


def get(port: int, path: str) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as c:
        c.sendall(f"GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n".encode())
        data = b""
        while chunk := c.recv(65536):
            data += chunk
    return data.partition(b"\r\n\r\n")[2]


@needs_curl
def test_django_runserver_with_the_filtered_server_class() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DJANGO_SETTINGS_MODULE": "tests.django_site.settings"}
    proc = subprocess.Popen([sys.executable, "-m", "django", "runserver", "127.0.0.1:0", "--noreload", "--skip-checks"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT, env=env)
    try:
        assert proc.stdout is not None
        port = 0
        for line in proc.stdout:
            m = re.search(r"http://127\.0\.0\.1:(\d+)/", line)
            if m:
                port = int(m.group(1))
                break
        assert port, "runserver did not say where it listens"
        clients = open_held(port)

        def state() -> dict[str, Any]:
            result: dict[str, Any] = json.loads(get(port, "/state"))
            return result

        wait_for(lambda: state()["stats"]["held"] >= IDLE + SLOW, 30)
        assert curl(port, "/django") == (200, "hello /django ready")
        got = state()
        assert got["seen"] == ["/django"]
        assert got["stats"]["held"] == IDLE + SLOW
        assert got["stats"]["surfaced"] == got["stats"]["accepted"] - IDLE - SLOW, "held connections reached Django"
        close_all(clients)
    finally:
        interrupt(proc)


@needs_curl
def test_werkzeug_make_server_with_install(core: str) -> None:
    """Flask's and werkzeug's dev server is a socketserver: ``install()`` is all it needs."""
    counter = Counter()

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        counter.add(environ["PATH_INFO"])
        info = environ_info(environ)  # through environ["werkzeug.socket"]
        body = f"hello {info['target'] if info else None} {info.reason if info else None}".encode()
        start_response("200 OK", [("Content-Length", str(len(body)))])
        return [body]

    server = make_server("127.0.0.1", 0, app, threaded=True)
    listener = install(server, "httpready", timeout=60, core=core)
    port = server.server_port
    t = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    clients = open_held(port)
    try:
        wait_held(listener.stats)
        assert curl(port, "/werkzeug") == (200, "hello /werkzeug ready")
        assert counter.seen == ["/werkzeug"]
        stats = listener.stats()
        assert stats["held"] == IDLE + SLOW and stats["surfaced"] == 1, "held connections reached werkzeug"
    finally:
        close_all(clients)
        server.shutdown()
        server.server_close()
        t.join(10)
    assert listener.closed
