"""The I/O core interface, and the C core behind it.

An I/O core owns the listening socket and every held connection. It accepts,
peeks and keeps deadlines; it knows no protocol. The engine drives it through
this small interface, so the C core (:class:`CCore`) and the pure-Python
reference (:class:`acceptfilter.pycore.PyCore`) are interchangeable.

``poll()`` returns a batch of events ``(fd, kind, err, data, age)``: ``data`` is
the whole peeked prefix, ``age`` the seconds since the connection was accepted.
A connection has at most one event per batch. After any event other than
:data:`DATA` the connection has left the core's wait set (it is *final*) and
the caller must :meth:`~IOCore.release` or :meth:`~IOCore.close` it; one still
unresolved at the next poll (the caller was interrupted) is reported again.

Both cores take their bounds from the caller clamped: ``max_bytes`` to
:data:`MAX_BYTES`, the deadline to :data:`~acceptfilter.policy.MAX_TIMEOUT`.
"""

from __future__ import annotations

import errno
import os
import socket
import threading
from typing import TYPE_CHECKING, Any, Literal, Protocol

from .events import (
    DATA,
    EOF,
    ERROR,
    EVICT,
    FULL,
    KIND_NAMES,
    MAX_BYTES,
    READY,
    SHUTDOWN,
    TIMEOUT,
    Address,
    Event,
    Ready,
)

if TYPE_CHECKING:
    from .matcher import Program

__all__ = [
    "DATA",
    "EOF",
    "ERROR",
    "EVICT",
    "FULL",
    "KIND_NAMES",
    "READY",
    "SHUTDOWN",
    "TIMEOUT",
    "Address",
    "CCore",
    "Event",
    "IOCore",
    "make_core",
]

CoreName = Literal["c", "python"]


class IOCore(Protocol):
    """What the engine needs from an I/O core."""

    def fileno(self) -> int:
        """A pollable fd, readable when :meth:`poll` has work (for event loops)."""

    def poll(self, timeout: float | None) -> list[Event]:
        """Accept, wait at most ``timeout`` seconds (None: until the next deadline), peek."""

    def next_timeout(self) -> float | None:
        """Seconds until the next deadline (0 if due), or None if there is none."""

    def release(self, fd: int, consume: int = 0) -> Address:
        """Hand a connection over (blocking, out of the wait set, ``consume`` bytes read off)."""

    def close(self, fd: int, reset: bool = False) -> None:
        """Close a held connection, with an RST if ``reset``."""

    def wake(self) -> None:
        """Make a concurrent or the next :meth:`poll` return promptly. Thread-safe."""

    def adopt(self, fd: int) -> None:
        """Hold a connection accepted elsewhere, as if just accepted (the core owns ``fd`` after)."""

    def stop_accepting(self) -> None:
        """Stop taking connections from the listen socket."""

    def drain(self) -> list[Event]:
        """SHUTDOWN events for every held connection (call until empty)."""

    def peer(self, fd: int) -> Address:
        """The peer address taken at accept (or adoption): still known after the peer reset."""

    def snapshot(self) -> None:
        """Copy the counters now (the engine does, under its lock, after each batch)."""

    def saved_stats(self) -> dict[str, Any]:
        """The counters last published (by :meth:`snapshot`, after every poll, and whenever the
        core queued a connection): accepted, accept_errors, fd_exhaustion, peeks, bytes_peeked,
        buffered, held, held_idle (of the held, those that sent nothing yet), paused; surfaced (by the core itself, no caller involved), fast (of
        those, certified at accept), surfaced_lost (put into a closed queue), surfaced_age
        (seconds, summed) and surfaced_hist. Safe from any thread."""

    def set_clock(self, now: float | None) -> None:
        """Tests: run deadlines on this clock (seconds); None: the real monotonic clock again."""

    def set_idle_timeout(self, timeout: float | None) -> None:
        """Seconds a connection that has sent nothing may be held (None or 0: no limit, the
        default); reported :data:`TIMEOUT` with no data. The ``timeout`` the core was made with
        counts from a connection's first byte."""

    def set_direct_wait(self, wait: float, backoff: float) -> None:
        """How long (seconds) a waiting :meth:`accept_ready` waits on the connection it just
        accepted, when that one has sent nothing yet, before it watches the listen queue and
        the other held connections again (0: never), and for how long it stops doing so after
        one sent nothing in that time. Defaults 1 ms and 100 ms (``AF_DIRECT_WAIT_US``)."""

    def set_matcher(self, program: Program | None) -> None:
        """Run this compiled readiness matcher on every peek (before the first connection).

        A connection it certifies is reported :data:`READY` (the filters' Python
        check is not run: the matcher is proven against it).
        """

    def set_ready_queue(self, queue: Any, buckets: tuple[float, ...]) -> None:
        """Put every connection the matcher certifies into ``queue`` (the route's ready
        queue, of this core's kind) instead of reporting it :data:`READY`: released, with
        a copy of its bytes, no event. ``buckets``: the time-to-surface histogram's upper
        bounds (seconds) for ``surfaced_hist``."""

    def accept_ready(self, timeout: float | None) -> tuple[list[Event], Ready | None]:
        """:meth:`poll` for a thread blocked in ``accept()``: accept first, and return the
        first connection the matcher certifies, at accept or while waiting, already released
        and counted (``surfaced``; ``fast`` if at accept), with no event. Otherwise exactly
        :meth:`poll`, and None."""

    def free(self) -> None:
        """Close every fd the core still owns (not the listen socket). Idempotent."""


def _check(rc: int, what: str) -> int:
    if rc < 0:
        raise OSError(-rc, f"{what}: {os.strerror(-rc)}")
    return rc


class CCore:
    """The C core: one ``af_poll`` call accepts, waits and peeks without the GIL."""

    def __init__(
        self,
        listen_sock: socket.socket,
        *,
        max_bytes: int,
        timeout: float | None,
        max_held: int,
        max_events: int = 512,
    ) -> None:
        try:
            from ._core import ffi, lib
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise ImportError(
                "the C core (acceptfilter._core) is not built: reinstall with `pip install .` "
                "(needs a C compiler and the Python headers), or use core='python'"
            ) from exc
        self._ffi = ffi
        self._lib = lib
        listen_sock.setblocking(False)  # the core drains the listen queue with accept4
        err = ffi.new("int *")
        timeout_ms = 0 if timeout is None else max(1, round(min(timeout * 1000, lib.AF_MAX_TIMEOUT_MS)))
        core = lib.af_new(listen_sock.fileno(), min(max(1, max_bytes), MAX_BYTES), timeout_ms,
                          min(max(0, max_held), 0xFFFFFFFF), max_events, err)
        if core == ffi.NULL:
            raise OSError(err[0], f"cannot start the C core: {os.strerror(err[0])}")
        self._core: Any = core
        self._events_out = ffi.new("af_event **")
        self._addr = ffi.new("af_addr *")
        self._last: dict[str, Any] | None = None  # the counters when freed
        self._queue: Any = None  # the ready queue the core puts into (kept alive with it)
        self._ready = ffi.new("af_ready *")
        self._program: Any = None  # the compiled matcher, kept alive as long as the core
        #: Held around every call that any thread may make (wake, the counters) and around
        #: free(): once free() has the lock and drops the pointer, no thread is in af_wake()
        #: and none can reach the freed core or write into its closed (maybe reused) eventfd.
        self._life = threading.Lock()

    def fileno(self) -> int:
        return int(self._lib.af_fileno(self._core))

    def poll(self, timeout: float | None) -> list[Event]:
        ms = -1 if timeout is None else max(0, int(timeout * 1000 + 0.999))
        n = self._lib.af_poll(self._core, ms, self._events_out)
        if n < 0:
            raise OSError(-n, f"af_poll: {os.strerror(-n)}")
        return self._collect(n)

    def accept_ready(self, timeout: float | None) -> tuple[list[Event], Ready | None]:
        # The fast path of accept(): as little Python as possible after the C call returns.
        ms = -1 if timeout is None else max(0, int(timeout * 1000 + 0.999))
        ready = self._ready
        n = self._lib.af_accept(self._core, ms, self._events_out, ready)
        events: list[Event] = []
        if n:
            if n < 0:
                raise OSError(-n, f"af_accept: {os.strerror(-n)}")
            events = self._collect(n)
        fd = ready.fd
        if fd < 0:
            return events, None
        ffi = self._ffi
        length = ready.len
        data = ffi.buffer(ready.data, length)[:] if length else b""
        return events, (fd, c_address(ffi, ready.addr), data, ready.consume, ready.age_us / 1e6)

    def set_matcher(self, program: Program | None) -> None:
        from .cmatcher import compile_program

        compiled = None if program is None else compile_program(program)
        _check(self._lib.af_set_matcher(self._core, self._ffi.NULL if compiled is None else compiled.ptr),
               "set matcher")
        self._program = compiled

    def set_ready_queue(self, queue: Any, buckets: tuple[float, ...]) -> None:
        bounds = [round(b * 1e6) for b in buckets]
        _check(self._lib.af_set_hist_bounds(self._core, bounds, len(bounds)), "histogram bounds")
        self._lib.af_set_queue(self._core, queue.ptr)
        self._queue = queue  # kept alive as long as the core

    def _collect(self, n: int) -> list[Event]:
        evs = self._events_out[0]
        buffer = self._ffi.buffer
        out: list[Event] = []
        for i in range(n):
            ev = evs[i]
            length = ev.len
            data = buffer(ev.data, length)[:] if length else b""
            out.append((ev.fd, ev.kind, ev.err, data, ev.age_us / 1e6))
        return out

    def next_timeout(self) -> float | None:
        ms = self._lib.af_next_timeout_ms(self._core)
        return None if ms < 0 else ms / 1000

    def release(self, fd: int, consume: int = 0) -> Address:
        _check(self._lib.af_release(self._core, fd, consume, self._addr), "release")
        return self._address(self._addr)

    def peer(self, fd: int) -> Address:
        _check(self._lib.af_peer(self._core, fd, self._addr), "peer")
        return self._address(self._addr)

    def _address(self, addr: Any) -> Address:
        return c_address(self._ffi, addr)

    def close(self, fd: int, reset: bool = False) -> None:
        rc = self._lib.af_close(self._core, fd, 1 if reset else 0)
        if rc < 0 and -rc != errno.ECONNRESET:
            _check(rc, "close")

    def wake(self) -> None:
        with self._life:  # any thread, any time: after free() a wake is a no-op
            if self._core is not None:
                self._lib.af_wake(self._core)

    def adopt(self, fd: int) -> None:
        _check(self._lib.af_adopt(self._core, fd), "adopt")

    def stop_accepting(self) -> None:
        _check(self._lib.af_stop_accepting(self._core), "stop accepting")

    def drain(self) -> list[Event]:
        return self._collect(self._lib.af_drain(self._core, self._events_out))

    def snapshot(self) -> None:
        with self._life:
            if self._core is not None:
                self._lib.af_publish_stats(self._core)

    def saved_stats(self) -> dict[str, Any]:
        if self._last is not None:
            return dict(self._last)
        s = self._ffi.new("af_stats *")
        with self._life:
            if self._core is None:
                return dict(self._last or {})
            self._lib.af_get_stats(self._core, s)
        return {
            "accepted": s.accepted,
            "accept_errors": s.accept_errors,
            "fd_exhaustion": s.fd_exhaustion,
            "peeks": s.peeks,
            "bytes_peeked": s.bytes_peeked,
            "buffered": s.buffered,
            "held": s.held,
            "held_idle": s.held_idle,
            "paused": s.paused,
            "surfaced": s.surfaced,
            "fast": s.fast,
            "direct_idle": s.direct_idle,
            "oldest_accepted": s.oldest_accepted_us / 1e6 if s.oldest_accepted_us >= 0 else None,
            "surfaced_lost": s.surfaced_lost,
            "surfaced_age": s.surfaced_age_us / 1e6,
            "surfaced_hist": list(s.surfaced_hist),
        }

    def set_clock(self, now: float | None) -> None:
        self._lib.af_set_clock(self._core, -1 if now is None else round(now * 1e6))

    def set_idle_timeout(self, timeout: float | None) -> None:
        ms = 0 if not timeout or timeout <= 0 else max(1, round(min(timeout * 1000, self._lib.AF_MAX_TIMEOUT_MS)))
        self._lib.af_set_idle_timeout(self._core, ms)

    def set_direct_wait(self, wait: float, backoff: float) -> None:
        def us(seconds: float) -> int:
            return min(max(0, round(seconds * 1e6)), 0xFFFFFFFF)

        self._lib.af_set_direct_wait(self._core, us(wait), us(backoff))

    def free(self) -> None:
        if self._core is None:
            return
        self.snapshot()
        last = self.saved_stats()
        with self._life:  # after this block no thread holds the pointer (see _life)
            core, self._core = self._core, None
            if core is None:
                return
            self._last = last  # saved_stats() keeps the last numbers
        self._lib.af_free(core)


_AF_INET, _AF_INET6 = int(socket.AF_INET), int(socket.AF_INET6)


def c_address(ffi: Any, addr: Any) -> Address:
    """An ``af_addr`` as ``socket.accept()`` would give the address."""
    family = addr.family
    if family == _AF_INET:
        return (ffi.string(addr.host).decode(), addr.port)
    if family == _AF_INET6:
        return (ffi.string(addr.host).decode(), addr.port, addr.flowinfo, addr.scope_id)
    return ""  # AF_UNIX peers are unnamed, as socket.accept() reports them


def make_core(name: CoreName | str, listen_sock: socket.socket, **kwargs: Any) -> IOCore:
    """Build the named core ("c" or "python") on ``listen_sock``."""
    if name == "c":
        return CCore(listen_sock, **kwargs)
    if name == "python":
        from .pycore import PyCore

        return PyCore(listen_sock, **kwargs)
    raise ValueError(f"unknown I/O core {name!r}: use 'c' (default) or 'python'")
