"""Held connections are visible in every deployment: ``stats --json``, ``top``'s screen and the metrics.

Each deployment runs as a user runs it (gunicorn through ``acceptfilter run``,
``run -- uvicorn``, ``serve --workers 2``, a plain script calling ``wrap()``);
real clients hold half-sent requests; the test reads them back through the
command line, a pty running ``acceptfilter top`` (screen read with pyte) and
the Prometheus endpoint (or ``acceptfilter metrics PORT`` for the plain script).
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from acceptfilter.statsfile import read_port

from .conftest import free_port, wait_for
from .ptyscreen import PtyScreen

LIMIT = 90.0
HELD = 3

APP = '''
def wsgi(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"hello\\n"]


async def asgi(scope, receive, send):
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": b"hello\\n"})
'''

SCRIPT = '''
import signal, socket, sys, threading
import acceptfilter

sock = socket.create_server(("127.0.0.1", int(sys.argv[1])))
listener = acceptfilter.wrap(sock, "httpready", timeout=60)
stop = threading.Event()
signal.signal(signal.SIGTERM, lambda *a: stop.set())
print("ready", flush=True)
stop.wait()
listener.close()
'''

CLI = [sys.executable, "-m", "acceptfilter.cli"]


def command(name: str, tmp_path: Path, port: int, mport: int) -> tuple[list[str], int]:
    """The deployment's command line and how many engines it runs."""
    if name == "gunicorn":
        return [*CLI, "run", "--timeout", "60", "--metrics-port", str(mport), "--", "gunicorn", "--no-control-socket",
                "-w", "2", "-b", f"127.0.0.1:{port}", "--chdir", str(tmp_path), "app:wsgi"], 1
    if name == "uvicorn":
        return [*CLI, "run", "--timeout", "60", "--metrics-port", str(mport), "--", "uvicorn", "--app-dir", str(tmp_path),
                "--port", str(port), "app:asgi"], 1
    if name == "serve-workers":
        return [*CLI, "serve", "--workers", "2", "--timeout", "60", "--port", str(port), "--metrics-port", str(mport),
                "--directory", str(tmp_path), "--no-status"], 2
    return [sys.executable, str(tmp_path / "plain.py"), str(port)], 1


@pytest.fixture(params=["gunicorn", "uvicorn", "serve-workers", "wrap"])
def deployment(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, int, int]]:
    (tmp_path / "app.py").write_text(APP)
    (tmp_path / "plain.py").write_text(SCRIPT)
    port, mport = free_port(), free_port()
    argv, engines = command(request.param, tmp_path, port, mport)
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=tmp_path)
    try:
        # The engines' stats files are how everything below finds them: wait for all of them.
        wait_for(lambda: proc.poll() is not None or len(read_port(port)) >= engines, LIMIT)
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
        yield request.param, port, mport
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    wait_for(lambda: not read_port(port), 30)  # every engine removed its file at close


def _stats(port: int) -> dict:
    out = subprocess.run([*CLI, "stats", str(port), "--json"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return dict(json.loads(out.stdout))


def _metrics(name: str, port: int, mport: int) -> str:
    if name == "wrap":  # a plain script has no endpoint of its own: the CLI reads its stats file
        out = subprocess.run([*CLI, "metrics", str(port)], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        return out.stdout
    with urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=30) as response:
        return str(response.read().decode())


def _held_row(screen: str, port: int) -> list[str]:
    return next((line.split() for line in screen.splitlines() if line.split()[:1] == [str(port)]), [])


def test_held_connections_show_in_stats_top_and_metrics(deployment: tuple[str, int, int]) -> None:
    pytest.importorskip("prometheus_client")
    name, port, mport = deployment
    clients = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(HELD)]
    try:
        for c in clients:
            c.sendall(b"GET /slow HTTP/1.1\r\nHost: x\r\n")  # half a request head: held as partial
        wait_for(lambda: sum(e.stats.get("held", 0) for e in read_port(port)) >= HELD, LIMIT)

        data = _stats(port)
        assert data["total"]["held"] == HELD and data["total"]["accepted"] >= HELD
        assert sum(e["stats"]["held"] for e in data["engines"]) == HELD  # per process, and summed
        assert data["listeners"] and data["listeners"][0]["port"] == port  # the kernel's side, merged

        screen = PtyScreen([*CLI, "top", "--port", str(port), "--interval", "0.3"], columns=80, lines=24)
        try:
            text = screen.wait_for(lambda t: _held_row(t, port)[2:3] == [str(HELD)], LIMIT)
            assert text.splitlines()[0].startswith("acceptfilter top")  # the header, at the top of the screen
            screen.send(b"q")
            assert screen.proc.wait(30) == 0
        finally:
            screen.close()

        deadline = time.monotonic() + LIMIT
        sample = f'acceptfilter_held_connections{{port="{port}"}} {float(HELD)}'
        while sample not in (text := _metrics(name, port, mport)) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert sample in text, text
        assert f'acceptfilter_kernel_accept_queue_connections{{port="{port}"}}' in text
    finally:
        for c in clients:
            c.close()
