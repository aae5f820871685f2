"""gunicorn (sync and gthread workers) behind an accept filter, with no code change.

Enable it with gunicorn's own config mechanism::

    ACCEPTFILTER_FILTER=httpready gunicorn -c python:acceptfilter.gunicorn -w 4 app:app

or, with a config file of your own, one line in it::

    import acceptfilter.gunicorn; acceptfilter.gunicorn.install(globals(), filter="httpready", timeout=10)

How it works: workers look first, one filter process holds the rest.
Each worker's listen socket is replaced by a :class:`.handoff.FirstLookListener`:
the worker accepts from the real listen socket as before, peeks, and runs the
filters on what is there; a connection whose request is complete (the
common case, helped by ``TCP_DEFER_ACCEPT``) is served at once, with no
other process involved. A connection that has sent too little is passed
(``SCM_RIGHTS``) to the one filter process the arbiter starts
(:mod:`.gunicorn_feeder`), which holds it until the filters are satisfied or
a policy applies, and then hands it, with what the filters learnt, into one
``SOCK_SEQPACKET`` channel per listener that every worker reads: an idle
worker takes the next ready connection, a busy one leaves it to the others,
as with the kernel's accept queue. Held and ready connections live outside
the workers, so killing a worker, recycling it (``max_requests``) or
reloading (HUP) loses none of them; if the filter process dies the arbiter
restarts it (workers keep serving complete requests meanwhile), and a HUP
that changes the settings starts a new one before the old one hands its held
connections over.

Settings, from the environment (which wins) or :func:`install`:
``ACCEPTFILTER_FILTER`` (a spec, or a chain of specs separated by spaces;
default ``httpready``), ``ACCEPTFILTER_TIMEOUT`` (seconds),
``ACCEPTFILTER_ON_TIMEOUT`` (``surface``, ``close``, ``reset``),
``ACCEPTFILTER_MAX_HELD`` (default: the filter process's fd limit, raised to
its hard limit, less 256), ``ACCEPTFILTER_CORE`` (``c`` or ``python``) and
``ACCEPTFILTER_DEFER_ACCEPT`` (``TCP_DEFER_ACCEPT`` seconds on the listen
sockets, default 1, 0 for off: workers then rarely accept a connection whose
request has not arrived yet).
An application reads what the filters learnt with
``acceptfilter.connection_info(environ["gunicorn.socket"])`` (or
:func:`connection_info` here).
"""

from __future__ import annotations

import functools
import logging
import os
import select
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, MutableMapping
from typing import Any

from ..engine import Engine
from ..errors import AcceptFilterError
from ..listener import ConnectionInfo
from ..listener import connection_info as _connection_info
from ..policy import Policy, Route
from ..registry import load_chain
from .gunicorn_feeder import FeederSettings
from .handoff import FirstLookListener, make_channel

__all__ = ["connection_info", "install", "on_exit", "on_reload", "on_starting", "post_fork", "settings", "when_ready"]

_fallback_log = logging.getLogger("acceptfilter.gunicorn")

#: Seconds the arbiter waits for the filter process to say it is ready.
START_TIMEOUT = 30.0
#: Seconds a stopping filter process gets to hand its connections over.
STOP_TIMEOUT = 5.0
_RESTART_BACKOFF = (0.1, 10.0)

_ENV = {
    "filter": "ACCEPTFILTER_FILTER",
    "timeout": "ACCEPTFILTER_TIMEOUT",
    "on_timeout": "ACCEPTFILTER_ON_TIMEOUT",
    "max_held": "ACCEPTFILTER_MAX_HELD",
    "core": "ACCEPTFILTER_CORE",
    "defer_accept": "ACCEPTFILTER_DEFER_ACCEPT",
}
_installed: dict[str, Any] = {}


def settings(env: Mapping[str, str] | None = None, **defaults: Any) -> FeederSettings:
    """The effective settings, checked: environment over ``defaults`` over built-in defaults.

    Raises :class:`AcceptFilterError` (or its subclasses) naming what is wrong.
    """
    env = os.environ if env is None else env
    merged: dict[str, Any] = {k: v for k, v in {**_installed, **defaults}.items() if v is not None}
    for key, var in _ENV.items():
        if env.get(var, "").strip():
            merged[key] = env[var].strip()
    unknown = set(merged) - set(_ENV)
    if unknown:
        raise AcceptFilterError(f"unknown acceptfilter setting(s): {', '.join(sorted(unknown))}; known: {', '.join(_ENV)}")
    raw_filter = merged.get("filter", "httpready")
    filters = tuple(raw_filter.split()) if isinstance(raw_filter, str) else tuple(raw_filter)
    try:
        timeout = None if merged.get("timeout") is None else float(merged["timeout"])
        max_held = None if merged.get("max_held") is None else int(merged["max_held"])
    except ValueError as exc:
        raise AcceptFilterError(f"{_ENV['timeout']} must be seconds and {_ENV['max_held']} a count: {exc}") from None
    if timeout is not None and not timeout > 0:
        raise AcceptFilterError(f"{_ENV['timeout']} must be more than 0 seconds, not {timeout:g}")
    if max_held is not None and max_held < 1:
        raise AcceptFilterError(f"{_ENV['max_held']} must be at least 1, not {max_held}")
    try:
        defer_accept = int(merged.get("defer_accept", 1))
    except ValueError:
        raise AcceptFilterError(f"{_ENV['defer_accept']} must be whole seconds (0: off)") from None
    if defer_accept < 0:
        raise AcceptFilterError(f"{_ENV['defer_accept']} must be whole seconds (0: off), not {defer_accept}")
    core = str(merged.get("core", "c"))
    if core not in ("c", "python"):
        raise AcceptFilterError(f"{_ENV['core']} must be 'c' or 'python', not {core!r}")
    on_timeout = str(merged.get("on_timeout", "surface"))
    load_chain(list(filters))  # unknown names and malformed specs fail here, in the arbiter
    Policy.build(timeout=timeout, on_timeout=on_timeout, max_held=max_held)
    return FeederSettings(filters, timeout, on_timeout, max_held, core, defer_accept)


def connection_info(environ: Mapping[str, Any]) -> ConnectionInfo | None:
    """What the filters learnt about the connection serving this WSGI request."""
    sock = environ.get("gunicorn.socket")
    return None if sock is None else _connection_info(sock)


class _Supervisor:
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
        decider = Engine.decider((route,), Policy.build(timeout=self.config.timeout, on_timeout=self.config.on_timeout,
                                                        max_held=self.config.max_held))
        by_fd = {lst.fileno(): i for i, lst in enumerate(self.listeners)}
        replaced = []
        for sock in sockets:
            if sock.fileno() not in by_fd:
                raise AcceptFilterError(f"gunicorn listener {sock} is not filtered (was it added without a restart?)")
            i = by_fd[sock.fileno()]
            lst, ready, offload = self.listeners[i], self.channels[i][1], self.offloads[i][0]
            replaced.append(FirstLookListener(ready, lst, listen=lst.sock, offload=offload, decider=decider,
                                              max_bytes=route.max_bytes))
        for (send, _), (_, recv) in zip(self.channels, self.offloads, strict=True):
            send.close()  # a worker receives ready connections and sends incomplete ones
            recv.close()
        return replaced

    # -- the filter process ----------------------------------------------
    def _spawn(self, config: FeederSettings) -> subprocess.Popen[bytes]:
        status_r, status_w = os.pipe()
        pairs = [f"{lst.fileno()}:{send.fileno()}:{hold_recv.fileno()}:{hold_send.fileno()}"
                 for lst, (send, _), (hold_send, hold_recv) in zip(self.listeners, self.channels, self.offloads, strict=True)]
        cmd = [sys.executable, "-m", "acceptfilter.integrations.gunicorn_feeder", "--master", str(os.getpid()),
               "--status-fd", str(status_w), "--log-level", self.loglevel, "--error-log", self.errorlog, *config.argv()]
        uid, gid = self.owner_ids
        if (uid, gid) != (os.getuid(), os.getgid()):
            cmd += ["--uid", str(uid), "--gid", str(gid)]
        for pair in pairs:
            cmd += ["--pair", pair]
        pass_fds = [*self.fds, *(send.fileno() for send, _ in self.channels),
                    *(end.fileno() for pair in self.offloads for end in pair), status_w]
        try:
            proc = subprocess.Popen(cmd, pass_fds=pass_fds, stdin=subprocess.DEVNULL)
        finally:
            os.close(status_w)
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
            self.log.error("acceptfilter: the filter process %d ended (%s); unless it handed them over, connections it held are lost; "
                           "restarting it", proc.pid, status)
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


# -- gunicorn's server hooks ----------------------------------------------
_supervisor: _Supervisor | None = None


def _check_server(server: Any) -> None:
    from gunicorn.workers.gthread import ThreadWorker
    from gunicorn.workers.sync import SyncWorker

    worker = server.worker_class
    if not (isinstance(worker, type) and issubclass(worker, (SyncWorker, ThreadWorker))):
        name = getattr(server.cfg, "worker_class_str", worker)
        raise RuntimeError(f"acceptfilter supports gunicorn's sync and gthread workers, not {name}; "
                           "for an ASGI app use `acceptfilter run -- uvicorn ...`")
    if server.cfg.reuse_port:
        raise RuntimeError("acceptfilter cannot filter with --reuse-port (each worker binds its own socket); drop it")


def on_starting(server: Any) -> None:
    """Check the worker class and settings before anything binds."""
    _check_server(server)
    try:
        settings()
    except AcceptFilterError as exc:
        raise RuntimeError(f"acceptfilter: {exc}") from None


def when_ready(server: Any) -> None:
    """Listeners are bound: start the filter process before any worker exists."""
    global _supervisor
    sup = _Supervisor(server, server.LISTENERS, settings())
    try:
        sup.start()
    except AcceptFilterError as exc:
        raise RuntimeError(str(exc)) from None
    _supervisor = sup


def post_fork(server: Any, worker: Any) -> None:
    """In each new worker: accept from the hand-off channel instead of the listen socket."""
    if _supervisor is not None:
        worker.sockets = _supervisor.worker_sockets(worker.sockets)


def on_reload(server: Any) -> None:
    """HUP: keep the filter process if nothing changed; hand over if the settings did."""
    global _supervisor
    old = _supervisor
    try:
        config = settings()
    except AcceptFilterError as exc:
        server.log.error("acceptfilter: keeping the previous settings: %s", exc)
        return
    if old is None:
        return
    fds = tuple(lst.fileno() for lst in server.LISTENERS)
    try:
        if fds != old.fds:
            new = _Supervisor(server, server.LISTENERS, config)
            new.start()
            _supervisor = new
            old.stop()
        elif config != old.config:
            server.log.info("acceptfilter: settings changed; handing over to a new filter process")
            old.replace(config)
    except AcceptFilterError as exc:
        server.log.error("acceptfilter: keeping the running filter process: %s", exc)


def on_exit(server: Any) -> None:
    """The arbiter is done: stop the filter process."""
    global _supervisor
    if _supervisor is not None:
        _supervisor.stop()
        _supervisor = None


_HOOKS: dict[str, Callable[..., None]] = {
    "on_starting": on_starting,
    "when_ready": when_ready,
    "post_fork": post_fork,
    "on_reload": on_reload,
    "on_exit": on_exit,
}


def install(namespace: MutableMapping[str, Any], **defaults: Any) -> None:
    """Enable acceptfilter from your own gunicorn config file: ``install(globals(), filter=...)``.

    Adds the server hooks to ``namespace``; a hook you already define there
    still runs, after acceptfilter's. ``defaults`` are ``filter``,
    ``timeout``, ``on_timeout``, ``max_held`` and ``core``; the
    ``ACCEPTFILTER_*`` environment variables override them.
    """
    unknown = set(defaults) - set(_ENV)
    if unknown:
        raise TypeError(f"install() got unknown setting(s) {', '.join(sorted(unknown))}; known: {', '.join(_ENV)}")
    _installed.clear()
    _installed.update(defaults)
    for name, ours in _HOOKS.items():
        theirs = namespace.get(name)
        if theirs is None or getattr(theirs, "_acceptfilter", False):
            namespace[name] = ours
        else:
            namespace[name] = _chained(ours, theirs)


def _chained(ours: Callable[..., None], theirs: Callable[..., None]) -> Callable[..., None]:
    @functools.wraps(theirs)  # keeps the signature: gunicorn checks each hook's arity
    def hook(*args: Any) -> None:
        ours(*args)
        theirs(*args)

    hook._acceptfilter = True  # type: ignore[attr-defined]
    return hook
