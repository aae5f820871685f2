"""Arbiter side: starts the one filter process, keeps it alive, hands over on HUP."""

from __future__ import annotations

import logging
import os
import select
import socket
import struct
import subprocess
import sys
import threading
import time
from typing import Any

from ...decision import Decider
from ...errors import AcceptFilterError
from ...policy import Policy, Route
from ...registry import load_chain
from ..handoff import make_channel
from .filter_process import FeederSettings
from .first_look import FirstLookListener

__all__ = ["Supervisor"]

_fallback_log = logging.getLogger("acceptfilter.gunicorn")

#: Seconds the arbiter waits for the filter process to say it is ready.
START_TIMEOUT = 30.0
#: Seconds a stopping filter process gets to hand its connections over.
STOP_TIMEOUT = 5.0
_RESTART_BACKOFF = (0.1, 10.0)

class Supervisor:
    """Arbiter side: one filter process for a set of listeners, kept alive."""

    def __init__(self, server: Any, listeners: list[Any], config: FeederSettings) -> None:
        self.log = getattr(server, "log", _fallback_log)
        self.loglevel = str(getattr(server.cfg, "loglevel", "info")).lower()
        self.owner_ids = (getattr(server.cfg, "uid", os.getuid()), getattr(server.cfg, "gid", os.getgid()))
        errorlog = getattr(server.cfg, "errorlog", "-")
        self.errorlog = errorlog if isinstance(errorlog, str) and errorlog else "-"
        self.listeners = list(listeners)
        self.fds = tuple(lst.fileno() for lst in self.listeners)
        self.config = config
        #: Per listener: ready connections to the workers, and the ones a worker
        #: found incomplete to the filter process (each a (send, receive) pair).
        self.channels = [make_channel() for _ in self.listeners]
        self.offloads = [make_channel() for _ in self.listeners]
        self.owner = os.getpid()
        self.proc: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()
        self._stopping = False
        self._wake_r, self._wake_w = os.pipe()
        #: Per filter process: a 16-byte memfd it keeps its held count and a
        #: clean-exit flag in (see filter_process.Tally), read when it dies.
        self._tallies: dict[int, int] = {}
        #: Connections lost with filter processes that died holding them.
        self.lost_held = 0
        self._thread = threading.Thread(target=self._watch, name="acceptfilter-supervisor", daemon=True)

    # -- arbiter ---------------------------------------------------------
    def start(self) -> None:
        self.defer_accept(self.config)
        self.proc = self._spawn(self.config)
        self._thread.start()

    def defer_accept(self, config: FeederSettings) -> None:
        """Let the kernel keep a connection from accept() until it has sent something (TCP only)."""
        for lst in self.listeners:
            sock = getattr(lst, "sock", lst)
            if sock.family in (socket.AF_INET, socket.AF_INET6):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, config.defer_accept)

    def replace(self, config: FeederSettings) -> None:
        """New settings: start a new filter process, then let the old one hand over."""
        new = self._spawn(config)
        self.defer_accept(config)
        with self._lock:
            old, self.proc, self.config = self.proc, new, config
        os.write(self._wake_w, b"r")
        if old is not None:
            self._terminate(old)

    def stop(self) -> None:
        if os.getpid() != self.owner:
            return
        with self._lock:
            self._stopping, proc = True, self.proc
        os.write(self._wake_w, b"s")
        if proc is not None:
            self._terminate(proc)
        if self._thread.is_alive():
            self._thread.join(STOP_TIMEOUT)
        for send, recv in (*self.channels, *self.offloads):
            send.close()
            recv.close()

    # -- worker (after fork) ---------------------------------------------
    def worker_sockets(self, sockets: list[Any]) -> list[Any]:
        """The worker's listen sockets, each replaced by a :class:`FirstLookListener`."""
        route = Route("default", load_chain(list(self.config.filters)))
        policy = Policy.build(timeout=self.config.timeout, on_timeout=self.config.on_timeout,
                              max_held=self.config.max_held)
        decider = Decider((route,), on_error=_filter_failed)
        matcher = _compiled_matcher(route)
        by_fd = {lst.fileno(): i for i, lst in enumerate(self.listeners)}
        replaced = []
        for sock in sockets:
            if sock.fileno() not in by_fd:
                raise AcceptFilterError(f"gunicorn listener {sock} is not filtered (was it added without a restart?)")
            i = by_fd[sock.fileno()]
            lst, ready, offload = self.listeners[i], self.channels[i][1], self.offloads[i][0]
            replaced.append(FirstLookListener(ready, lst, listen=lst.sock, offload=offload, decider=decider,
                                              policy=policy, max_bytes=route.max_bytes, matcher=matcher))
        for (send, _), (_, recv) in zip(self.channels, self.offloads, strict=True):
            send.close()  # a worker receives ready connections and sends incomplete ones
            recv.close()
        return replaced

    # -- the filter process ----------------------------------------------
    def _spawn(self, config: FeederSettings) -> subprocess.Popen[bytes]:
        status_r, status_w = os.pipe()
        tally = os.memfd_create("acceptfilter-held", 0)
        os.ftruncate(tally, 16)
        pairs = [f"{lst.fileno()}:{send.fileno()}:{hold_recv.fileno()}:{hold_send.fileno()}"
                 for lst, (send, _), (hold_send, hold_recv) in zip(self.listeners, self.channels, self.offloads, strict=True)]
        cmd = [sys.executable, "-m", "acceptfilter.integrations.gunicorn.filter_process_main", "--master", str(os.getpid()),
               "--status-fd", str(status_w), "--tally-fd", str(tally), "--log-level", self.loglevel, "--error-log", self.errorlog, *config.argv()]
        uid, gid = self.owner_ids
        if (uid, gid) != (os.getuid(), os.getgid()):
            cmd += ["--uid", str(uid), "--gid", str(gid)]
        for pair in pairs:
            cmd += ["--pair", pair]
        pass_fds = [*self.fds, *(send.fileno() for send, _ in self.channels),
                    *(end.fileno() for pair in self.offloads for end in pair), status_w, tally]
        try:
            proc = subprocess.Popen(cmd, pass_fds=pass_fds, stdin=subprocess.DEVNULL)
        except BaseException:
            os.close(tally)
            raise
        finally:
            os.close(status_w)
        self._tallies[proc.pid] = tally
        try:
            status = self._read_status(status_r, proc)
        finally:
            os.close(status_r)
        if status != "R":
            self._terminate(proc)
            why = status[1:] if status.startswith("E") else f"it exited with status {proc.poll()}"
            raise AcceptFilterError(f"acceptfilter could not start filtering: {why}")
        self.log.info("acceptfilter: filtering with %s in process %d", " -> ".join(config.filters), proc.pid)
        return proc

    @staticmethod
    def _read_status(fd: int, proc: subprocess.Popen[bytes]) -> str:
        chunks: list[bytes] = []
        deadline = time.monotonic() + START_TIMEOUT
        while (left := deadline - time.monotonic()) > 0:
            ready, _, _ = select.select([fd], [], [], left)
            if not ready:
                break
            chunk = os.read(fd, 4096)
            if not chunk:
                break
            chunks.append(chunk)
            if chunks[0][:1] == b"R":
                break
        else:
            return f"Eno answer within {START_TIMEOUT:g} s (pid {proc.pid})"
        return b"".join(chunks).decode("utf-8", "replace")

    def _terminate(self, proc: subprocess.Popen[bytes]) -> None:
        """SIGTERM (it hands its held connections over), then SIGKILL after STOP_TIMEOUT."""
        try:
            pidfd = os.pidfd_open(proc.pid)
        except ProcessLookupError:
            return
        try:
            proc.terminate()
            if not select.select([pidfd], [], [], STOP_TIMEOUT)[0]:
                self.log.warning("acceptfilter: filter process %d did not stop in %g s; killing it", proc.pid, STOP_TIMEOUT)
                proc.kill()
            _reap(pidfd)
        finally:
            os.close(pidfd)
            held, clean = self._read_tally(proc.pid)  # asked to stop: it passes its held ones on
            if held and not clean:
                self.lost_held += held
                self.log.error("acceptfilter: filter process %d stopped without passing on %d held connections; "
                               "they are lost (%d so far)", proc.pid, held, self.lost_held)

    def _watch(self) -> None:
        """Restart the filter process whenever it dies unasked (with a backoff)."""
        backoff = _RESTART_BACKOFF[0]
        while True:
            with self._lock:
                proc = None if self._stopping else self.proc
            if proc is None:
                return
            started = time.monotonic()
            status = self._wait_exit(proc)
            if status is None:
                continue  # woken: replaced or stopping, look again
            if time.monotonic() - started > 60:
                backoff = _RESTART_BACKOFF[0]
            # Give a stopping arbiter (the same Ctrl-C or SIGTERM reached it) time to say so.
            if self._sleep(max(backoff, 0.5)) or not self._listening():
                return
            held, clean = self._read_tally(proc.pid)
            if status == "exited" and not clean:
                status = "killed or crashed: it did not stop cleanly (gunicorn reaped it, so its status is gone)"
            if clean:
                self.log.error("acceptfilter: the filter process %d ended (%s) after passing on what it held; "
                               "restarting it", proc.pid, status)
            else:
                self.lost_held += held
                self.log.error("acceptfilter: the filter process %d ended (%s) holding %d connections: they are lost "
                               "(the kernel closed them; %d lost this way so far); restarting it",
                               proc.pid, status, held, self.lost_held)
            while not self._sleep(backoff) and self._listening():
                try:
                    new = self._spawn(self.config)
                except Exception as exc:  # keep supervising whatever went wrong
                    self.log.error("acceptfilter: restarting the filter process failed: %s", exc)
                    backoff = min(backoff * 2, _RESTART_BACKOFF[1])
                    continue
                with self._lock:
                    if self._stopping:
                        self._terminate(new)
                        return
                    self.proc = new
                break

    def _read_tally(self, pid: int) -> tuple[int, bool]:
        """(held connections at its last count, stopped cleanly) for a filter process that ended."""
        fd = self._tallies.pop(pid, None)
        if fd is None:
            return 0, False
        try:
            held, clean = struct.unpack("=QQ", os.pread(fd, 16, 0))
        except (OSError, struct.error):
            return 0, False
        finally:
            os.close(fd)
        return int(held), bool(clean)

    def _wait_exit(self, proc: subprocess.Popen[bytes]) -> str | None:
        """Block until ``proc`` exits (its status) or someone wakes us (None)."""
        try:
            pidfd = os.pidfd_open(proc.pid)
        except ProcessLookupError:
            return "gone"
        try:
            ready, _, _ = select.select([pidfd, self._wake_r], [], [])
            if self._wake_r in ready:
                os.read(self._wake_r, 64)
                return None
            return _reap(pidfd)
        finally:
            os.close(pidfd)

    def _sleep(self, seconds: float) -> bool:
        """Sleep unless woken; True when we are stopping."""
        if select.select([self._wake_r], [], [], seconds)[0]:
            os.read(self._wake_r, 64)
        with self._lock:
            return self._stopping

    def _listening(self) -> bool:
        """False once the arbiter has closed its listeners (it is shutting down)."""
        try:
            return all(lst.fileno() >= 0 for lst in self.listeners)
        except (AttributeError, OSError):
            return False


def _reap(pidfd: int) -> str:
    """Collect the exit status if gunicorn's own ``waitpid(-1)`` has not already."""
    try:
        result = os.waitid(os.P_PIDFD, pidfd, os.WEXITED | os.WNOHANG)
    except ChildProcessError:
        return "exited"
    if result is None:
        return "running"
    if result.si_code == os.CLD_EXITED:
        return f"exit status {result.si_status}"
    return f"signal {result.si_status}"


def _filter_failed(name: str, what: str, exc: BaseException | None) -> None:
    """In a worker: the connection goes to the filter process, which counts and applies on_error."""
    _fallback_log.debug("acceptfilter: filter %r %s on a first look; passing the connection on", name, what)


def _compiled_matcher(route: Route) -> Any:
    """The route's readiness matcher for a worker's first look: the C one when the core is built."""
    if len(route.chain) != 1 or route.chain[0].needs_peer:
        return None
    try:
        program = route.chain[0].matcher()
    except Exception:
        _fallback_log.warning("acceptfilter: could not build the filter's matcher; first looks run the filter",
                              exc_info=True)
        return None
    if program is None:
        return None
    from ...cmatcher import available, compile_program

    return compile_program(program) if available() else program
