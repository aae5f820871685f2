"""`acceptfilter run -- uvicorn|hypercorn ...`: an unchanged ASGI deployment behind httpready."""

from __future__ import annotations

import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

CURL = shutil.which("curl")
pytestmark = pytest.mark.skipif(CURL is None, reason="curl is not installed")

APP = '''
from acceptfilter.integrations.asgi import scope_info

async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    info = scope_info(scope)  # what httpready learnt from this connection's first request head
    body = f"hello {info['method']} {info['target']} {scope['path']};".encode() if info else b"hello, no info;"
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"%d" % len(body))]})
    await send({"type": "http.response.body", "body": body})
'''


@pytest.mark.parametrize(
    ("server", "settle"),
    [
        (["uvicorn", "app:app", "--port", "0", "--limit-concurrency", "3"], 0.1),
        (["uvicorn", "app:app", "--port", "0", "--limit-concurrency", "3", "--loop", "uvloop"], 0.1),
        (["hypercorn", "app:app", "--bind", "127.0.0.1:0", "--keep-alive", "1"], 1.3),
    ],
    ids=["uvicorn", "uvicorn-uvloop", "hypercorn"],
)
def test_run_wraps_an_unchanged_server(tmp_path: Path, server: list[str], settle: float) -> None:
    (tmp_path / "app.py").write_text(APP)
    cmd = [sys.executable, "-m", "acceptfilter.cli", "run", "--filter", "httpready", "--timeout", "30", "--", *server]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        port = 0
        for line in proc.stderr:
            if m := re.search(r"[Rr]unning on http://127\.0\.0\.1:(\d+)", line):
                port = int(m.group(1))
                break
        assert port, "the server did not start"
        idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(10)]
        # uvicorn: limit-concurrency 3 would answer 503; hypercorn: keep-alive 1 s would close them.
        time.sleep(settle)
        # Two requests on one kept-alive connection: the info is the connection's (its first head).
        out = subprocess.run([CURL or "curl", "-sS", "--max-time", "5", "-w", " %{http_code}\n",
                              f"http://127.0.0.1:{port}/a", f"http://127.0.0.1:{port}/b"],
                             capture_output=True, text=True, timeout=10)
        assert out.stdout == "hello GET /a /a; 200\nhello GET /a /b; 200\n", out.stderr
        for s in idle:
            s.settimeout(0.01)
            with pytest.raises(TimeoutError):  # still held open, never seen by the server
                s.recv(1)
            s.close()
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert proc.returncode in (0, -signal.SIGINT, 130)


def test_run_needs_a_known_server() -> None:
    out = subprocess.run([sys.executable, "-m", "acceptfilter.cli", "run", "--", "waitress-serve", "app:app"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 2
    assert "one of uvicorn, hypercorn, gunicorn" in out.stderr
