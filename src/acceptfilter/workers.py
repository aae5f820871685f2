"""Several worker processes on one listen socket, each with its own engine (``--workers N``).

The model, and why (numbers in docs/how-to/workers.md):
the parent binds (or inherits from systemd) one listen socket and forks N
workers; each worker wraps its copy of that socket in its own engine and
serves what surfaces. All engines accept from the one kernel accept queue,
so a worker that dies loses only the connections it was holding: the
connections still in the queue go to the other workers, and the parent
forks a replacement. With ``SO_REUSEPORT`` shards instead, the kernel puts
each new connection in one worker's own queue, and the connections queued
for a worker that dies are reset.

Why not one filter process handing ready connections over (as the gunicorn
integration does): an event-loop server already holds an idle connection
for the price of a socket and a small buffer, so the filter's job there is
only to keep idle clients from reaching the application; a hop through
another process would cost every request a wake-up and an ``SCM_RIGHTS``
message for that. gunicorn's sync workers cannot hold a connection at all,
which is why they keep the filter process.

The parent only supervises: it never accepts, never starts a thread, and
forwards SIGINT/SIGTERM to the workers as one SIGTERM each (the workers have
their own process group, so a terminal's Ctrl-C does not reach them twice;
under systemd use ``KillMode=mixed`` for the same reason). SIGHUP is passed
on as one SIGHUP to each worker, which reloads its filters in place the way a
single process does (held connections move to the new filters undecided; the
listen socket and the application are never closed, so no connection and no
request is lost). A SIGHUP that reaches a worker before its own handler is
in place is kept (:func:`take_early_hangup`), and the worker reloads as soon
as it can: its filters may have been built before the signal. A worker that exits by
itself within :data:`BOOT_GRACE` seconds of starting stops everything with its
exit status (a broken application would otherwise be forked forever); a
worker killed by a signal, or one that exits later, is logged and replaced.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .errors import AcceptFilterError

__all__ = ["BOOT_GRACE", "Role", "check_workers", "fork_workers", "take_early_hangup"]

#: A worker that exits sooner than this after it was forked failed to start.
BOOT_GRACE = 2.0
_PR_SET_PDEATHSIG = 1
#: Seconds the parent's idle hook runs between two checks on the workers.
_IDLE_STEP = 0.2


def check_workers(value: Any, option: str = "--workers") -> int:
    """A worker count from the command line; one line naming the problem otherwise."""
    try:
        count = int(value)
    except (TypeError, ValueError):
        raise AcceptFilterError(f"{option} must be a positive integer, not {value!r}") from None
    if count < 1 or str(value).strip() not in (str(count), f"+{count}"):
        raise AcceptFilterError(f"{option} must be a positive integer, not {value!r}")
    return count


@dataclass(frozen=True)
class Role:
    """What :func:`fork_workers` returned to this process: a worker (``index``) or the parent (``exit_code``)."""

    index: int | None
    exit_code: int = 0

    @property
    def is_worker(self) -> bool:
        return self.index is not None


def _die_with_parent() -> None:
    """Ask the kernel to SIGTERM this worker when the parent dies (even by SIGKILL)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
    except (OSError, AttributeError):
        pass


_early_hangup = False


def _keep_early_hangup(signum: int, frame: Any) -> None:
    global _early_hangup
    _early_hangup = True


def take_early_hangup() -> bool:
    """Whether a SIGHUP reached this worker before its reload handler was in place (and forget it).

    Call it right after installing that handler, and reload if it says so: the
    signal may have come after the filters were built (a plugin upgraded
    meanwhile), and a reload that changes nothing costs next to nothing. A
    SIGHUP ignored instead was lost: a worker still starting kept the old
    filters, and said nothing.
    """
    global _early_hangup
    seen, _early_hangup = _early_hangup, False
    return seen


def _child(index: int, parent: int) -> Role:
    # A process group of its own: a terminal's Ctrl-C reaches the parent only, which sends each worker
    # exactly one SIGTERM (two signals would cut a graceful stop short).
    # The parent's handlers first (a SIGHUP now would run its reload() here, on a copy of its children).
    signal.signal(signal.SIGHUP, _keep_early_hangup)  # until the worker's own reload handler is in place
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # a graceful stop: close() resolves held connections
    os.setpgid(0, 0)  # after the handlers: a process group of its own says they are in place
    _die_with_parent()
    if os.getppid() != parent:  # the parent died before prctl
        os._exit(1)
    return Role(index)


def fork_workers(count: int, *, label: str = "worker", idle: Callable[[float], None] | None = None) -> Role:
    """Fork ``count`` workers; in each, return its Role; in the parent, supervise until stopped.

    Call it after the listen socket exists and before any thread or event
    loop is started: the workers inherit the socket, nothing else running.
    ``idle(seconds)``, if given, runs in the parent between checks on the
    workers and returns within about ``seconds`` (the summed status line and
    the metrics endpoint of ``--workers``: the parent stays threadless).
    """
    parent = os.getpid()
    children: dict[int, tuple[int, float]] = {}
    stopping = False

    def spawn(index: int) -> Role | None:
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            return _child(index, parent)
        children[pid] = (index, time.monotonic())
        return None

    def stop(signum: int, frame: Any) -> None:
        nonlocal stopping
        stopping = True
        for pid in list(children):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    def reload(signum: int, frame: Any) -> None:
        # Each worker reloads itself (the default SIGHUP action would have killed the parent, and with it
        # every worker through PR_SET_PDEATHSIG).
        for pid in list(children):
            try:
                os.kill(pid, signal.SIGHUP)
            except ProcessLookupError:
                pass

    previous = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, reload)
    try:
        for index in range(count):
            role = spawn(index)
            if role is not None:
                return role
        exit_code = 0
        while children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG if idle is not None else 0)
            except ChildProcessError:
                break
            if pid == 0:  # idle is set, and no worker exited
                if idle is not None and not stopping:
                    idle(_IDLE_STEP)
                else:
                    time.sleep(_IDLE_STEP)  # stopping: the workers' last words, not the parent's status
                continue
            if pid not in children:
                continue
            index, started = children.pop(pid)
            code = os.waitstatus_to_exitcode(status)
            if stopping:
                continue
            if code >= 0 and time.monotonic() - started < BOOT_GRACE:  # exited by itself: a boot failure
                print(f"acceptfilter: {label} {index} (pid {pid}) failed to start (exit status {code}); stopping",
                      file=sys.stderr, flush=True)
                exit_code = code if code > 0 else 1
                stop(signal.SIGTERM, None)
                continue
            print(f"acceptfilter: {label} {index} (pid {pid}) exited (status {code}); starting another",
                  file=sys.stderr, flush=True)
            role = spawn(index)
            if role is not None:
                return role
        return Role(None, exit_code)
    finally:
        if os.getpid() == parent:
            for s, handler in previous.items():
                signal.signal(s, handler)
