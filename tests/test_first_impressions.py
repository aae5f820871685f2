"""A new user's first minutes (issue 26, item 5): one line and the right status for every start-up
failure, each server's own lines once, no warning on a clean start, helpers listening where the calls
they stand in for do, every ``--log-format json`` line JSON, ``fuzz --import FILE`` finding its siblings.

Run as a user runs them: the real command in a subprocess, real servers, real clients on loopback.
"""

from __future__ import annotations

import json
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .conftest import drop_file_privilege, free_port
from .test_cli_serve import Served

CLI = [sys.executable, "-m", "acceptfilter.cli"]
LIMIT = 60.0  # seconds any start or stop may take on a loaded 2-core machine
CURL = shutil.which("curl")

ASGI_APP = '''
async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})
'''

WSGI_APP = '''
def app(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "2")])
    return [b"ok"]
'''


class Started:
    """A command whose stderr lines are read in a thread, so the test can wait for one."""

    def __init__(self, argv: list[str], cwd: Path) -> None:
        self.proc = subprocess.Popen(argv, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.seen: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.put(line)
        self.lines.put(None)

    def wait_for(self, pattern: str) -> re.Match[str]:
        deadline = time.monotonic() + LIMIT
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if line is None:
                break
            self.seen.append(line)
            if found := re.search(pattern, line):
                return found
        raise AssertionError(f"no stderr line matched {pattern!r}:\n{''.join(self.seen)}")

    def stop(self, sig: int) -> str:
        """Signal it, wait for it, and return every stderr line it wrote."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            self.proc.wait(LIMIT)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait(LIMIT)
        self.reader.join(LIMIT)
        while (line := self.lines.get_nowait()) is not None:
            self.seen.append(line)
        return "".join(self.seen)


@pytest.fixture
def started() -> Iterator[list[Started]]:
    running: list[Started] = []
    yield running
    for s in running:
        if s.proc.poll() is None:
            s.proc.kill()
            s.proc.wait(LIMIT)


def get(port: int, path: str = "/") -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=LIMIT) as response:
        return str(response.read().decode())


# -- start-up failures: one line, no traceback, the right status ----------------------------------------


@pytest.mark.parametrize("server", ["uvicorn", "hypercorn"])
def test_run_on_a_port_in_use_is_one_line(server: str, tmp_path: Path) -> None:
    (tmp_path / "app.py").write_text(ASGI_APP)
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        where = ["--port", str(port)] if server == "uvicorn" else ["--bind", f"127.0.0.1:{port}"]
        out = subprocess.run([*CLI, "run", "--", server, "app:app", *where], capture_output=True, text=True,
                             timeout=LIMIT, cwd=tmp_path)
    assert out.returncode == 2, out.stderr
    assert out.stderr == (f"acceptfilter: error: cannot listen on 127.0.0.1:{port}: the port is already in use; "
                          f"stop the other server or pick another {where[0]}\n"), out.stderr


@pytest.mark.parametrize("mode", [0o500, 0o000], ids=["folder-read-only", "folder-unsearchable"])
def test_serve_on_a_unix_socket_without_permission_is_one_line(mode: int, tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(mode)
    try:
        out = subprocess.run([*CLI, "serve", "--no-status", "--directory", str(tmp_path), "--bind",
                              f"unix:{locked}/af.sock"], capture_output=True, text=True, timeout=LIMIT,
                             cwd=tmp_path, preexec_fn=drop_file_privilege)
    finally:
        locked.chmod(0o700)
    assert out.returncode == 2, out.stderr
    assert out.stderr == (f"acceptfilter: error: cannot listen on unix:{locked}/af.sock: permission denied (the "
                          "socket's folder must be writable and every folder above it searchable by this user)\n")
    assert out.stdout == ""  # nothing announced


def test_run_uvicorn_with_an_app_that_does_not_load_announces_nothing(tmp_path: Path) -> None:
    port = free_port()
    out = subprocess.run([*CLI, "run", "--", "uvicorn", "nosuchmodule:app", "--port", str(port)],
                         capture_output=True, text=True, timeout=LIMIT, cwd=tmp_path)
    assert out.returncode == 3, out.stderr  # uvicorn's own status for a start-up failure
    assert out.stderr == 'ERROR:    Error loading ASGI app. Could not import module "nosuchmodule".\n', out.stderr
    with socket.socket() as probe:  # and nothing was left listening
        assert probe.connect_ex(("127.0.0.1", port)) != 0


def test_run_uvicorn_announces_once_listening(tmp_path: Path, started: list[Started]) -> None:
    (tmp_path / "app.py").write_text(ASGI_APP)
    s = Started([*CLI, "run", "--", "uvicorn", "app:app", "--port", "0"], tmp_path)
    started.append(s)
    port = int(s.wait_for(r"Uvicorn running on http://127\.0\.0\.1:(\d+) behind acceptfilter").group(1))
    assert get(port) == "ok"  # the line came after the listener was serving
    text = s.stop(signal.SIGINT)
    assert "Application startup complete" in text.split("Uvicorn running on")[0], text  # lifespan first
    assert text.count("Uvicorn running on") == 1 and "Traceback" not in text, text


# -- servers' own lines, once ----------------------------------------------------------------------------


def test_hypercorn_lines_print_once_under_run(tmp_path: Path, started: list[Started]) -> None:
    (tmp_path / "app.py").write_text(ASGI_APP)
    s = Started([*CLI, "run", "--", "hypercorn", "app:app", "--bind", "127.0.0.1:0"], tmp_path)
    started.append(s)
    port = int(s.wait_for(r"Running on http://127\.0\.0\.1:(\d+)").group(1))
    assert get(port) == "ok"
    text = s.stop(signal.SIGINT)
    assert s.proc.returncode == 0, text
    assert text.count("Running on") == 1, text
    assert "hypercorn.error" not in text, text  # the command's root handler printed a second copy


@pytest.mark.skipif(CURL is None, reason="curl is not installed")
@pytest.mark.parametrize("worker", ["sync", "gthread"])
def test_gunicorn_starts_without_a_warning(worker: str, tmp_path: Path, started: list[Started]) -> None:
    (tmp_path / "wsgi.py").write_text(WSGI_APP)
    port = free_port()
    s = Started([*CLI, "run", "--", "gunicorn", "wsgi:app", "--bind", f"127.0.0.1:{port}", "-k", worker,
                 "--workers", "1"], tmp_path)
    started.append(s)
    s.wait_for(r"acceptfilter: filtering .* for gunicorn's workers")  # the filter process is up
    out = subprocess.run([CURL or "curl", "-sS", "--max-time", "30", f"http://127.0.0.1:{port}/"],
                         capture_output=True, text=True, timeout=LIMIT)
    assert out.stdout == "ok", out.stderr
    text = s.stop(signal.SIGTERM)
    assert "Warning" not in text and "Traceback" not in text, text
    assert "Booting worker" in text, text


# -- helpers listen where the calls they stand in for listen ---------------------------------------------


def test_twisted_listen_defaults_to_every_interface_like_listen_tcp() -> None:
    pytest.importorskip("twisted", reason="twisted is part of the test extra")
    import asyncio

    from twisted.internet import protocol
    from twisted.internet.asyncioreactor import AsyncioSelectorReactor

    from acceptfilter.integrations.twisted import listen

    loop = asyncio.SelectorEventLoop()
    reactor = AsyncioSelectorReactor(loop)  # not installed: test_twisted makes its own too
    factory = protocol.Factory.forProtocol(protocol.Protocol)
    theirs = reactor.listenTCP(0, factory)
    ours = listen(reactor, 0, factory, timeout=5)
    try:
        assert ours.listener.getsockname()[0] == theirs.getHost().host == "0.0.0.0"
        with socket.create_connection(("127.0.0.1", ours.listener.getsockname()[1]), timeout=LIMIT):
            pass
    finally:
        theirs.stopListening()
        ours.stopListening()
        loop.close()


def test_trio_helper_defaults_to_every_interface_like_open_tcp_listeners() -> None:
    trio = pytest.importorskip("trio", reason="trio is part of the test extra")
    from acceptfilter.integrations.trio import open_filtered_tcp_listener

    async def main() -> tuple[set[str], str]:
        theirs = await trio.open_tcp_listeners(0)
        hosts = {listener.socket.getsockname()[0] for listener in theirs}
        for listener in theirs:
            await listener.aclose()
        ours = await open_filtered_tcp_listener(0, timeout=5)
        host = ours.listener.getsockname()[0]
        await ours.aclose()
        return hosts, host

    hosts, host = trio.run(main)
    assert host == "0.0.0.0" and host in hosts, (host, hosts)


def test_anyio_helper_defaults_to_every_interface_like_create_tcp_listener() -> None:
    anyio = pytest.importorskip("anyio", reason="anyio is part of the test extra")
    from anyio.abc import SocketAttribute

    from acceptfilter.integrations.anyio import open_filtered_tcp_listener

    async def main() -> tuple[set[str], str]:
        theirs = await anyio.create_tcp_listener(local_port=0)
        hosts = {listener.extra(SocketAttribute.local_address)[0] for listener in theirs.listeners}
        await theirs.aclose()
        ours = await open_filtered_tcp_listener(0, timeout=5)
        host = ours.listener.getsockname()[0]
        await ours.aclose()
        return hosts, host

    hosts, host = anyio.run(main)
    assert host in ("::", "0.0.0.0") and hosts == {host}, (host, hosts)  # "::" where the machine has IPv6


# -- --log-format json: every line JSON, one record per request -----------------------------------------


def test_log_format_json_every_line_and_one_record_per_request(tmp_path: Path) -> None:
    s = Served(["--port", "0", "--no-status", "--log-format", "json"], tmp_path)
    try:
        banner = json.loads(s.banner)  # stdout's line too
        assert banner["event"] == "serving" and banner["address"] == f"http://127.0.0.1:{s.port}/", banner
        assert get(s.port, "/hello.txt") == "hello\n"
        with pytest.raises(urllib.error.HTTPError) as missing:
            get(s.port, "/nope")
        assert missing.value.code == 404
        text = s.stderr_all()  # http.server logs an answer before it sends it: both records are in
    finally:
        s.stop()
    assert s.proc.returncode == 0
    assert s.proc.stdout is not None
    stdout = [*s.lines, *s.proc.stdout.read().splitlines(keepends=True)]
    records: list[dict[str, Any]] = [json.loads(line) for line in (*stdout, *text.splitlines()) if line.strip()]
    access = [r for r in records if r.get("type") == "access"]
    assert [(r["request"], r["status"]) for r in access if r["request"] != "GET /hello.txt HTTP/1.1"] == \
        [("GET /nope HTTP/1.1", "404")], access  # one record for the 404, with send_error's words in it
    assert next(r for r in access if r["status"] == "404")["error"] == "File not found"
    assert [r["status"] for r in access if r["request"] == "GET /hello.txt HTTP/1.1"] == ["200"], access


# -- fuzz --import FILE imports like `python FILE` ------------------------------------------------------


def test_fuzz_import_file_finds_the_modules_beside_it(tmp_path: Path) -> None:
    plugin = tmp_path / "plugin"
    plugin.mkdir()
    (plugin / "greeting.py").write_text('PREFIX = b"HELLO "\n')
    (plugin / "hellofilter.py").write_text(textwrap.dedent('''
        from greeting import PREFIX  # a sibling module, as a plugin author splits one
        from acceptfilter import REJECT, WAIT, Decision, Filter

        class Hello(Filter):
            name = "hello-sibling"

            def check(self, data: bytes, final: bool) -> Decision:
                if not PREFIX.startswith(data[: len(PREFIX)]):
                    return REJECT
                if b"\\n" in data:
                    return Decision.accept()
                return REJECT if final or len(data) >= self.max_bytes else WAIT
    '''))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = subprocess.run([*CLI, "fuzz", "--import", str(plugin / "hellofilter.py"), "hello-sibling", "--examples",
                          "30"], capture_output=True, text=True, timeout=300, cwd=elsewhere)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "hello-sibling" in out.stdout, out.stdout
