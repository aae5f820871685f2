"""Several worker processes: uvicorn/Hypercorn --workers N through `acceptfilter run`, `serve --workers N`,
gunicorn with the uvicorn worker; every other worker model refused with one line.

Each worker runs its own engine on the one shared listen socket (acceptfilter.workers). The tests hold
idle and half-sent clients, ask curl, kill a worker and check that the parent replaces it and that
serving goes on.
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

from .conftest import wait_for
from .serverutil import asgi_app_source, close_all, curl, interrupt, needs_curl, open_held

CLI = [sys.executable, "-m", "acceptfilter.cli"]
APP = asgi_app_source("os.getpid()")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def children(pid: int) -> set[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return set()
    return {int(p) for p in text.split()}


def answers(port: int, path: str) -> tuple[int, str]:
    code, body = curl(port, path)
    assert code == 200, body
    pid, _, info = body.partition(" ")
    assert info == path, "the application got the filter's info"
    return int(pid), info


def serving(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def check_workers_serve_and_are_replaced(proc: subprocess.Popen[str], port: int, workers: int,
                                         worker_pids: set[int] | None = None) -> None:
    parent = proc.pid
    wait_for(lambda: len(children(parent)) >= workers, 60)
    pids = worker_pids if worker_pids is not None else children(parent)
    wait_for(lambda: serving(port), 60)
    held = open_held(port)
    seen = {answers(port, f"/w{i}")[0] for i in range(8)}
    assert seen <= pids, "answered by the workers"
    victim = sorted(pids)[0]
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: victim not in children(parent) and len(children(parent)) >= workers, 60)
    for i in range(8):  # the queue is shared: nothing is lost with the worker
        answers(port, f"/after{i}")
    close_all(held)
    assert proc.poll() is None


@needs_curl
@pytest.mark.parametrize("server", ["uvicorn", "hypercorn"])
def test_run_with_workers(tmp_path: Path, server: str) -> None:
    (tmp_path / "app.py").write_text(APP)
    port = free_port()
    args = (["uvicorn", "app:app", "--port", str(port), "--workers", "2", "--limit-concurrency", "3"]
            if server == "uvicorn" else ["hypercorn", "app:app", "--bind", f"127.0.0.1:{port}", "--workers", "2"])
    proc = subprocess.Popen([*CLI, "run", "--timeout", "60", "--", *args], cwd=tmp_path, text=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        # uvicorn: --limit-concurrency 3 per worker would answer 503 had the 25 held connections reached it.
        check_workers_serve_and_are_replaced(proc, port, 2)
    finally:
        interrupt(proc)
    assert proc.returncode in (0, -signal.SIGINT, 130)
    assert not children(proc.pid)


@needs_curl
def test_serve_with_workers(tmp_path: Path) -> None:
    (tmp_path / "w0").write_text("")
    port = free_port()
    proc = subprocess.Popen([*CLI, "serve", "--port", str(port), "--workers", "2", "--no-status", "--directory",
                             str(tmp_path), "--timeout", "60"], text=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        parent = proc.pid
        wait_for(lambda: len(children(parent)) >= 2 and serving(port), 60)
        held = open_held(port)
        assert curl(port, "/w0") == (200, "")
        victim = sorted(children(parent))[0]
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: victim not in children(parent) and len(children(parent)) >= 2, 60)
        for _ in range(4):
            assert curl(port, "/w0") == (200, "")
        close_all(held)
    finally:
        interrupt(proc)
    assert proc.returncode == 0


@needs_curl
def test_gunicorn_with_the_uvicorn_worker(tmp_path: Path) -> None:
    (tmp_path / "app.py").write_text(APP)
    port = free_port()
    proc = subprocess.Popen([*CLI, "run", "--timeout", "60", "--", "gunicorn", "-k", "uvicorn_worker.UvicornWorker",
                             "-w", "2", "-b", f"127.0.0.1:{port}", "app:app"], cwd=tmp_path, text=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: len(children(proc.pid)) >= 2, 60)
        # gunicorn's arbiter may also run helper children; the workers are the ones that answer.
        check_workers_serve_and_are_replaced(proc, port, 2, worker_pids=None)
        workers = children(proc.pid)
        proc.send_signal(signal.SIGINT)  # gunicorn's quick shutdown: SIGQUIT to each worker
        # Well under gunicorn's graceful_timeout (30 s), after which it would SIGKILL the workers.
        assert proc.wait(25) == 0
        wait_for(lambda: not any(Path(f"/proc/{pid}").exists() for pid in workers), 10)
    finally:
        interrupt(proc)


@pytest.mark.parametrize(("command", "says"), [
    (["run", "--", "uvicorn", "app:app", "--workers", "0"], "--workers must be a positive integer, not '0'"),
    (["run", "--", "uvicorn", "app:app", "--workers", "two"], "--workers must be a positive integer, not 'two'"),
    (["run", "--", "hypercorn", "app:app", "-w", "-1"], "--workers must be a positive integer, not '-1'"),
    (["serve", "--workers", "0"], "--workers must be a positive integer, not '0'"),
    (["run", "--", "gunicorn", "-k", "gevent", "app:app"], "gunicorn worker class 'gevent' is not supported: use sync"),
    (["run", "--", "gunicorn", "--worker-class=tornado", "app:app"], "worker class 'tornado' is not supported"),
    (["run", "--", "hypercorn", "app:app", "-k", "trio"], "supports Hypercorn's asyncio and uvloop workers, not 'trio'"),
    (["run", "--", "uvicorn", "app:app", "--reload"], "does not support uvicorn --reload"),
])
def test_worker_models_that_cannot_work_are_one_line_and_exit_2(tmp_path: Path, command: list[str], says: str) -> None:
    (tmp_path / "app.py").write_text(APP)
    port = free_port()
    out = subprocess.run([*CLI, *command] + (["--port", str(port)] if command[0] == "serve" else []),
                         cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("acceptfilter: error: ") and says in lines[0], out.stderr
    assert not serving(port), "nothing half-started"


def test_a_worker_that_cannot_start_stops_everything(tmp_path: Path) -> None:
    """A broken application is not forked forever: the first worker that exits at boot ends the run."""
    port = free_port()
    out = subprocess.run([*CLI, "run", "--", "uvicorn", "nosuchmodule:app", "--port", str(port), "--workers", "2"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 3, out.stderr  # uvicorn's own status for a startup failure, passed on
    assert "failed to start (exit status 3); stopping" in out.stderr
    assert not serving(port)


@pytest.mark.parametrize("verbose", [False, True])
def test_serve_with_workers_prints_one_summed_status_line(tmp_path: Path, verbose: bool) -> None:
    """The parent sums the workers' stats files into one line; -v adds a line per worker; workers print none."""
    port = free_port()
    proc = subprocess.Popen([*CLI, "serve", "--port", str(port), "--workers", "2", "--status-interval", "0.2",
                             "--directory", str(tmp_path), "--timeout", "60", *(["-v"] if verbose else [])],
                            text=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        assert proc.stderr is not None
        wait_for(lambda: len(children(proc.pid)) >= 2 and serving(port), 60)
        clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
        lines: list[str] = []
        while sum(line.startswith("status: 2 workers: accepted") and "= held 3 " in line for line in lines) < 2:
            line = proc.stderr.readline()  # two rounds: the per-worker lines of -v follow their sum
            assert line, lines
            lines.append(line.strip())
        status = [line for line in lines if "accepted" in line]
        assert all(re.match(r"status: \d workers?: accepted|worker pid \d+: accepted", line) for line in status), status
        assert any(line.startswith("worker pid") for line in status) == verbose, status
        close_all(clients)
    finally:
        proc.terminate()
        proc.wait(30)


def _reloaded_moved(log: Path) -> list[int]:
    """How many held connections each worker's "reloaded" line says it moved."""
    import re

    return [int(m) for m in re.findall(r"reloaded: \d+ chain\(s\) rebuilt, (\d+) held connection", log.read_text())]


@needs_curl
def test_sighup_reloads_every_serve_worker_without_losing_a_held_connection_or_a_request(tmp_path: Path) -> None:
    """SIGHUP in the parent of ``serve --workers 2``: each worker reloads in place; nothing is closed or refused.

    Before: the parent died of the default SIGHUP action, its workers with it.
    """
    import threading

    site = tmp_path / "site"
    site.mkdir()
    (site / "slow").write_text("slow")
    (site / "w0").write_text("w0")
    port = free_port()
    log = tmp_path / "stderr.log"
    with log.open("w") as err:
        proc = subprocess.Popen([*CLI, "serve", "--port", str(port), "--workers", "2", "--no-status", "--directory",
                                 str(site), "--timeout", "120"], text=True, stdout=subprocess.DEVNULL, stderr=err)
    held: list[socket.socket] = []
    try:
        parent = proc.pid
        wait_for(lambda: len(children(parent)) >= 2 and serving(port), 60)
        workers = children(parent)
        held = open_held(port)
        # The kernel queue is FIFO and shared: once a later connection is answered, every held one was taken.
        assert curl(port, "/w0") == (200, "w0")
        answered: list[tuple[int, str]] = []
        done = threading.Event()

        def traffic() -> None:
            while not done.is_set():
                answered.append(curl(port, "/w0"))

        thread = threading.Thread(target=traffic)
        thread.start()
        try:
            proc.send_signal(signal.SIGHUP)
            wait_for(lambda: len(_reloaded_moved(log)) >= 2, 60)
        finally:
            done.set()
            thread.join(60)
        assert proc.poll() is None and children(parent) == workers, "reloaded in place, nobody restarted"
        assert sum(_reloaded_moved(log)) == len(held), log.read_text()
        assert answered and all(a == (200, "w0") for a in answered), answered
        for conn in held[:-5]:
            conn.sendall(b"GET /w0 HTTP/1.0\r\n\r\n")
        for conn in held[-5:]:  # the half-sent ones finish their request
            conn.sendall(b"\r\n")
        for conn in held:
            reply = b""
            while chunk := conn.recv(4096):
                reply += chunk
            assert reply.startswith(b"HTTP/1.0 200 "), reply[:80]
        assert "Traceback" not in log.read_text()
    finally:
        close_all(held)
        interrupt(proc)
    assert proc.returncode == 0


@needs_curl
def test_sighup_reloads_every_uvicorn_worker_without_losing_a_held_connection_or_a_request(tmp_path: Path) -> None:
    """``acceptfilter run -- uvicorn --workers 2``: SIGHUP reloads each worker's filters, keeping what it holds.

    Before: the parent died of the default SIGHUP action, its workers with it (plain uvicorn restarts its
    workers instead, and closes what they held).
    """
    import re
    import threading

    (tmp_path / "app.py").write_text(APP)
    port = free_port()
    log = tmp_path / "stderr.log"
    with log.open("w") as err:
        proc = subprocess.Popen([*CLI, "run", "--timeout", "120", "--", "uvicorn", "app:app", "--port", str(port),
                                 "--workers", "2"], cwd=tmp_path, text=True, stdout=subprocess.DEVNULL, stderr=err)
    held: list[socket.socket] = []
    try:
        parent = proc.pid
        wait_for(lambda: len(children(parent)) >= 2 and serving(port), 60)
        workers = children(parent)
        held = open_held(port)
        answers(port, "/first")  # FIFO shared queue: every held connection was taken before this one
        answered: list[int] = []
        done = threading.Event()

        def traffic() -> None:
            while not done.is_set():
                answered.append(answers(port, "/during")[0])

        def moved() -> list[int]:
            return [int(n) for n in re.findall(r"reloaded: filters rebuilt, (\d+) held", log.read_text())]

        thread = threading.Thread(target=traffic)
        thread.start()
        try:
            proc.send_signal(signal.SIGHUP)
            wait_for(lambda: len(moved()) >= 2, 60)
        finally:
            done.set()
            thread.join(60)
        assert proc.poll() is None and children(parent) == workers, "reloaded in place"
        assert sum(moved()) == len(held), log.read_text()
        assert answered and set(answered) <= workers
        for conn in held[:-5]:
            conn.sendall(b"GET /idle HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        for conn in held[-5:]:
            conn.sendall(b"Connection: close\r\n\r\n")
        for conn in held:
            reply = b""
            while chunk := conn.recv(4096):
                reply += chunk
            assert reply.startswith(b"HTTP/1.1 200 "), reply[:80]
        assert "Traceback" not in log.read_text()
    finally:
        close_all(held)
        interrupt(proc)
    assert proc.returncode in (0, -signal.SIGINT, 130)


@needs_curl
def test_a_sigkilled_worker_resets_every_connection_it_held_idle_or_half_sent(tmp_path: Path) -> None:
    """One rule for what a worker that dies (SIGKILL, a crash) held: an RST, idle or half-sent.

    Before: the kernel closed idle ones with a FIN and half-sent ones (unread bytes) with an RST.
    Held connections carry SO_LINGER {1, 0} while they are watched; it is cleared before one is
    handed to the application or closed on purpose (a FIN: tests/test_serve_attack.py, test_gunicorn.py).
    """
    (tmp_path / "w0").write_text("w0")
    port = free_port()
    proc = subprocess.Popen([*CLI, "serve", "--port", str(port), "--workers", "2", "--no-status", "--directory",
                             str(tmp_path), "--timeout", "120"], text=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    held: list[socket.socket] = []
    try:
        parent = proc.pid
        wait_for(lambda: len(children(parent)) >= 2 and serving(port), 60)
        workers = children(parent)
        held = open_held(port)
        assert curl(port, "/w0") == (200, "w0")  # FIFO shared queue: every held connection was taken
        for pid in workers:
            os.kill(pid, signal.SIGKILL)
        outcomes = []
        for conn in held:
            conn.settimeout(30)
            try:
                outcomes.append("FIN" if conn.recv(100) == b"" else "data")
            except ConnectionResetError:
                outcomes.append("RST")
        assert outcomes == ["RST"] * len(held), outcomes
        wait_for(lambda: len(children(parent) - workers) >= 2, 60)  # replaced
        assert curl(port, "/w0") == (200, "w0")
    finally:
        close_all(held)
        interrupt(proc)


def _own_group(pid: int) -> bool:
    """Whether a forked worker has its own process group: acceptfilter.workers sets it after its signal handlers."""
    try:
        return os.getpgid(pid) == pid
    except ProcessLookupError:
        return False


@needs_curl
@pytest.mark.parametrize("server", ["serve", "uvicorn"])
def test_a_sighup_while_the_workers_start_is_kept_and_each_worker_reloads_once_serving(
        tmp_path: Path, server: str) -> None:
    """A SIGHUP that reaches workers still starting (an upgrade right after a restart) is not lost.

    Before: a worker ignored SIGHUP until its own handler was in place, so a worker that had built its
    filters but not yet installed that handler kept the old ones and said nothing; and uvicorn's reload,
    if its handler was in place but uvicorn had not started serving, failed ("reload failed").
    """
    site = tmp_path / "site"
    site.mkdir()
    (site / "w0").write_text("w0")
    (tmp_path / "app.py").write_text(APP)
    port = free_port()
    log = tmp_path / "stderr.log"
    if server == "serve":
        cmd = [*CLI, "serve", "--port", str(port), "--workers", "2", "--no-status", "--directory", str(site)]
        pattern = r"reloaded: \d+ chain\(s\) rebuilt"
    else:
        cmd = [*CLI, "run", "--", "uvicorn", "app:app", "--port", str(port), "--workers", "2"]
        pattern = r"reloaded: filters rebuilt"
    with log.open("w") as err:
        proc = subprocess.Popen(cmd, cwd=tmp_path, text=True, stdout=subprocess.DEVNULL, stderr=err)
    try:
        parent = proc.pid
        # As soon as both are forked and have their early handler: long before they serve.
        wait_for(lambda: len(kids := children(parent)) >= 2 and all(_own_group(p) for p in kids), 60)
        workers = children(parent)
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: len(re.findall(pattern, log.read_text())) >= 2, 60)
        text = log.read_text()
        assert "reload failed" not in text and "Traceback" not in text, text
        assert proc.poll() is None and children(parent) == workers, "reloaded in place, nobody restarted"
        if server == "serve":
            assert curl(port, "/w0") == (200, "w0")
        else:
            assert answers(port, "/after")[0] in workers
    finally:
        interrupt(proc)
    assert proc.returncode in (0, -signal.SIGINT, 130)
