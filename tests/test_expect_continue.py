"""``Expect: 100-continue`` with ``httpready:body=N``: the head is ready at its end.

The client holds its body back until the server answers ``100 Continue``: a
filter waiting for that body waits for its deadline (behind ``run -- uvicorn``
a 10 KB upload took 5.00 s instead of a millisecond; through ``serve``'s relay
it was dropped). Real curl uploads (curl adds the header itself to bodies over
1 KB, up to 8.x, or over 1 MB since), told to wait 60 s for the 100, so a
filter that waited would show as a timeout, not as curl giving up on the 100.
"""

from __future__ import annotations

import hashlib
import http.server
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from acceptfilter.filters.httpready import HttpReady

from acceptfilter import Verdict, wrap

from .conftest import free_port

CURL = shutil.which("curl")
needs_curl = pytest.mark.skipif(CURL is None, reason="curl is not installed (requirements/apt-test.txt)")
CLI = [sys.executable, "-m", "acceptfilter.cli"]
LIMIT = 60.0
BIG = 5 * 1024 * 1024
#: body=N and max_bytes large enough that a 5 MB body would be waited for without the Expect rule.
BIG_SPEC = f"httpready:body={BIG + 65536},max_bytes={BIG + 131072}"

HEAD = b"PUT /up HTTP/1.1\r\nHost: x\r\nContent-Length: 11\r\nExpect: 100-continue\r\n\r\n"


@pytest.mark.parametrize("expect", [b"Expect: 100-continue", b"expect:100-Continue", b"EXPECT :\t100-CONTINUE "])
def test_expect_makes_the_head_ready_in_every_split(expect: bytes) -> None:
    data = HEAD.replace(b"Expect: 100-continue", expect) + b"hello world"
    end = data.index(b"\r\n\r\n") + 4
    flt = HttpReady(body=100)
    for cut in range(1, len(data) + 1):
        session = flt.session()
        verdicts = [session.check(data[:cut], False).verdict]
        decision = session.check(data, False)
        assert decision.verdict is Verdict.ACCEPT and decision.consume == 0
        assert decision.info["expect"] == "100-continue" and decision.info["body"] == "not awaited"
        if cut < end:
            assert verdicts == [Verdict.WAIT]


@pytest.mark.parametrize("head", [
    HEAD.replace(b"Expect: 100-continue\r\n", b""),  # no Expect: the body is awaited
    HEAD.replace(b"100-continue", b"something-else"),  # not the one expectation there is
    HEAD.replace(b"Expect: 100-continue", b"X-Note: x\r\n expect: 100-continue"),  # not a header of its own
], ids=["none", "other-value", "not-a-header"])
def test_without_the_expectation_the_body_is_awaited(head: bytes) -> None:
    flt = HttpReady(body=100)
    assert flt.check(head, False).verdict is Verdict.WAIT
    done = flt.check(head + b"hello world", False)
    assert done.verdict is Verdict.ACCEPT and done.info["body"] == "complete" and "expect" not in done.info


def _upload(tmp_path: Path, size: int) -> tuple[Path, str]:
    path = tmp_path / f"upload-{size}.bin"
    data = (b"0123456789abcdef" * (size // 16 + 1))[:size]
    path.write_bytes(data)
    return path, hashlib.sha256(data).hexdigest()


def _curl_put(url: str, path: Path) -> subprocess.CompletedProcess[str]:
    """curl -T: a PUT with curl's own ``Expect: 100-continue``, waiting up to a minute for the 100."""
    return subprocess.run(
        [CURL or "curl", "-sS", "-T", str(path), "--expect100-timeout", str(LIMIT), "--max-time", str(LIMIT),
         "-w", " %{http_code}", url],
        capture_output=True, text=True, timeout=LIMIT + 10, check=False,
    )


class _Echo(http.server.BaseHTTPRequestHandler):
    """HTTP/1.1: sends 100 Continue itself (handle_expect_100), reads the body, answers its sha256."""

    protocol_version = "HTTP/1.1"

    def do_PUT(self) -> None:
        length = int(self.headers["Content-Length"])
        digest = hashlib.sha256(self.rfile.read(length)).hexdigest().encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(digest)))
        self.end_headers()
        self.wfile.write(digest)

    def log_message(self, format: str, *args: object) -> None:
        pass


@needs_curl
@pytest.mark.parametrize("size", [10_000, BIG], ids=["10KB", "5MB"])
def test_curl_upload_through_a_listener(core: str, listen_sock: socket.socket, tmp_path: Path, size: int) -> None:
    path, digest = _upload(tmp_path, size)
    port = listen_sock.getsockname()[1]
    with wrap(listen_sock, BIG_SPEC, core=core, timeout=LIMIT) as listener:
        out: list[subprocess.CompletedProcess[str]] = []
        client = threading.Thread(target=lambda: out.append(_curl_put(f"http://127.0.0.1:{port}/up", path)))
        client.start()
        try:
            listener.settimeout(LIMIT)
            sock, _, info = listener.accept_with_info()
            with sock:
                assert info.reason == "ready" and info["expect"] == "100-continue", info
                reader = sock.makefile("rb")
                while reader.readline() not in (b"\r\n", b""):
                    pass
                sock.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
                body = reader.read(size)
                answer = hashlib.sha256(body).hexdigest().encode()
                sock.sendall(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s"
                             % (len(answer), answer))
                reader.close()
        finally:
            client.join(LIMIT + 15)
    assert out and out[0].stdout == f"{digest} 200", out[0].stderr if out else "curl did not finish"
    assert info.held_for < LIMIT / 2  # ready at the head, not surfaced by the deadline


@pytest.fixture
def backend() -> Iterator[int]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Echo)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def _stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(LIMIT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(LIMIT)


@needs_curl
def test_curl_upload_through_serve_relay(backend: int, tmp_path: Path) -> None:
    """``serve`` relaying a route to a backend that answers the 100 itself."""
    port = free_port()
    proc = subprocess.Popen([*CLI, "serve", "--port", str(port), "--no-status", "--timeout", str(LIMIT),
                             "--route", f"web={BIG_SPEC}", "--forward", f"web=127.0.0.1:{backend}"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        assert proc.stdout is not None
        while (line := proc.stdout.readline()) and not line.startswith("Relaying on"):
            pass
        assert line.startswith("Relaying on"), "serve did not start"
        for size in (10_000, BIG):
            path, digest = _upload(tmp_path, size)
            out = _curl_put(f"http://127.0.0.1:{port}/up", path)
            assert out.stdout == f"{digest} 200", out.stderr
    finally:
        _stop(proc)


UVICORN_APP = '''
import hashlib

async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    digest, more = hashlib.sha256(), True
    while more:  # uvicorn answers 100 Continue on the first receive()
        message = await receive()
        digest.update(message.get("body", b""))
        more = message.get("more_body", False)
    body = digest.hexdigest().encode()
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"%d" % len(body))]})
    await send({"type": "http.response.body", "body": body})
'''


@needs_curl
def test_curl_upload_behind_run_uvicorn(tmp_path: Path) -> None:
    pytest.importorskip("uvicorn", reason="uvicorn is not installed (the test extra)")
    (tmp_path / "app.py").write_text(UVICORN_APP)
    proc = subprocess.Popen([*CLI, "run", "--filter", BIG_SPEC, "--timeout", str(LIMIT), "--",
                             "uvicorn", "app:app", "--port", "0"],
                            cwd=tmp_path, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        port = 0
        for line in proc.stderr:
            if m := re.search(r"[Rr]unning on http://127\.0\.0\.1:(\d+)", line):
                port = int(m.group(1))
                break
        assert port, "uvicorn did not start"
        threading.Thread(target=proc.stderr.read, daemon=True).start()  # keep its pipe from filling
        for size in (10_000, BIG):
            path, digest = _upload(tmp_path, size)
            out = _curl_put(f"http://127.0.0.1:{port}/up", path)
            assert out.stdout == f"{digest} 200", out.stderr
    finally:
        _stop(proc)
