"""systemd socket activation: `acceptfilter serve` and `run` take their socket from LISTEN_FDS.

A launcher (tests/activation_launcher.py) binds, sets LISTEN_FDS, LISTEN_PID
and LISTEN_FDNAMES exactly as systemd does and execs the command, so the
command runs with the same pid and the socket as fd 3.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from acceptfilter.activation import ActivationError, inherited_listener, listen_fds

from .serverutil import IDLE, SLOW, asgi_app_source, close_all, curl, interrupt, needs_curl, open_held

LAUNCHER = Path(__file__).with_name("activation_launcher.py")
CLI = [sys.executable, "-m", "acceptfilter.cli"]
APP = asgi_app_source("'hello'")


def launch(kind: str, *args: str, cwd: Path | None = None, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, str(LAUNCHER), kind, *CLI, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=cwd,
                            env=None if env is None else {**os.environ, **env})


@needs_curl
def test_serve_takes_the_socket_systemd_passed(tmp_path: Path) -> None:
    (tmp_path / "index.html").write_text("activated\n")
    # --port 1 would need privileges: the inherited socket is used instead.
    proc = launch("tcp", "serve", "--port", "1", "--directory", str(tmp_path), "--timeout", "60",
                  "--status-interval", "0.2")
    try:
        assert proc.stdout is not None and proc.stderr is not None
        port = int(proc.stdout.readline())
        assert f"127.0.0.1:{port}/" in proc.stdout.readline()  # "Serving ... on http://127.0.0.1:PORT/ ..."
        clients = open_held(port)
        for line in proc.stderr:  # "status: accepted 25 = held 25 + ..." once the filter holds them all
            if re.search(rf"status: accepted \d+ = held {IDLE + SLOW}\b", line):
                break
        assert curl(port, "/index.html") == (200, "activated\n")
        close_all(clients)
    finally:
        interrupt(proc)
    assert proc.returncode in (0, -signal.SIGINT, 130)


@needs_curl
def test_workers_share_the_socket_systemd_passed(tmp_path: Path) -> None:
    (tmp_path / "index.html").write_text("both\n")
    # Unbuffered stdout (as in most containers): each worker must still write its banner as one
    # whole line, or the two interleave ("Serving ...Serving ...\n\n") on the shared pipe.
    proc = launch("tcp", "serve", "--port", "1", "--workers", "2", "--directory", str(tmp_path), "--no-status",
                  env={"PYTHONUNBUFFERED": "1"})
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        # One "Serving ..." line per worker, both on the passed socket; other lines may come between.
        serving = 0
        for _ in range(20):
            line = proc.stdout.readline()
            assert line.count("Serving ") <= 1 and line.endswith("\n"), f"not one whole line: {line!r}"
            serving += f"127.0.0.1:{port}/" in line
            if serving == 2:
                break
        assert serving == 2
        clients = open_held(port)
        for _ in range(4):
            assert curl(port, "/index.html") == (200, "both\n")
        close_all(clients)
    finally:
        interrupt(proc)
    assert proc.returncode == 0


@needs_curl
@pytest.mark.parametrize("server", [["uvicorn", "app:app", "--port", "1"], ["hypercorn", "app:app", "--bind", "127.0.0.1:1"]],
                         ids=["uvicorn", "hypercorn"])
def test_run_takes_the_socket_systemd_passed(tmp_path: Path, server: list[str]) -> None:
    (tmp_path / "app.py").write_text(APP)
    proc = launch("tcp", "run", "--timeout", "60", "--", *server, cwd=tmp_path)
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        clients = open_held(port)
        assert curl(port, "/activated") == (200, "hello /activated")
        close_all(clients)
    finally:
        interrupt(proc)


@pytest.mark.parametrize(("kind", "says"), [
    ("udp", "(fd 3, http) is an IPv4 UDP socket; acceptfilter needs a listening TCP socket"),
    ("unlistened", "(fd 3, http) is an IPv4 TCP socket that is not listening; acceptfilter needs a listening TCP"),
    ("pipe", "(fd 3, http) is a pipe; acceptfilter needs a listening TCP socket"),
    ("two", "systemd passed 2 sockets (3 (http), 4 (other)); acceptfilter serves one"),
])
@pytest.mark.parametrize("command", [["serve", "--port", "0", "--no-status"], ["run", "--", "uvicorn", "app:app"]],
                         ids=["serve", "run"])
def test_a_socket_that_cannot_be_served_is_one_line_and_exit_2(tmp_path: Path, kind: str, says: str,
                                                             command: list[str]) -> None:
    (tmp_path / "app.py").write_text(APP)
    proc = launch(kind, *command, cwd=tmp_path)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("acceptfilter: error: "), err
    assert says in lines[0]
    assert "Serving" not in out and "Traceback" not in err


@needs_curl
def test_variables_meant_for_another_process_are_ignored(tmp_path: Path) -> None:
    (tmp_path / "index.html").write_text("bound\n")
    proc = launch("otherpid", "serve", "--port", "0", "--directory", str(tmp_path), "--no-status")
    try:
        assert proc.stdout is not None
        inherited_port = int(proc.stdout.readline())
        m = re.search(r"127\.0\.0\.1:(\d+)/", proc.stdout.readline())
        assert m and int(m.group(1)) != inherited_port, "LISTEN_PID names another process: bind as told"
        assert curl(int(m.group(1)), "/index.html") == (200, "bound\n")
    finally:
        interrupt(proc)


def test_listen_fds_reads_and_unsets_like_sd_listen_fds() -> None:
    env = {"LISTEN_FDS": "1", "LISTEN_PID": str(os.getpid()), "LISTEN_FDNAMES": "web"}
    sock = socket.create_server(("127.0.0.1", 0))
    saved = os.dup(3) if _is_open(3) else None
    try:
        os.dup2(sock.fileno(), 3, inheritable=True)
        got = listen_fds(env)
        assert [(p.fd, p.name) for p in got] == [(3, "web")]
        assert env == {}, "the variables are removed, as sd_listen_fds(1) does"
        assert not os.get_inheritable(3), "close-on-exec, as sd_listen_fds does"
        assert listen_fds({"LISTEN_FDS": "1", "LISTEN_PID": str(os.getpid() + 1)}) == []
        assert listen_fds({}) == [] and inherited_listener({}) is None
        with pytest.raises(ActivationError, match="LISTEN_FDNAMES names 2 sockets but LISTEN_FDS=1"):
            listen_fds({"LISTEN_FDS": "1", "LISTEN_PID": str(os.getpid()), "LISTEN_FDNAMES": "a:b"})
        with pytest.raises(ActivationError, match="must be numbers"):
            listen_fds({"LISTEN_FDS": "x", "LISTEN_PID": str(os.getpid())})
    finally:
        if saved is not None:
            os.dup2(saved, 3)
            os.close(saved)
        else:
            os.close(3)
        sock.close()


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True
