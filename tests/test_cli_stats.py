"""``acceptfilter stats``, ``top`` and the ``serve`` status line, run as a user would run them."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path


def run(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "acceptfilter.cli", *args], capture_output=True, text=True, timeout=timeout)


def test_stats_json_shows_the_queue() -> None:
    with socket.create_server(("127.0.0.1", 0), backlog=32) as server:
        port = server.getsockname()[1]
        clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(4)]
        out = run("stats", str(port), "--json")
        assert out.returncode == 0, out.stderr
        data = json.loads(out.stdout)
        (view,) = data["listeners"]
        assert view["port"] == port and view["address"] == "127.0.0.1"
        assert view["accept_queue"] == 4 and view["backlog"] == 32
        assert set(data["namespace"]) == {"listen_overflows", "listen_drops", "defer_accept_drops"}
        for _ in range(4):
            server.accept()[0].close()
        assert json.loads(run("stats", str(port), "--json").stdout)["listeners"][0]["accept_queue"] == 0
        for c in clients:
            c.close()


def test_stats_text_warns_about_truncated_backlog() -> None:
    with open("/proc/sys/net/core/somaxconn") as f:
        limit = int(f.read())
    with socket.create_server(("127.0.0.1", 0), backlog=limit + 1) as server:
        port = server.getsockname()[1]
        out = run("stats", str(port), "--host", "127.0.0.1", "--backlog", str(limit + 1))
        assert out.returncode == 0, out.stderr
        assert f"127.0.0.1:{port}  accept queue 0/{limit}" in out.stdout
        assert "was truncated" in out.stdout and "ListenOverflows" in out.stdout
        assert out.stdout.count("was truncated") == 1 and "truncated" not in out.stderr  # said once


def test_stats_nothing_listening() -> None:
    with socket.create_server(("127.0.0.1", 0)) as s:
        port = s.getsockname()[1]
    out = run("stats", str(port))
    assert out.returncode == 1 and out.stderr == f"acceptfilter: nothing is listening on port {port}\n"
    assert run("stats", "0").returncode == 2


def test_top_once_lists_our_listener() -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port)):
            time.sleep(0.05)
            out = run("top", "--count", "1")
    assert out.returncode == 0, out.stderr
    fields = next(line.split() for line in out.stdout.splitlines() if line.split()[:1] == [str(port)])
    assert fields[1] == "0" and fields[2] == "-"  # no engine: nothing held that anyone can see
    assert int(fields[9]) == 1  # the QUEUE column: our unaccepted client
    assert "\x1b[" not in out.stdout  # not a terminal: plain lines
    out = run("top", "--count", "2", "--interval", "0.05")
    assert out.returncode == 0 and out.stdout.count("acceptfilter top") == 2


def test_serve_prints_status_lines(tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "acceptfilter.cli", "serve", "--port", "0", "--directory", str(tmp_path),
                             "--idle-timeout", "0.3", "--status-interval", "0.1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stderr is not None
        banner = proc.stdout.readline()
        port = int(banner.split(" on ", 1)[1].split()[0].rsplit(":", 1)[1].strip("/"))
        idle = socket.create_connection(("127.0.0.1", port))
        deadline = time.monotonic() + 10
        seen = []
        while time.monotonic() < deadline:
            line = proc.stderr.readline()
            if line.startswith("status: "):
                seen.append(line)
                if "timed out 1" in line:
                    break
        assert seen and "kernel queue 0/1024" in seen[-1], seen
        assert "timed out 1" in seen[-1], seen
        idle.close()
    finally:
        proc.terminate()
        proc.wait(5)


def test_serve_status_can_be_turned_off(tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "acceptfilter.cli", "serve", "--port", "0", "--directory", str(tmp_path),
                             "--status-interval", "0.05", "--no-status"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        proc.stdout.readline()
        time.sleep(0.5)
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=5)
    assert "status:" not in err


def test_stats_says_what_drops_mean_under_defer_accept() -> None:
    """Under TCP_DEFER_ACCEPT the kernel counts each deferred handshake as a listener drop: stats says so."""
    import acceptfilter
    from acceptfilter import diag

    from .conftest import wait_for

    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        with acceptfilter.wrap(server, "httpready", defer_accept=1):
            clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]  # send nothing: deferred
            wait_for(lambda: (diag.listeners(port)[0].drops or 0) > 0, 30)
            out = run("stats", str(port))
            data = json.loads(run("stats", str(port), "--json").stdout)
            top = run("top", "--count", "1", "--port", str(port))
            for c in clients:
                c.close()
    assert "TCP_DEFER_ACCEPT is on: the kernel counts each deferred handshake as a drop" in out.stdout, out.stdout
    assert "TCPDeferAcceptDrop" in out.stdout
    assert data["drops_note"].startswith("TCP_DEFER_ACCEPT is on") and data["total"]["defer_accept"] == 1
    row = next(line.split() for line in top.stdout.splitlines() if line.split()[:1] == [str(port)])
    assert row[11].endswith("*")  # the DROPS column: top marks those drops
