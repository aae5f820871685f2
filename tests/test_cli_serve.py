"""`acceptfilter serve` as an operator runs it: signals, reload, addresses, metrics, log formats, terminals.

Every test starts the real command in a subprocess and talks to it over real sockets
(TCP on loopback, a UNIX socket, a pseudo-terminal); nothing waits on a sleep.
"""

from __future__ import annotations

import ipaddress
import json
import os
import pty
import queue
import re
import select
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import free_port

CLI = [sys.executable, "-m", "acceptfilter.cli"]
LIMIT = 30.0  # seconds any condition may take on a loaded 2-core machine


class Served:
    """A running `acceptfilter serve` with its banner read; stderr lines are read on demand."""

    def __init__(self, args: list[str], tmp_path: Path, env: dict[str, str] | None = None) -> None:
        (tmp_path / "hello.txt").write_text("hello\n")
        self.proc = subprocess.Popen([*CLI, "serve", "--directory", str(tmp_path), *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        assert self.proc.stdout is not None
        self.lines: list[str] = []
        while True:
            line = self.proc.stdout.readline()
            self.lines.append(line)
            if not line or line.startswith("Serving") or '"event": "serving"' in line:  # text or --log-format json
                break
        assert line.startswith("Serving") or '"event": "serving"' in line, self.stderr_all()
        self.banner = line
        self.err: queue.Queue[str | None] = queue.Queue()
        self.reader = threading.Thread(target=self._read_stderr, daemon=True)
        self.reader.start()
        found = re.search(r" on (\S+) through", line)
        assert found
        self.where = found.group(1)

    @property
    def port(self) -> int:
        return int(self.where.rstrip("/").rsplit(":", 1)[1])

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.err.put(line)
        self.err.put(None)

    def stderr_line(self, predicate: str | None = None, timeout: float = LIMIT) -> str:
        """The next stderr line (that contains ``predicate``, if given), or fail after ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.err.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if line is None:
                break
            if predicate is None or predicate in line:
                return line
        raise AssertionError(f"no stderr line with {predicate!r} within {timeout}s")

    def stderr_all(self, sig: int = signal.SIGTERM) -> str:
        """Everything stderr has not yet given, once the server has stopped (by ``sig``)."""
        self.stop(sig)
        if not hasattr(self, "reader"):  # stopped before its banner: nobody reads stderr yet
            assert self.proc.stderr is not None
            return self.proc.stderr.read()
        self.reader.join(LIMIT)
        lines = []
        while (line := self.err.get_nowait()) is not None:
            lines.append(line)
        return "".join(lines)

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(LIMIT)


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[list[Served]]:
    started: list[Served] = []
    yield started
    for s in started:
        if s.proc.poll() is None:
            s.proc.kill()
            s.proc.wait(LIMIT)


def get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=LIMIT) as response:
        return str(response.read().decode())


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_and_ctrl_c_stop_the_same_way(sig: signal.Signals, serve: list[Served], tmp_path: Path) -> None:
    s = Served(["--port", "0", "--no-status"], tmp_path)
    serve.append(s)
    idle = socket.create_connection(("127.0.0.1", s.port))  # held when the signal comes: closed, not leaked
    err = s.stderr_all(sig)
    assert s.proc.returncode == 0
    assert err.strip().splitlines()[-1] == f"stopping ({sig.name})", err
    assert "Traceback" not in err
    idle.settimeout(LIMIT)
    assert idle.recv(10) == b""
    idle.close()


PLUGIN = '''
from acceptfilter import REJECT, WAIT, Decision, Filter

class HupReady(Filter):
    """A request head; version {version}{extra_doc}."""

    name = "hupready"

    def check(self, data: bytes, final: bool) -> Decision:
        if b"\\r\\n\\r\\n" not in data:
            return REJECT if final or len(data) >= self.max_bytes else WAIT
        {extra}
        return Decision.accept({{"version": {version}}})
'''


def _install_plugin(site: Path, version: int, extra: str = "") -> None:
    """A plugin 'installed' the way pip leaves one: a module and a dist-info with its entry point."""
    dist = site / "hupplugin-1.0.dist-info"
    dist.mkdir(parents=True, exist_ok=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: hupplugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[acceptfilter.filters]\nhupready = hupplugin:HupReady\n")
    code = PLUGIN.format(version=version, extra=extra, extra_doc=" (refuses /blocked)" if extra else "")
    (site / "hupplugin.py").write_text(textwrap.dedent(code))


def test_sighup_reloads_filters_without_dropping_held_connections(serve: list[Served], tmp_path: Path) -> None:
    site = tmp_path / "site"
    _install_plugin(site, 1)
    env = {**os.environ, "PYTHONPATH": str(site), "PYTHONDONTWRITEBYTECODE": "1"}
    s = Served(["--port", "0", "--no-status", "--timeout", "60", "--filter", "hupready"], tmp_path, env)
    serve.append(s)
    url = f"http://127.0.0.1:{s.port}"
    assert get(f"{url}/hello.txt") == "hello\n"
    held = []
    for path in ("/hello.txt", "/blocked"):  # half-sent: held by the filter across the reload
        conn = socket.create_connection(("127.0.0.1", s.port), timeout=LIMIT)
        conn.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n".encode())
        held.append(conn)
    # The plugin is upgraded in place: version 2 refuses /blocked.
    _install_plugin(site, 2, extra='if b" /blocked " in data.split(b"\\r\\n", 1)[0]:\n            return REJECT')
    s.proc.send_signal(signal.SIGHUP)
    assert "reloaded: 1 chain(s) rebuilt, 2 held connection(s) moved to them" in s.stderr_line("reloaded")
    for conn in held:
        conn.sendall(b"Connection: close\r\n\r\n")
    ok, blocked = (c.recv(100) for c in held)
    assert ok.startswith(b"HTTP/1.0 200"), ok       # never dropped, and served
    assert blocked == b"", blocked                  # judged by the new filter
    assert get(f"{url}/hello.txt") == "hello\n"
    # A reload that fails keeps the filters that work.
    (site / "hupplugin.py").write_text("this is not python\n")
    s.proc.send_signal(signal.SIGHUP)
    assert "reload failed, keeping the filters in place" in s.stderr_line("reload failed")
    assert get(f"{url}/hello.txt") == "hello\n"
    for conn in held:
        conn.close()
    assert s.stop() == 0


def _ipv6_loopback() -> bool:
    try:
        with socket.create_server(("::1", 0), family=socket.AF_INET6):
            return True
    except OSError:
        return False


@pytest.mark.skipif(not (_ipv6_loopback() and socket.has_dualstack_ipv6()), reason="no IPv6 loopback here")
def test_bind_any_ipv6_is_dual_stack(serve: list[Served], tmp_path: Path) -> None:
    s = Served(["--bind", "::", "--port", "0", "--no-status"], tmp_path)
    serve.append(s)
    assert s.where.startswith("http://[::]:")
    assert get(f"http://127.0.0.1:{s.port}/hello.txt") == "hello\n"
    assert get(f"http://[::1]:{s.port}/hello.txt") == "hello\n"


def test_bind_unix_socket(serve: list[Served], tmp_path: Path) -> None:
    path = tmp_path / "web.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))  # a server that died and left its socket file
    stale.close()
    s = Served(["--bind", f"unix:{path}", "--status-interval", "0.2"], tmp_path)
    serve.append(s)
    assert s.where == f"unix:{path}"
    out = subprocess.run(["curl", "-sS", "--max-time", "20", "--unix-socket", str(path), "http://local/hello.txt"],
                         capture_output=True, text=True, timeout=LIMIT)
    assert out.stdout == "hello\n", out.stderr
    assert '"GET /hello.txt HTTP/1.1" 200' in s.stderr_line("GET /hello.txt")
    assert s.stop() == 0
    assert not path.exists()  # removed at exit


def test_metrics_port_serves_prometheus_text(serve: list[Served], tmp_path: Path) -> None:
    pytest.importorskip("prometheus_client")
    mport = free_port()
    s = Served(["--port", "0", "--no-status", "--metrics-port", str(mport)], tmp_path)
    serve.append(s)
    assert get(f"http://127.0.0.1:{s.port}/hello.txt") == "hello\n"
    deadline = time.monotonic() + LIMIT
    while True:
        text = get(f"http://127.0.0.1:{mport}/metrics")
        if f'acceptfilter_surfaced_total{{port="{s.port}"}} 1.0' in text or time.monotonic() > deadline:
            break
    assert f'acceptfilter_surfaced_total{{port="{s.port}"}} 1.0' in text, text
    assert "# TYPE acceptfilter_time_to_surface_seconds histogram" in text
    assert f'acceptfilter_kernel_accept_queue_connections{{port="{s.port}"}} 0.0' in text  # the kernel's side too


def test_log_format_json(serve: list[Served], tmp_path: Path) -> None:
    s = Served(["--port", "0", "--status-interval", "0.1", "--log-format", "json", "--idle-timeout", "0.2"], tmp_path)
    serve.append(s)
    idle = socket.create_connection(("127.0.0.1", s.port))  # times out: an event, then a status with timed_out 1
    assert get(f"http://127.0.0.1:{s.port}/hello.txt") == "hello\n"
    records: list[dict[str, object]] = []
    deadline = time.monotonic() + LIMIT
    while time.monotonic() < deadline:
        records.append(json.loads(s.stderr_line()))  # every line is one JSON object
        kinds = {r.get("type") for r in records}
        if "access" in kinds and any(r.get("type") == "status" and r.get("timed_out") == 1 for r in records):
            break
    access = next(r for r in records if r.get("type") == "access")
    assert access["client"] == "127.0.0.1" and access["status"] == "200" and access["reason"] == "ready"
    assert access["request"] == "GET /hello.txt HTTP/1.1" and isinstance(access["held_ms"], float)
    assert any(r.get("type") == "status" and r.get("timed_out") == 1 for r in records), records
    idle.close()
    last = [json.loads(line) for line in s.stderr_all().splitlines()]
    assert s.proc.returncode == 0
    assert last and last[-1]["event"] == "stopping" and last[-1]["signal"] == "SIGTERM"


def test_status_line_and_access_log_never_share_a_line_on_a_terminal(tmp_path: Path) -> None:
    """On a terminal the status line is redrawn in place; an access line goes above it, never glued to it."""
    (tmp_path / "hello.txt").write_text("hello\n")
    port = free_port()
    leader, follower = pty.openpty()
    proc = subprocess.Popen([*CLI, "serve", "--port", str(port), "--directory", str(tmp_path), "--status-interval", "0.05"],
                            stdin=subprocess.DEVNULL, stdout=follower, stderr=follower)
    os.close(follower)
    screen = b""
    try:
        deadline = time.monotonic() + LIMIT
        asked = False
        while time.monotonic() < deadline:
            ready, _, _ = select.select([leader], [], [], 0.5)
            if ready:
                try:
                    screen += os.read(leader, 65536)
                except OSError:
                    break
            if not asked and screen.count(b"kernel queue") >= 2:
                assert get(f"http://127.0.0.1:{port}/hello.txt") == "hello\n"  # while the status line is shown
                asked = True
            if asked and re.search(rb"GET /hello.txt HTTP/1.1\" 200.*\r?\n.*kernel queue", screen, re.S):
                break
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(LIMIT)
        os.close(leader)
    assert asked, screen[-500:]
    text = screen.decode("latin-1")
    access = re.search(r"(.{0,12})127\.0\.0\.1 - - \[[^\]]+\] \"GET /hello.txt", text)
    assert access, text[-2000:]
    assert access.group(1).endswith("\r\x1b[K") or access.group(1).endswith("\n"), repr(access.group(1))
    assert not re.search(r"kernel queue \S+127\.0\.0\.1", text), text[-2000:]


def test_verbose_after_the_command_and_debug_only_for_acceptfilter(serve: list[Served], tmp_path: Path) -> None:
    s = Served(["--port", "0", "--status-interval", "0.05", "--filter", "httpready:non_http=reject", "-vv"], tmp_path)
    serve.append(s)
    with socket.create_connection(("127.0.0.1", s.port), timeout=LIMIT) as junk:
        junk.sendall(b"\x16\x03\x01 not http")
        assert junk.recv(10) == b""  # rejected
    line = s.stderr_line("rejected")
    assert " acceptfilter DEBUG fd " in line, line
    debug = [ln for ln in [line, *s.stderr_all().splitlines()] if " DEBUG " in ln]
    assert debug and all(" acceptfilter" in ln.split(" DEBUG ")[0] for ln in debug), debug  # no pyroute2, no asyncio


@pytest.mark.parametrize("command", ["stats {port}", "top --count 500 --interval 0.001"])
def test_a_closed_pipe_is_no_traceback(command: str, tmp_path: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        cli = " ".join([sys.executable, "-m", "acceptfilter.cli", command.format(port=port)])
        out = subprocess.run(["bash", "-c", f"set -o pipefail; {cli} 2>{tmp_path}/err.txt | head -c 1 >/dev/null; echo $?; cat {tmp_path}/err.txt"],
                             capture_output=True, text=True, timeout=LIMIT * 2)
    status, _, err = out.stdout.partition("\n")
    assert "Traceback" not in err and "BrokenPipe" not in err, err
    assert status in ("0", "141"), out.stdout


def test_forward_host_is_resolved_once_at_start(serve: list[Served], tmp_path: Path) -> None:
    backend = socket.create_server(("127.0.0.1", 0))
    bport = backend.getsockname()[1]
    s = Served(["--port", "0", "--no-status", "--route", "http=httpready", "--route", "t=tlsready:non_tls=reject",
                "--forward", f"t=localhost:{bport}"], tmp_path)
    serve.append(s)
    route_line = next(line for line in s.lines if line.startswith("route t:"))
    target = route_line.rsplit(" forwarded to ", 1)[1].strip()
    host = target.rsplit(":", 1)[0]
    ipaddress.ip_address(host)  # an address, not the name: no lookup per connection
    assert target.endswith(f":{bport}")
    backend.close()


def test_defer_accept_puts_the_kernel_first_and_still_serves(serve: list[Served], tmp_path: Path) -> None:
    """--defer-accept S: an idle client waits in the kernel (SYN_RECV, not held by us); a client
    that sends its request is served as before. Off by default (see the option's help)."""
    from acceptfilter import diag

    from .conftest import wait_for

    s = Served(["--port", "0", "--no-status", "--defer-accept", "30"], tmp_path)
    serve.append(s)
    idle = [socket.create_connection(("127.0.0.1", s.port)) for _ in range(2)]
    wait_for(lambda: sum(v.syn_recv for v in diag.listeners(s.port)) == 2, timeout=LIMIT)
    assert get(f"http://127.0.0.1:{s.port}/hello.txt") == "hello\n"
    for conn in idle:
        conn.close()
    plain = Served(["--port", "0", "--no-status"], tmp_path)
    serve.append(plain)
    idle = [socket.create_connection(("127.0.0.1", plain.port)) for _ in range(2)]
    time.sleep(0.5)
    assert sum(v.syn_recv for v in diag.listeners(plain.port)) == 0  # the default: accepted and held by the core
    for conn in idle:
        conn.close()
