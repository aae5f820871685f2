"""gunicorn (sync, gthread) behind an accept filter: real gunicorn processes, real clients.

Each test starts ``gunicorn -c python:acceptfilter.gunicorn`` (or a config
file with ``install(globals())``) on an ephemeral port and drives it with
curl and raw sockets: idle and half-sent connections must stay invisible to
the workers, ready ones must reach whichever worker is idle, and nothing held
may be lost when workers die, are recycled or reloaded.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from acceptfilter.errors import AcceptFilterError

from .conftest import wait_for

gunicorn = pytest.importorskip("gunicorn", reason="gunicorn (test extra) is not installed")

APP = '''
import json, os, time
import acceptfilter

def app(environ, start_response):
    if environ["PATH_INFO"].startswith("/slow"):
        time.sleep(float(environ.get("QUERY_STRING") or 2))
    info = acceptfilter.connection_info(environ["gunicorn.socket"])
    body = json.dumps({
        "pid": os.getpid(),
        "path": environ["PATH_INFO"],
        "remote_addr": environ["REMOTE_ADDR"],
        "server_port": environ["SERVER_PORT"],
        "reason": info.reason if info else None,
        "info": {k: v for k, v in info.info.items() if isinstance(v, (str, int))} if info else None,
    }).encode()
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
    return [body]
'''

HEAD = b"GET /held HTTP/1.1\r\nHost: held\r\n"  # a request head missing its final CRLF


class Gunicorn:
    def __init__(self, tmp_path: Path, args: list[str], env: dict[str, str], *, filtered: bool = True,
                 launcher: list[str] | None = None) -> None:
        (tmp_path / "app.py").write_text(APP)
        self.log_path = tmp_path / "gunicorn.log"
        config = ["-c", "python:acceptfilter.gunicorn"] if filtered and "-c" not in args and not launcher else []
        cmd = [*(launcher or [sys.executable, "-m", "gunicorn"]), *config, "--no-control-socket", "-b", "127.0.0.1:0",
               "--chdir", str(tmp_path), "--graceful-timeout", "3", *args, "app:app"]
        self.log_file = self.log_path.open("wb")
        self.proc = subprocess.Popen(cmd, stdout=self.log_file, stderr=subprocess.STDOUT, cwd=tmp_path,
                                     env={**os.environ, **env}, start_new_session=True)
        self.port = 0

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_started(self, workers: int, filtered: bool = True) -> Gunicorn:
        def up() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"gunicorn exited with {self.proc.returncode}:\n{self.log()}")
            return len(self.worker_pids()) >= workers and (not filtered or bool(self.feeder_pids()))

        wait_for(up, timeout=20)
        self.port = int(re.search(r"Listening at: http://127\.0\.0\.1:(\d+)", self.log()).group(1))  # type: ignore[union-attr]
        return self

    def worker_pids(self) -> list[int]:
        return [int(p) for p in re.findall(r"Booting worker with pid: (\d+)", self.log())]

    def feeder_pids(self) -> list[int]:
        return [int(p) for p in re.findall(r"acceptfilter: filtering with .* in process (\d+)", self.log())]

    def live_workers(self) -> list[int]:
        return [pid for pid in self.worker_pids() if _alive(pid)]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log_file.close()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped) counts as gone
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.fixture
def start_gunicorn(tmp_path: Path) -> Iterator:
    servers: list[Gunicorn] = []

    def start(*args: str, workers: int = 2, env: dict[str, str] | None = None, filtered: bool = True,
              launcher: list[str] | None = None) -> Gunicorn:
        server = Gunicorn(tmp_path, ["-w", str(workers), *args], env or {}, filtered=filtered, launcher=launcher)
        servers.append(server)
        return server.wait_started(workers, filtered)

    yield start
    for server in servers:
        server.stop()
        for pid in server.feeder_pids():  # no filter process outlives its arbiter
            wait_for(lambda pid=pid: not _alive(pid), timeout=10)


def curl(port: int, path: str = "/", max_time: float = 10.0) -> dict:
    out = subprocess.run(["curl", "-sS", "--max-time", str(max_time), f"http://127.0.0.1:{port}{path}"],
                         capture_output=True, text=True, timeout=max_time + 5)
    assert out.returncode == 0, f"curl {path} failed ({out.returncode}): {out.stderr}"
    return json.loads(out.stdout)


def open_conns(port: int, n: int, payload: bytes = b"") -> list[socket.socket]:
    conns = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        if payload:
            s.sendall(payload)
        conns.append(s)
    return conns


def held_by(pid: int, port: int) -> int:
    """Client connections to ``port`` that process ``pid`` has open (its established TCP sockets)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except FileNotFoundError:  # closed meanwhile
            continue
        if link.startswith("socket:["):
            inodes.add(link[len("socket:["):-1])
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            next(f)  # the header
            for line in f:
                fields = line.split()
                local, state, inode = fields[1], fields[3], fields[9]
                count += state == "01" and int(local.rsplit(":", 1)[1], 16) == port and inode in inodes
    return count


def finish_and_read(conns: list[socket.socket]) -> list[dict]:
    """Complete each half-sent head and read its response (Connection: close)."""
    for s in conns:
        s.sendall(b"Connection: close\r\n\r\n")
    bodies = []
    for s in conns:
        data = b""
        while chunk := s.recv(65536):
            data += chunk
        s.close()
        head, _, body = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), head[:80]
        bodies.append(json.loads(body))
    return bodies


def close_all(conns: list[socket.socket]) -> None:
    for s in conns:
        s.close()


# -- the headline: idle connections do not starve sync workers ----
@pytest.mark.parametrize("worker", ["sync", "gthread"])
def test_workers_answer_while_50_idle_connections_are_open(start_gunicorn, worker: str) -> None:
    server = start_gunicorn("-k", worker, "--threads", "1", env={"ACCEPTFILTER_FILTER": "httpready"})
    idle = open_conns(server.port, 25) + open_conns(server.port, 25, HEAD)
    try:
        time.sleep(0.5)  # let both kinds reach the filter process
        answers = [curl(server.port, f"/n{i}", max_time=5) for i in range(10)]
        assert [a["path"] for a in answers] == [f"/n{i}" for i in range(10)]
        assert all(a["reason"] == "ready" and a["info"]["method"] == "GET" for a in answers)
        assert all(a["server_port"] == str(server.port) for a in answers)
        # The half-sent ones were held, not dropped: finishing them gets answers.
        held = finish_and_read(idle[25:35])
        assert {b["path"] for b in held} == {"/held"}
    finally:
        close_all(idle)


def test_without_the_filter_idle_connections_starve_sync_workers(start_gunicorn) -> None:
    """The control experiment: the same load on plain gunicorn leaves no worker to answer."""
    server = start_gunicorn("-k", "sync", filtered=False)
    idle = open_conns(server.port, 50)
    try:
        time.sleep(0.3)
        out = subprocess.run(["curl", "-sS", "--max-time", "2", f"http://127.0.0.1:{server.port}/"],
                             capture_output=True, text=True, timeout=10)
        assert out.returncode == 28, f"plain gunicorn answered despite idle connections: {out.stdout}"
    finally:
        close_all(idle)


REPLY_408 = b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"


def _read_to_close(sock: socket.socket, seconds: float) -> bytes:
    sock.settimeout(seconds)
    got = b""
    try:
        while chunk := sock.recv(65536):
            got += chunk
    except ConnectionResetError:
        pass
    return got


def test_gunicorn_defaults_hold_idle_connections_and_answer_slow_heads_408(start_gunicorn) -> None:
    """Issue 23 with default settings (only the deadline shortened): idle is not slow. Pre-opened
    idle connections outlive the header deadline and are served when used; slowloris heads get
    408 Request Timeout and a FIN at the deadline; no worker is handed either."""
    server = start_gunicorn("-k", "sync", workers=2, env={"ACCEPTFILTER_TIMEOUT": "1"})
    idle = [socket.create_connection(("127.0.0.1", server.port), timeout=10) for _ in range(20)]
    slow = open_conns(server.port, 5, b"GET /slow HTTP/1.1\r\nHost: x\r\n")
    try:
        assert all(_read_to_close(s, 20) == REPLY_408 for s in slow)
        time.sleep(1.5)  # the idle ones are now well past the 1 s deadline, still held
        for i, s in enumerate(idle[:5]):  # a balancer uses its pool
            s.sendall(f"GET /late{i} HTTP/1.1\r\nHost: lb\r\nConnection: close\r\n\r\n".encode())
            reply = _read_to_close(s, 20)
            assert reply.startswith(b"HTTP/1.1 200") and f"/late{i}".encode() in reply
        # No worker was handed an idle or slow connection: both still answer at once.
        assert [curl(server.port, f"/after{i}", max_time=5)["path"] for i in range(6)] == [f"/after{i}" for i in range(6)]
        for s in idle[5:]:
            s.settimeout(0.05)
            with pytest.raises(TimeoutError):
                s.recv(1)  # still held: nothing sent, no FIN
    finally:
        close_all([*idle, *slow])


def test_one_garbage_byte_does_not_get_past_httpready_by_default(start_gunicorn) -> None:
    """Issue 14, item 2: eight clients that send one NUL byte each must not pin the sync workers."""
    server = start_gunicorn("-k", "sync", workers=2)  # default settings: httpready, non_http=reject
    garbage = open_conns(server.port, 8, b"\x00")
    try:
        for s in garbage:  # each is rejected (closed) by the filter, none reaches a worker
            s.settimeout(10)
            try:
                assert s.recv(10) == b""
            except ConnectionResetError:
                pass  # closed with the NUL unread: the kernel may send RST instead of FIN
        answers = [curl(server.port, f"/g{i}", max_time=5) for i in range(20)]
        assert [a["path"] for a in answers] == [f"/g{i}" for i in range(20)]
    finally:
        close_all(garbage)


def test_freebsds_pass_through_lets_garbage_pin_sync_workers(start_gunicorn) -> None:
    """The control experiment: with non_http=accept (FreeBSD's pass) the same bytes pin both workers."""
    server = start_gunicorn("-k", "sync", workers=2, env={"ACCEPTFILTER_FILTER": "httpready:non_http=accept"})
    garbage = open_conns(server.port, 8, b"\x00")
    try:
        out = subprocess.run(["curl", "-sS", "--max-time", "2", f"http://127.0.0.1:{server.port}/"],
                             capture_output=True, text=True, timeout=10)
        assert out.returncode == 28, f"a worker answered although garbage was passed to both: {out.stdout}"
    finally:
        close_all(garbage)


def test_an_idle_worker_takes_the_next_connection_while_another_is_busy(start_gunicorn) -> None:
    server = start_gunicorn("-k", "sync", env={"ACCEPTFILTER_FILTER": "httpready"})
    slow = open_conns(server.port, 1, b"GET /slow?4 HTTP/1.1\r\nHost: s\r\nConnection: close\r\n\r\n")[0]
    try:
        time.sleep(0.3)  # one worker is now busy for 4 s
        fast = [curl(server.port, f"/fast{i}", max_time=10) for i in range(5)]
        slow.settimeout(0)
        with pytest.raises(BlockingIOError):
            slow.recv(1)  # the slow answer is still pending: the fast ones did not wait behind it
        assert len({a["pid"] for a in fast}) == 1  # all served by the idle worker
        slow.settimeout(10)
        assert b"/slow" in slow.recv(65536) + slow.recv(65536)
    finally:
        slow.close()


# -- restarts lose nothing -------------------------------------------------
def test_killing_workers_loses_no_held_or_queued_connection(start_gunicorn) -> None:
    server = start_gunicorn("-k", "sync", env={"ACCEPTFILTER_FILTER": "httpready"})
    held = open_conns(server.port, 20, HEAD)
    busy = open_conns(server.port, 2, b"GET /slow?30 HTTP/1.1\r\nHost: s\r\n\r\n")
    time.sleep(0.5)  # both workers are now inside /slow
    queued = open_conns(server.port, 5, b"GET /queued HTTP/1.1\r\nHost: q\r\nConnection: close\r\n\r\n")
    try:
        time.sleep(0.3)  # the queued ones are ready, waiting in the hand-off channel
        victims = server.live_workers()
        assert len(victims) == 2
        for pid in victims:
            os.kill(pid, signal.SIGKILL)
        wait_for(lambda: len(server.live_workers()) == 2 and not set(server.live_workers()) & set(victims), timeout=15)
        assert {b["path"] for b in finish_and_read(queued)} == {"/queued"}  # queued ones already sent Connection: close
        answers = finish_and_read(held)
        assert len(answers) == 20 and {a["pid"] for a in answers} <= set(server.live_workers())
    finally:
        close_all(held + busy + queued)


def test_max_requests_recycles_workers_without_losing_held_connections(start_gunicorn) -> None:
    server = start_gunicorn("-k", "sync", "--max-requests", "3", env={"ACCEPTFILTER_FILTER": "httpready"})
    held = open_conns(server.port, 20, HEAD)
    try:
        served_by = {curl(server.port, f"/r{i}")["pid"] for i in range(15)}
        assert len(served_by) >= 4, "workers were not recycled"
        assert "Autorestarting worker" in server.log()
        assert len(finish_and_read(held)) == 20
    finally:
        close_all(held)


def test_hup_reload_keeps_the_filter_process_and_held_connections(start_gunicorn) -> None:
    server = start_gunicorn("-k", "sync", env={"ACCEPTFILTER_FILTER": "httpready"})
    held = open_conns(server.port, 10, HEAD)
    try:
        wait_for(lambda: held_by(server.feeder_pids()[0], server.port) == 10, timeout=30)  # all held, then HUP
        before = set(server.worker_pids())
        server.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: len(set(server.live_workers()) - before) == 2 and not set(server.live_workers()) & before,
                 timeout=15)
        assert len(server.feeder_pids()) == 1  # the same filter process: nothing changed
        answers = finish_and_read(held)
        assert {a["pid"] for a in answers} <= set(server.live_workers())
    finally:
        close_all(held)


CONFIG = '''
from pathlib import Path
import acceptfilter.gunicorn

def post_fork(server, worker):  # the user's own hook keeps working
    Path("post_fork_ran").write_text("yes")

workers = 2
acceptfilter.gunicorn.install(globals(), filter=Path("filter.txt").read_text().strip(), timeout=30)
'''


def test_own_config_file_and_hup_with_new_settings_hands_held_connections_over(start_gunicorn, tmp_path: Path) -> None:
    (tmp_path / "conf.py").write_text(CONFIG)
    (tmp_path / "filter.txt").write_text("httpready")
    server = start_gunicorn("-c", str(tmp_path / "conf.py"), "-k", "sync")
    # gunicorn logs "Booting worker" in the new worker just before it runs post_fork: wait for the hook.
    wait_for(lambda: (tmp_path / "post_fork_ran").exists(), timeout=20)
    assert (tmp_path / "post_fork_ran").read_text() == "yes"
    held = open_conns(server.port, 10, HEAD)
    try:
        # All 10 held by the first filter process before the HUP, so all 10 are passed on.
        wait_for(lambda: held_by(server.feeder_pids()[0], server.port) == 10, timeout=30)
        assert curl(server.port)["info"]["method"] == "GET"
        before = set(server.worker_pids())
        (tmp_path / "filter.txt").write_text("httpready:oversize=reject")
        server.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: len(server.feeder_pids()) == 2, timeout=15)
        # Workers look first with the settings they started with: wait for the new ones.
        wait_for(lambda: len(server.live_workers()) == 2 and not set(server.live_workers()) & before, timeout=15)
        assert "settings changed; handing over" in server.log()
        # Held by the old filter process, passed on undecided, held and filtered by the new one.
        assert "10 held ones passed on" in server.log()
        assert "filtering with httpready:oversize=reject in process" in server.log()
        answers = finish_and_read(held)
        assert {(a["reason"], a["info"]["target"]) for a in answers} == {("ready", "/held")}
        assert curl(server.port)["reason"] == "ready"
        wait_for(lambda: not _alive(server.feeder_pids()[0]), timeout=10)
    finally:
        close_all(held)


def test_the_filter_process_is_restarted_when_it_dies(start_gunicorn) -> None:
    server = start_gunicorn("-k", "sync", env={"ACCEPTFILTER_FILTER": "httpready"})
    first = server.feeder_pids()[0]
    os.kill(first, signal.SIGKILL)
    wait_for(lambda: len(server.feeder_pids()) == 2, timeout=15)
    assert re.search(r"ended \((signal 9|killed or crashed: it did not stop cleanly.*)\) holding 0 connections",
                     server.log()), server.log()
    held = open_conns(server.port, 5, HEAD)  # held by the new filter process
    try:
        time.sleep(0.3)
        assert {a["reason"] for a in finish_and_read(held)} == {"ready"}
    finally:
        close_all(held)


def test_a_killed_filter_process_says_how_many_held_connections_were_lost(start_gunicorn) -> None:
    """Issue 14, item 8: SIGKILL loses what the filter process holds; the arbiter logs and counts it."""
    server = start_gunicorn("-k", "sync", env={"ACCEPTFILTER_FILTER": "httpready", "ACCEPTFILTER_TIMEOUT": "30"})
    first = server.feeder_pids()[0]
    held = open_conns(server.port, 6, HEAD)
    try:
        def all_held() -> bool:  # the filter process's engine holds all six (its stats file says so)
            from acceptfilter.statsfile import read_port

            return any(e.pid == first and e.stats.get("held", 0) >= 6 for e in read_port(server.port))
        wait_for(all_held, timeout=60)
        os.kill(first, signal.SIGKILL)
        for s in held:  # the kernel closed them with the process: each client sees FIN or RST
            s.settimeout(10)
            try:
                assert s.recv(100) == b""
            except ConnectionResetError:
                pass
        wait_for(lambda: "holding 6 connections: they are lost" in server.log(), timeout=15)
        assert "6 lost this way so far" in server.log()
        wait_for(lambda: len(server.feeder_pids()) == 2, timeout=15)
        assert curl(server.port)["reason"] == "ready"
    finally:
        close_all(held)


def test_complete_requests_skip_the_filter_process_and_survive_it_stalling(start_gunicorn) -> None:
    """Workers look first: a complete request never waits for the filter process."""
    server = start_gunicorn("-k", "sync", env={"ACCEPTFILTER_FILTER": "httpready"})
    feeder = server.feeder_pids()[0]
    os.kill(feeder, signal.SIGSTOP)
    try:
        held = open_conns(server.port, 5, HEAD)  # queued for the stopped filter process, not lost
        answers = [curl(server.port, f"/direct{i}", max_time=5) for i in range(5)]
        assert [(a["reason"], a["info"]["target"]) for a in answers] == [("ready", f"/direct{i}") for i in range(5)]
    finally:
        os.kill(feeder, signal.SIGCONT)
    try:
        time.sleep(0.3)
        assert {a["path"] for a in finish_and_read(held)} == {"/held"}
    finally:
        close_all(held)


def test_acceptfilter_run_starts_gunicorn_behind_the_filter(start_gunicorn) -> None:
    launcher = [sys.executable, "-m", "acceptfilter.cli", "run", "--filter", "httpready", "--timeout", "20", "--", "gunicorn"]
    server = start_gunicorn("-k", "gthread", launcher=launcher)
    idle = open_conns(server.port, 20)
    try:
        answer = curl(server.port, "/via-run", max_time=5)
        assert answer["reason"] == "ready" and answer["info"]["target"] == "/via-run"
    finally:
        close_all(idle)


def test_acceptfilter_run_gunicorn_refuses_a_second_config_file(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "acceptfilter.cli", "run", "--", "gunicorn", "-c", "conf.py", "app:app"],
                         capture_output=True, text=True, timeout=30, cwd=tmp_path)
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert "install(globals())" in out.stderr


def test_the_filter_process_logs_where_gunicorn_logs(tmp_path: Path) -> None:
    (tmp_path / "app.py").write_text(APP)
    errorlog = tmp_path / "error.log"
    proc = subprocess.Popen([sys.executable, "-m", "gunicorn", "-c", "python:acceptfilter.gunicorn", "--no-control-socket",
                             "-b", "127.0.0.1:0", "--chdir", str(tmp_path), "--error-logfile", str(errorlog),
                             "--graceful-timeout", "3", "app:app"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: errorlog.exists() and "for gunicorn's workers" in errorlog.read_text(), timeout=20)
        assert re.search(r"\[\d+\] \[INFO\] acceptfilter: filtering \('127\.0\.0\.1', \d+\) with httpready", errorlog.read_text())
    finally:
        proc.terminate()
        proc.wait(30)
    assert "acceptfilter: stopped:" in errorlog.read_text()


@pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root")
def test_the_filter_process_drops_privileges_like_the_workers(start_gunicorn) -> None:
    import pwd
    import tempfile

    nobody = pwd.getpwnam("nobody")
    home = Path(tempfile.mkdtemp(prefix="af-gunicorn-"))  # readable by nobody, unlike pytest's tmp_path
    home.chmod(0o755)
    try:
        server = Gunicorn(home, ["-w", "1", "-k", "sync", "--user", str(nobody.pw_uid), "--group", str(nobody.pw_gid)],
                          {"ACCEPTFILTER_FILTER": "httpready"})
        (home / "app.py").chmod(0o644)
        try:
            server.wait_started(1)
            status = Path(f"/proc/{server.feeder_pids()[0]}/status").read_text()
            uids = re.search(r"^Uid:\s+(\d+)\s+(\d+)", status, re.M)
            assert uids is not None and {int(uids.group(1)), int(uids.group(2))} == {nobody.pw_uid}
            assert curl(server.port)["reason"] == "ready"
        finally:
            server.stop()
    finally:
        import shutil

        shutil.rmtree(home, ignore_errors=True)


def _get(port: int, path: str) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: l\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return data


def _abuse(port: int, stop: threading.Event, rng: random.Random) -> None:
    """Garbage, resets, connect-and-close, oversized heads and slowloris, round and round."""
    slow: list[socket.socket] = []
    while not stop.is_set():
        kind = rng.randrange(5)
        try:
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
        except OSError:
            continue
        if kind == 0:
            s.sendall(rng.randbytes(rng.randrange(1, 300)))
            s.close()
        elif kind == 1:
            s.sendall(b"GET / HT")
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            s.close()  # RST
        elif kind == 2:
            s.close()
        elif kind == 3:
            s.sendall(b"GET /" + b"a" * 70_000)  # larger than httpready's max_bytes
            s.close()
        else:
            s.sendall(b"GET /slow")  # never finished: closed by the deadline
            slow.append(s)
        time.sleep(0.002)
    for s in slow:
        s.close()


def test_hostile_clients_beside_legit_ones_lose_nothing_and_leak_nothing(start_gunicorn) -> None:
    server = start_gunicorn("-k", "sync", workers=3,
                            env={"ACCEPTFILTER_TIMEOUT": "1", "ACCEPTFILTER_ON_TIMEOUT": "close"})
    feeder = server.feeder_pids()[0]
    baseline = len(os.listdir(f"/proc/{feeder}/fd"))
    idle = open_conns(server.port, 100)
    stop = threading.Event()
    abusers = [threading.Thread(target=_abuse, args=(server.port, stop, random.Random(seed))) for seed in (1, 2)]
    for t in abusers:
        t.start()
    failures: list[str] = []
    served = 0
    try:
        deadline = time.monotonic() + 6
        while time.monotonic() < deadline:
            reply = _get(server.port, f"/legit{served}")
            if not reply.startswith(b"HTTP/1.1 200") or f"/legit{served}".encode() not in reply:
                failures.append(reply[:100].decode(errors="replace"))
            served += 1
    finally:
        stop.set()
        for t in abusers:
            t.join()
        close_all(idle)
    assert not failures and served > 50, (served, failures[:3])
    # Every held, rejected and timed-out connection was closed: the filter process's fds are back.
    wait_for(lambda: len(os.listdir(f"/proc/{feeder}/fd")) <= baseline, timeout=15)
    assert curl(server.port)["reason"] == "ready"


# -- metadata ----------------------------------------------------------------
def test_proxy_header_gives_the_app_the_real_client_address(start_gunicorn) -> None:
    server = start_gunicorn("-k", "sync", env={"ACCEPTFILTER_FILTER": "proxy:trusted=127.0.0.0/8 httpready"})
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(b"PROXY TCP4 203.0.113.7 10.0.0.1 5555 80\r\nGET /p HTTP/1.1\r\nHost: shop.example\r\n"
                  b"Connection: close\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    body = json.loads(data.partition(b"\r\n\r\n")[2])
    assert body["remote_addr"] == "203.0.113.7"
    assert body["info"]["host"] == "shop.example" and body["info"]["transport"] == "tcp4"


# -- clear errors ------------------------------------------------------------
def _fails_to_start(tmp_path: Path, args: list[str], env: dict[str, str]) -> str:
    (tmp_path / "app.py").write_text(APP)
    out = subprocess.run([sys.executable, "-m", "gunicorn", "-c", "python:acceptfilter.gunicorn", "--no-control-socket",
                          "-b", "127.0.0.1:0", "--chdir", str(tmp_path), *args, "app:app"],
                         capture_output=True, text=True, timeout=30, env={**os.environ, **env})
    assert out.returncode != 0
    assert "Traceback" not in out.stderr, out.stderr
    return out.stderr


def test_unknown_filter_is_a_clear_error(tmp_path: Path) -> None:
    err = _fails_to_start(tmp_path, [], {"ACCEPTFILTER_FILTER": "nosuchfilter"})
    assert "acceptfilter" in err and "nosuchfilter" in err


def test_bad_timeout_is_a_clear_error(tmp_path: Path) -> None:
    err = _fails_to_start(tmp_path, [], {"ACCEPTFILTER_TIMEOUT": "soon"})
    assert "ACCEPTFILTER_TIMEOUT" in err


def test_unsupported_worker_class_is_refused(tmp_path: Path) -> None:
    err = _fails_to_start(tmp_path, ["-k", "gunicorn.workers.gtornado.TornadoWorker"], {})
    assert "sync and gthread" in err


def test_settings_env_overrides_install_defaults() -> None:
    from acceptfilter.integrations import gunicorn as af_gunicorn

    got = af_gunicorn.settings({"ACCEPTFILTER_FILTER": "proxy:trusted=10.0.0.0/8 httpready", "ACCEPTFILTER_MAX_HELD": "77"},
                               timeout=3, filter="dataready")
    assert got.filters == ("proxy:trusted=10.0.0.0/8", "httpready")
    assert (got.timeout, got.max_held, got.on_timeout, got.core) == (3.0, 77, "close", "c")  # close: the worker model default
    with pytest.raises(AcceptFilterError, match="ACCEPTFILTER_ON_TIMEOUT|on_timeout"):
        af_gunicorn.settings({"ACCEPTFILTER_ON_TIMEOUT": "explode"})
    with pytest.raises(TypeError, match="unknown setting"):
        af_gunicorn.install({}, filtre="httpready")
