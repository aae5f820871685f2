"""Daphne (Twisted's asyncio reactor, no engine thread) serving an ASGI app through httpready, with curl.

Daphne installs Twisted's asyncio reactor process-wide on import, so the
server runs in a child process (tests/daphne_child.py); the test reads the
listener's counters through the server's own ``/state`` page.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

from .conftest import wait_for
from .serverutil import IDLE, SLOW, close_all, curl, needs_curl, open_held

CHILD = Path(__file__).with_name("daphne_child.py")


def state(port: int) -> dict[str, Any]:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as c:
        c.sendall(b"GET /state HTTP/1.0\r\nHost: t\r\n\r\n")
        data = b""
        while chunk := c.recv(65536):
            data += chunk
    result: dict[str, Any] = json.loads(data.partition(b"\r\n\r\n")[2])
    return result


@needs_curl
def test_daphne_serves_curl_while_idle_and_slow_are_held(core: str) -> None:
    proc = subprocess.Popen([sys.executable, str(CHILD), core], stdout=subprocess.PIPE, text=True,
                            cwd=CHILD.parent.parent)
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        clients = open_held(port)
        wait_for(lambda: state(port)["stats"]["held"] >= IDLE + SLOW, 30)
        assert curl(port, "/daphne") == (200, "hello /daphne ready")
        got = state(port)
        assert got["seen"] == ["/daphne"]
        assert got["stats"]["held"] == IDLE + SLOW
        assert not [t for t in got["threads"] if t.startswith("acceptfilter")], "no engine thread"
        # What reached Daphne: the /state polls and curl, nothing else.
        assert got["stats"]["surfaced"] == got["stats"]["accepted"] - IDLE - SLOW
        close_all(clients)
        assert curl(port, "/stop") == (200, "hello /stop ready")
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
