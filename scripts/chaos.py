#!/usr/bin/env python3
"""Chaos run: real multi-process servers under abuse, signals and fd exhaustion.

    python scripts/chaos.py --duration 30              # what tests/test_chaos.py runs (per server)
    python scripts/chaos.py --duration 600             # the long run (docs/operations/signals.md)

For each server, ``acceptfilter serve --workers 2`` (with an HTTP route served
from disk and an SSH route relayed to a backend that never completes a
connect) and ``gunicorn -c python:acceptfilter.gunicorn -w 2``: 500 idle
connections, 100 slowloris ones trickling a request head, legit HTTP clients
in a loop, and (serve) SSH clients whose relay hangs. Meanwhile, at fixed
fractions of the duration: SIGHUP to the parent, SIGKILL of a worker,
the workers' (gunicorn: the filter process's) fd limits lowered to what they
have open for a while, SIGHUP again; at the end SIGTERM.

Exits non-zero and says why unless: every legit request got its page, except
those the documentation allows (docs/operations/signals.md): a request in
flight in the worker that was SIGKILLed (reset or empty reply), and a 503 from
a process at its fd limit; no output of any process holds a traceback; every
status line of serve adds up (accepted = held + every outcome); every process
exited with status 0 after SIGTERM. Prints a JSON report. Loopback only; every
wait is bounded.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BODY = b"chaos page\n"
APP = '''
def app(environ, start_response):
    body = b"chaos page\\n"
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
'''
STATUS = re.compile(r"accepted (\d+) = held (\d+) \+ surfaced (\d+) \+ rejected (\d+) \+ closed empty (\d+) "
                    r"\+ aborted (\d+) \+ failed (\d+) \+ dropped (\d+) \+ detached (\d+)")
#: What a process is allowed to open beyond what it holds when its fd limit is lowered.
FD_MARGIN = 4


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def open_fds(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


@dataclass
class Failure:
    started: float
    ended: float
    what: str


@dataclass
class Load:
    """The clients: idle, slowloris, legit and (optionally) relayed ones, until ``stop`` is set."""

    port: int
    idle: int
    slow: int
    legit: int
    relay: bool
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    ok: int = 0
    answered_503: list[Failure] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)
    relayed_closed: int = 0
    relayed_open: int = 0
    client_errors: list[str] = field(default_factory=list)
    threads: list[threading.Thread] = field(default_factory=list)

    def start(self) -> None:
        kinds = [self._idle, self._slowloris, *([self._relayed] if self.relay else [])]
        kinds += [self._legit] * self.legit
        for kind in kinds:
            thread = threading.Thread(target=self._guard, args=(kind,), daemon=True)
            thread.start()
            self.threads.append(thread)

    def burst(self, count: int) -> list[socket.socket]:
        """``count`` more half-sent connections at once (to push a process over its fd limit).

        Half a head, not nothing: past ``TCP_DEFER_ACCEPT`` (gunicorn's default) at once, and held.
        """
        conns = []
        for _ in range(count):
            c = self._connect()
            if c is not None:
                try:
                    c.sendall(b"GET /burst HTTP/1.1\r\n")
                except OSError:
                    pass
                conns.append(c)
        return conns

    def finish(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(60)

    def _guard(self, kind: Any) -> None:
        try:
            kind()
        except BaseException as exc:  # a bug of this script: reported, never a silent thread death
            with self.lock:
                self.client_errors.append(f"{kind.__name__}: {type(exc).__name__}: {exc}")

    def _connect(self) -> socket.socket | None:
        try:
            return socket.create_connection(("127.0.0.1", self.port), timeout=10)
        except OSError:
            return None

    def _keep(self, conns: list[socket.socket], count: int, first: bytes) -> None:
        """Reopen what the server closed (an eviction, a reset worker) so ``count`` stay open."""
        alive = []
        for c in conns:
            try:
                c.setblocking(False)
                gone = c.recv(1, socket.MSG_PEEK) == b""
            except BlockingIOError:
                gone = False
            except OSError:
                gone = True
            if gone:
                c.close()
            else:
                alive.append(c)
        conns[:] = alive
        while len(conns) < count and not self.stop.is_set():
            c = self._connect()
            if c is None:
                break
            if first:
                try:
                    c.sendall(first)
                except OSError:
                    c.close()
                    continue
            conns.append(c)

    def _idle(self) -> None:
        conns: list[socket.socket] = []
        while not self.stop.wait(0.5):
            self._keep(conns, self.idle, b"")
        for c in conns:
            c.close()

    def _slowloris(self) -> None:
        conns: list[socket.socket] = []
        sent: dict[int, int] = {}
        head = b"GET /slow HTTP/1.1\r\nHost: chaos\r\nX-Slow: " + b"s" * 4000
        while not self.stop.wait(0.5):
            self._keep(conns, self.slow, head[:1])
            for c in conns:
                n = sent.get(id(c), 1)
                try:
                    c.sendall(head[n:n + 1])
                    sent[id(c)] = n + 1
                except OSError:
                    pass  # reopened on the next round
        for c in conns:
            c.close()

    def _relayed(self) -> None:
        """SSH clients routed to a backend whose connect hangs: each must end (closed), never hang the rest."""
        conns: dict[socket.socket, float] = {}
        while not self.stop.wait(0.2):
            for c in list(conns):
                try:
                    c.setblocking(False)
                    data = c.recv(100)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                if not data:
                    c.close()
                    del conns[c]
                    with self.lock:
                        self.relayed_closed += 1
            while len(conns) < 10:
                c = self._connect()
                if c is None:
                    break
                try:
                    c.sendall(b"SSH-2.0-chaos\r\n")
                except OSError:
                    c.close()
                    continue
                conns[c] = time.monotonic()
        with self.lock:
            self.relayed_open = len(conns)
        for c in conns:
            c.close()

    def _legit(self) -> None:
        while not self.stop.is_set():
            started = time.monotonic()
            c = self._connect()
            if c is None:
                self._fail(started, "connect failed")
                continue
            try:
                c.settimeout(60)
                c.sendall(b"GET /page.txt HTTP/1.0\r\nHost: chaos\r\n\r\n")
                reply = b""
                while chunk := c.recv(65536):
                    reply += chunk
            except OSError as exc:
                self._fail(started, f"{type(exc).__name__}: {exc}")
                continue
            finally:
                c.close()
            if reply.startswith(b"HTTP/1.") and reply.endswith(BODY) and b" 200 " in reply[:16]:
                with self.lock:
                    self.ok += 1
            elif reply.startswith(b"HTTP/1.0 503 "):
                with self.lock:
                    self.answered_503.append(Failure(started, time.monotonic(), "503"))
            else:
                self._fail(started, f"reply {reply[:40]!r}" if reply else "empty reply")

    def _fail(self, started: float, what: str) -> None:
        with self.lock:
            self.failures.append(Failure(started, time.monotonic(), what))


class Server:
    """One server under test: its command line, its processes, and its output."""

    def __init__(self, kind: str, workdir: Path, port: int, hang_port: int) -> None:
        self.kind = kind
        self.port = port
        self.log = workdir / f"{kind}.log"
        site = workdir / "site"
        site.mkdir(exist_ok=True)
        (site / "page.txt").write_bytes(BODY)
        (workdir / "chaos_app.py").write_text(APP)
        if kind == "serve":
            cmd = [sys.executable, "-m", "acceptfilter.cli", "serve", "--port", str(port), "--workers", "2",
                   "--directory", str(site), "--status-interval", "0.5", "--timeout", "120",
                   "--route", "http=httpready", "--route", "ssh=sshready", "--forward", f"ssh=127.0.0.1:{hang_port}"]
            env = dict(os.environ)
        else:
            cmd = [sys.executable, "-m", "gunicorn", "-c", "python:acceptfilter.gunicorn", "--no-control-socket",
                   "-w", "2", "-b", f"127.0.0.1:{port}", "--chdir", str(workdir), "--graceful-timeout", "10",
                   "chaos_app:app"]
            env = {**os.environ, "ACCEPTFILTER_TIMEOUT": "120"}
        self.out = self.log.open("wb")
        self.proc = subprocess.Popen(cmd, stdout=self.out, stderr=subprocess.STDOUT, cwd=workdir, env=env,
                                     start_new_session=True)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_serving(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.kind} exited with {self.proc.returncode}:\n{self.text()[-3000:]}")
            if len(self.workers()) >= 2 and self._answers():
                return
            time.sleep(0.1)
        raise RuntimeError(f"{self.kind} did not start serving in {timeout:g} s:\n{self.text()[-3000:]}")

    def _answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=5) as c:
                c.sendall(b"GET /page.txt HTTP/1.0\r\n\r\n")
                reply = b""
                while chunk := c.recv(65536):
                    reply += chunk
            return reply.endswith(BODY)
        except OSError:
            return False

    def workers(self) -> list[int]:
        """The worker processes (for gunicorn, not its filter process)."""
        return [pid for pid in children(self.proc.pid) if "filter_process" not in cmdline(pid)]

    def holders(self) -> list[int]:
        """The processes that hold connections: every serve worker, or gunicorn's filter process.

        Every serve worker, not one: the workers share the listen queue, so while one is at its
        limit another takes the burst, and the limited one may never try an accept that fails.
        """
        if self.kind == "serve":
            return self.workers()
        found = [pid for pid in children(self.proc.pid) if "filter_process" in cmdline(pid)]
        return found[:1] if found else self.workers()[:1]

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            code = self.proc.wait()
            code = code if code else -999
        self.out.close()
        return code


def hanging_backend() -> tuple[socket.socket, list[socket.socket]]:
    """A listener that never accepts, its tiny queue full: further connects get no SYN-ACK and hang."""
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen(0)
    fill: list[socket.socket] = []
    for _ in range(8):
        c = socket.socket()
        c.setblocking(False)
        try:
            c.connect(ls.getsockname())
        except BlockingIOError:
            pass
        fill.append(c)
    return ls, fill


def run_one(kind: str, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    hang, fill = hanging_backend()
    server = Server(kind, workdir, free_port(), hang.getsockname()[1])
    events: list[tuple[float, str]] = []
    load = Load(server.port, args.idle, args.slow, args.legit, relay=kind == "serve")
    code = None
    try:
        server.wait_serving()
        load.start()
        t0 = time.monotonic()

        def at(fraction: float) -> None:
            delay = t0 + fraction * args.duration - time.monotonic()
            if delay > 0:
                time.sleep(delay)

        def note(what: str) -> None:
            events.append((time.monotonic(), what))

        at(0.15)
        note("SIGHUP")
        server.proc.send_signal(signal.SIGHUP)
        at(0.3)
        victim = server.workers()[0]
        note(f"SIGKILL worker {victim}")
        os.kill(victim, signal.SIGKILL)
        at(0.45)
        limits: dict[int, tuple[int, int]] = {}
        for holder in server.holders():
            limits[holder] = resource.prlimit(holder, resource.RLIMIT_NOFILE)
            resource.prlimit(holder, resource.RLIMIT_NOFILE, (open_fds(holder) + FD_MARGIN, limits[holder][1]))
        note("fd limit of " + ", ".join(f"{pid} lowered to {open_fds(pid) + FD_MARGIN}" for pid in limits))
        burst = load.burst(50)  # new connections they must accept (serve) or receive (gunicorn) at their limit
        at(0.6)
        for c in burst:
            c.close()
        at(0.65)
        for holder, limit in limits.items():
            try:
                resource.prlimit(holder, resource.RLIMIT_NOFILE, limit)
            except ProcessLookupError:
                pass
        note("fd limit restored")
        at(0.75)
        note("SIGHUP")
        server.proc.send_signal(signal.SIGHUP)
        at(1.0)
    finally:
        load.finish()
        note_end = time.monotonic()
        code = server.stop()
        hang.close()
        for c in fill:
            c.close()
    events.append((note_end, "SIGTERM"))
    return report(server, load, events, code)


def report(server: Server, load: Load, events: list[tuple[float, str]], code: int) -> dict[str, Any]:
    text = server.text()
    kills = [t for t, what in events if what.startswith("SIGKILL")]
    fd_window = [t for t, what in events if what.startswith("fd limit")]
    # Allowed by docs/operations/signals.md: in flight in the worker that was SIGKILLed.
    # (a reset, an empty or a cut reply: whatever the kernel sent when the process died mid-request).
    allowed = [f for f in load.failures if any(f.started <= k <= f.ended <= k + 10 for k in kills)]
    lost = [f for f in load.failures if f not in allowed]
    allowed_503 = [f for f in load.answered_503 if len(fd_window) == 2 and fd_window[0] <= f.ended
                   and f.started <= fd_window[1]]
    bad_503 = [f for f in load.answered_503 if f not in allowed_503]
    lines = [tuple(int(g) for g in m.groups()) for m in STATUS.finditer(text)]
    broken = [line for line in lines if line[0] != sum(line[1:])]
    problems = []
    if lost:
        problems.append(f"{len(lost)} legit request(s) lost: {sorted({f.what for f in lost})}")
    if bad_503:
        problems.append(f"{len(bad_503)} 503 answer(s) outside the fd-limit window")
    if not load.ok:
        problems.append("no legit request was answered")
    if "Traceback" in text:
        problems.append("a traceback in the server's output")
    if load.client_errors:
        problems.append(f"client errors: {load.client_errors}")
    if server.kind == "serve" and not lines:
        problems.append("no status line")
    if server.kind == "serve" and "out of file descriptors" not in text:
        problems.append("the fd limit was never reached (no EMFILE warning)")
    if broken:
        problems.append(f"{len(broken)} status line(s) that do not add up, e.g. {broken[0]}")
    if code != 0:
        problems.append(f"exit status {code} after SIGTERM")
    start = events[0][0] if events else 0.0
    return {
        "server": server.kind,
        "events": [f"{t - start:.1f}s {what}" for t, what in events],
        "legit_ok": load.ok,
        "legit_lost_allowed_sigkill": len(allowed),
        "legit_503_at_fd_limit": len(allowed_503),
        "legit_lost": [f"{f.what} ({f.ended - f.started:.2f} s)" for f in lost[:10]],
        "relayed_closed": load.relayed_closed,
        "relayed_still_open_at_end": load.relayed_open,
        "fd_limit_reached": "out of file descriptors" in text,
        "status_lines": len(lines),
        "status_lines_broken": len(broken),
        "exit_status": code,
        "problems": problems,
        "log_tail": text[-1500:] if problems else "",
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=60, help="seconds of chaos per server (default: 60)")
    ap.add_argument("--servers", default="serve,gunicorn", help="comma-separated: serve, gunicorn")
    ap.add_argument("--idle", type=int, default=500)
    ap.add_argument("--slow", type=int, default=100)
    ap.add_argument("--legit", type=int, default=4, help="legit client threads")
    ap.add_argument("--keep", metavar="DIR", help="keep the servers' logs in DIR")
    args = ap.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = args.idle + args.slow + args.legit + 200
    if hard != resource.RLIM_INFINITY and hard < need:
        print(f"chaos: needs {need} file descriptors, the hard limit is {hard}", file=sys.stderr)
        return 2
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 4 * need)), hard))
    reports = []
    with tempfile.TemporaryDirectory(prefix="chaos-") as scratch:
        tmp = args.keep or scratch
        for kind in args.servers.split(","):
            workdir = Path(tmp) / kind
            workdir.mkdir(parents=True)
            reports.append(run_one(kind.strip(), args, workdir))
    print(json.dumps(reports, indent=2))
    return 1 if any(r["problems"] for r in reports) else 0


if __name__ == "__main__":
    sys.exit(main())
