"""What every real-server test does: hold idle and half-sent clients, then ask curl for a page."""

from __future__ import annotations

import shutil
import socket
import subprocess
import threading
from collections.abc import Callable
from typing import Any

import pytest

from .conftest import wait_for

CURL = shutil.which("curl")
needs_curl = pytest.mark.skipif(CURL is None, reason="curl is not installed (scripts/test.sh installs it)")

IDLE, SLOW = 20, 5


def open_held(port: int, idle: int = IDLE, slow: int = SLOW) -> list[socket.socket]:
    """``idle`` clients that send nothing and ``slow`` that send half a request head."""
    clients = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(idle + slow)]
    for c in clients[idle:]:
        c.sendall(b"GET /slow HTTP/1.1\r\nHost: x\r\n")
    return clients


def wait_held(stats: Callable[[], dict[str, Any]], count: int = IDLE + SLOW, timeout: float = 30.0) -> None:
    """Wait (on the engine's counters, not a sleep) until ``count`` connections are held."""
    wait_for(lambda: stats()["held"] >= count, timeout)


def curl(port: int, path: str = "/ready", timeout: float = 20.0) -> tuple[int, str]:
    """(status, body) of a real curl GET."""
    out = subprocess.run(
        [CURL or "curl", "-sS", "--max-time", str(timeout), "-w", " %{http_code}", f"http://127.0.0.1:{port}{path}"],
        capture_output=True, text=True, check=False, timeout=timeout + 10,
    )
    body, _, code = out.stdout.rpartition(" ")
    assert code.isdigit(), f"curl failed: {out.stderr.strip()}"
    return int(code), body


def close_all(clients: list[socket.socket]) -> None:
    for c in clients:
        c.close()


class Counter:
    """Thread-safe list of what the application saw."""

    def __init__(self) -> None:
        self.seen: list[str] = []
        self._lock = threading.Lock()

    def add(self, item: str) -> None:
        with self._lock:
            self.seen.append(item)


async def await_held(stats: Callable[[], dict[str, Any]], count: int = IDLE + SLOW, timeout: float = 30.0) -> None:
    """Like :func:`wait_held`, from inside the loop the engine runs on (it must keep running meanwhile)."""
    import asyncio
    import time

    deadline = time.monotonic() + timeout
    while stats()["held"] < count:
        if time.monotonic() > deadline:
            raise AssertionError(f"only {stats()['held']} of {count} connections held after {timeout:g} s")
        await asyncio.sleep(0.01)


def interrupt(proc: subprocess.Popen[Any]) -> None:
    """Stop a server process the way Ctrl-C does (SIGINT), and kill it if it does not stop."""
    import signal

    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def asgi_app_source(prefix: str) -> str:
    """An ASGI app (as the source of an app.py) answering ``<prefix> <target the filter saw>``.

    ``prefix`` is a Python expression evaluated per request, in single quotes if a string (``"'hello'"``).
    """
    return f'''
import os
from acceptfilter.integrations.asgi import scope_info

async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    info = scope_info(scope)
    body = f"{{{prefix}}} {{info['target'] if info else None}}".encode()
    await send({{"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"%d" % len(body))]}})
    await send({{"type": "http.response.body", "body": body}})
'''
