"""The pure-Python I/O core: the reference the C core is tested against.

Same behaviour as ``csrc/afcore.c`` with ``select.epoll`` and
``socket.recv(MSG_PEEK)``: edge-triggered, one event per connection per batch.
Held connections are idle (nothing sent: in accept order, which is the idle
deadline order, and counted by source address for eviction, as ``csrc/afsrc.c``
does) or partial (in first-byte order, which is the deadline order).
"""

from __future__ import annotations

import bisect
import contextlib
import errno
import os
import select
import socket
import struct
import threading
import time
from collections import OrderedDict
from typing import Any

from .events import DATA, EOF, ERROR, EVICT, FULL, MAX_BYTES, READY, SHUTDOWN, TIMEOUT, Address, Event, Ready
from .matcher import DONE, MORE, MatchState, Program
from .policy import MAX_TIMEOUT

__all__ = ["PyCore"]

_EXHAUSTION = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}
_PEEK = socket.MSG_PEEK | socket.MSG_DONTWAIT
_CONN_EVENTS = select.EPOLLIN | select.EPOLLPRI | select.EPOLLRDHUP | select.EPOLLET  # PRI: an urgent byte
#: SO_PEEK_OFF (asm-generic/socket.h; not in the socket module): peek from an offset (TCP: Linux 6.10+).
SO_PEEK_OFF = 42
#: SO_LINGER values: an RST if the process dies holding the connection; the default close (a FIN) again.
_ABORTIVE = struct.pack("ii", 1, 0)
_GRACEFUL = struct.pack("ii", 0, 0)
_BACKOFF_MIN, _BACKOFF_MAX = 0.01, 1.0
#: A waiting accept_ready() waits this long on the connection it just accepted, and no
#: longer waits so after one sent nothing in that time, for DIRECT_BACKOFF (seconds;
#: AF_DIRECT_WAIT_US and AF_DIRECT_BACKOFF_US in afcore.h).
DIRECT_WAIT, DIRECT_BACKOFF = 0.001, 0.1
#: close(reset=False) reads at most this much unread input first (AF_CLOSE_DRAIN): a FIN, not an RST.
CLOSE_DRAIN = 16 << 20


def oob_inline(sock: socket.socket) -> None:
    """SO_OOBINLINE: a TCP urgent byte is ordinary data (as afcore.c sets it), where a read or a
    splice would otherwise skip it or stop at it. Best effort (a socket that has no such thing)."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_OOBINLINE, 1)


class _Conn:
    __slots__ = ("abortive", "accepted_at", "addr", "armed", "data", "data_at", "eof", "final", "idle", "lowat", "match",
                 "nonblock", "sock", "state")

    def __init__(self, sock: socket.socket, addr: Address, now: float) -> None:
        self.sock = sock
        self.addr = addr
        self.accepted_at = now
        self.idle = True  # HELD with nothing sent yet (in the idle list)
        self.data_at = now  # its first byte: the deadline counts from here
        self.data = b""
        self.eof = False
        self.armed = False
        self.state = HELD
        self.final: tuple[int, int] = (0, 0)  # FINAL: the (kind, errno) it was reported with
        self.match: MatchState | None = None  # the matcher's state while it may still certify
        self.lowat = False  # SO_RCVLOWAT raised (reset before the socket is handed over)
        self.nonblock = False  # adopted with O_NONBLOCK (made blocking when handed over)
        self.abortive = False  # SO_LINGER {1, 0} while watched (cleared before it is handed over or closed)


#: A connection's states, as in the C core: HELD (idle or partial list) -> FINAL (reported) -> gone.
HELD, FINAL = "held", "final"


def _source(addr: Address) -> Any:
    """The source address of a peer (its host; one source for every UNIX peer), as afs_key()."""
    return addr[0] if isinstance(addr, tuple) and addr else ""


class _Sources:
    """Idle connections by source address, as ``csrc/afsrc.c``: the top is the source with the most,
    and among equals the one that reached that count first (each count keeps its sources in order)."""

    def __init__(self) -> None:
        self.fds: dict[Any, OrderedDict[int, None]] = {}  # each source's idle fds, oldest first
        self._buckets: dict[int, dict[Any, None]] = {}  # count -> sources, in the order they reached it
        self._top = 0

    def _move(self, key: Any, old: int, new: int) -> None:
        if old:
            bucket = self._buckets[old]
            del bucket[key]
            if not bucket:
                del self._buckets[old]
                if old == self._top:
                    self._top -= 1
        if new:
            self._buckets.setdefault(new, {})[key] = None
            self._top = max(self._top, new)

    def add(self, key: Any, fd: int) -> None:
        fds = self.fds.setdefault(key, OrderedDict())
        fds[fd] = None
        self._move(key, len(fds) - 1, len(fds))

    def remove(self, key: Any, fd: int) -> None:
        fds = self.fds[key]
        del fds[fd]
        self._move(key, len(fds) + 1, len(fds))
        if not fds:
            del self.fds[key]

    def victim(self) -> int | None:
        """The oldest idle connection of the source that holds the most, or None."""
        if not self._top:
            return None
        return next(iter(self.fds[next(iter(self._buckets[self._top]))]))


class PyCore:
    """select.epoll + recv(MSG_PEEK); see :class:`acceptfilter.iocore.IOCore`.

    The reference the C core is tested against: the same states (HELD in the
    FIFO, FINAL in the final list, reported again until resolved), the same
    eviction rule (undecided connections only) and the same clamps.
    """

    def __init__(
        self,
        listen_sock: socket.socket,
        *,
        max_bytes: int,
        timeout: float | None,
        max_held: int,
        max_events: int = 512,
    ) -> None:
        listen_sock.setblocking(False)
        oob_inline(listen_sock)  # inherited by every connection accepted from it
        self._lsock = listen_sock
        self._lfd = listen_sock.fileno()
        self._max_bytes = min(max(1, max_bytes), MAX_BYTES)
        self._timeout = min(timeout, MAX_TIMEOUT) if timeout and timeout > 0 else None
        self._max_held = max_held
        self._max_events = max(16, max_events)
        self._ep = select.epoll()
        self._wakefd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        #: As CCore._life: held by wake() and by free() around closing the wake fd, so that a
        #: wake-up never goes into a closed (maybe reused) descriptor; -1 once freed.
        self._life = threading.Lock()
        self._ep.register(self._lfd, select.EPOLLIN)
        self._ep.register(self._wakefd, select.EPOLLIN)
        self._idle_timeout: float | None = None  # set_idle_timeout(); None: no limit
        self._idle: OrderedDict[int, _Conn] = OrderedDict()  # HELD, nothing sent, in accept order
        self._sources = _Sources()  # the idle ones by source address
        self._fifo: OrderedDict[int, _Conn] = OrderedDict()  # HELD, partial, in first-byte order
        self._finals: OrderedDict[int, _Conn] = OrderedDict()  # FINAL: reported, not yet resolved
        self._owned: dict[int, _Conn] = {}  # HELD + FINAL
        self._pending: list[int] = []
        self._listening = True
        self._paused_until: float | None = None
        self._backoff = 0.0
        self._events: dict[int, tuple[int, int]] = {}  # this batch: fd -> (kind, errno)
        self._fresh_data = 0  # HELD connections with a DATA event in this batch
        self._fake_now: float | None = None
        self._program: Program | None = None
        self._fast: Ready | None = None  # during accept_ready(): the connection certified at accept
        self._fast_mode = False
        self._woken = False  # this poll read the wake fd
        self._direct_ok = False  # in a waiting accept_ready(): a byte-less connection may be waited on directly
        self._direct: int | None = None  # the one _accept_batch() left unarmed for _wait_direct()
        self._direct_resume = 0.0  # no direct waits before this (an idle client used up the last one)
        self._direct_wait, self._direct_backoff = DIRECT_WAIT, DIRECT_BACKOFF
        self._stats: dict[str, Any] = dict.fromkeys(
            ("accepted", "accept_errors", "fd_exhaustion", "peeks", "bytes_peeked", "surfaced", "fast", "surfaced_lost",
             "direct_idle"), 0)
        self._stats["surfaced_age"] = 0.0
        self._queue: Any = None  # the ready queue certified connections go into (set_ready_queue)
        self._buckets: tuple[float, ...] = ()
        self._stats["surfaced_hist"] = [0] * (len(self._buckets) + 1)
        self._buffered = 0  # peeked bytes kept for owned connections
        self._saved: dict[str, Any] = {}
        self.snapshot()

    def _now(self) -> float:
        return time.monotonic() if self._fake_now is None else self._fake_now

    # -- helpers ---------------------------------------------------------
    def _emit(self, fd: int, kind: int, err: int = 0) -> None:
        """Report an event; a final one moves the connection HELD -> FINAL."""
        conn = self._owned[fd]
        assert conn.state == HELD, f"event {kind} for a {conn.state} connection"
        prev = self._events.get(fd)
        if prev is not None and prev[0] != DATA:
            return  # already final in this batch
        if kind == DATA:
            if prev is None:
                self._fresh_data += 1
        elif prev is not None:
            self._fresh_data -= 1
        self._events[fd] = (kind, err)
        if kind != DATA:
            self._unlink_held(fd, conn)
            self._disarm(fd, conn)
            conn.state = FINAL
            conn.final = (kind, err)
            self._finals[fd] = conn

    def _report_finals(self) -> None:
        for fd, conn in self._finals.items():
            if len(self._events) >= self._max_events:
                break
            self._events[fd] = conn.final

    def _append_held(self, fd: int, conn: _Conn) -> None:
        if conn.idle:
            self._idle[fd] = conn
            self._sources.add(_source(conn.addr), fd)
        else:
            self._fifo[fd] = conn

    def _unlink_held(self, fd: int, conn: _Conn) -> None:
        if conn.idle:
            del self._idle[fd]
            self._sources.remove(_source(conn.addr), fd)
        else:
            del self._fifo[fd]

    def _held(self, fd: int) -> _Conn | None:
        conn = self._fifo.get(fd)
        return conn if conn is not None else self._idle.get(fd)

    def _to_partial(self, fd: int, conn: _Conn) -> None:
        """Idle -> partial: its first byte arrived, the deadline starts now."""
        if conn.state == HELD and conn.idle:
            self._unlink_held(fd, conn)
            conn.idle = False
            conn.data_at = self._now()
            self._append_held(fd, conn)

    def _disarm(self, fd: int, conn: _Conn) -> None:
        if conn.armed:
            self._ep.unregister(fd)
            conn.armed = False

    def _arm(self, fd: int, conn: _Conn) -> None:
        try:
            self._ep.register(fd, _CONN_EVENTS)
            conn.armed = True
        except OSError as exc:
            self._emit(fd, ERROR, exc.errno or errno.EIO)
            return
        if not conn.abortive:
            # If this process dies holding it, the kernel resets it, whether or not the client sent
            # bytes (one rule; see the C core's arm()). Best effort.
            try:
                conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _ABORTIVE)
                conn.abortive = True
            except OSError:
                pass

    @staticmethod
    def _clear_abortive(conn: _Conn) -> None:
        if conn.abortive:
            conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _GRACEFUL)
            conn.abortive = False

    def _forget(self, fd: int) -> _Conn:
        conn = self._owned.pop(fd)
        if conn.state == HELD:
            self._unlink_held(fd, conn)
        else:
            self._finals.pop(fd)
        self._buffered -= len(conn.data)
        self._disarm(fd, conn)
        return conn

    def _peek(self, fd: int, conn: _Conn, hup: bool, urgent: bool = False) -> tuple[int, int]:
        """(kind, errno): kind 0 when nothing final happened. ``urgent``: EPOLLPRI said a TCP
        urgent byte is pending (peek past its mark, as afcore.c's peek_past_mark)."""
        self._stats["peeks"] += 1
        try:
            data = conn.sock.recv(self._max_bytes, _PEEK)
        except (BlockingIOError, InterruptedError):
            data = None
        except OSError as exc:
            return ERROR, exc.errno or errno.EIO
        if data is not None:
            if not data:
                conn.eof = True
            elif len(data) > len(conn.data):
                self._stats["bytes_peeked"] += len(data) - len(conn.data)
                self._buffered += len(data) - len(conn.data)
                conn.data = data
                self._to_partial(fd, conn)
        if urgent and conn.data and not conn.eof:
            self._peek_past_mark(conn)
        if hup:
            conn.eof = True
        if conn.match is not None and conn.data:
            # Resumable, like afm_run: certain, or never certain (then Python decides).
            m = conn.match.run(conn.data)
            if m.status == DONE and m.consume <= len(conn.data):
                return READY, m.consume
            if m.status != MORE:
                conn.match = None
                self._set_lowat(conn, 1)
            elif m.need > 1 and not conn.eof:
                # The matcher knows how much more it needs: wake once that much is there.
                self._set_lowat(conn, min(len(conn.data) + m.need, self._max_bytes))
        if len(conn.data) >= self._max_bytes:
            return FULL, 0
        if conn.eof:
            return EOF, 0
        return 0, 0

    def _peek_past_mark(self, conn: _Conn) -> None:
        """A peek stops at a TCP urgent mark when bytes come before it (SO_OOBINLINE or not): peek on
        from the end of what is known with SO_PEEK_OFF, then switch the offset off again."""
        sock = conn.sock
        try:
            sock.setsockopt(socket.SOL_SOCKET, SO_PEEK_OFF, len(conn.data))
        except OSError:
            return  # an older kernel: the filter sees the bytes up to the mark
        try:
            while len(conn.data) < self._max_bytes:
                self._stats["peeks"] += 1
                more = sock.recv(self._max_bytes - len(conn.data), _PEEK)
                if not more:
                    conn.eof = True
                    break
                self._stats["bytes_peeked"] += len(more)
                self._buffered += len(more)
                conn.data += more
        except OSError:
            pass  # EAGAIN; an error shows at the next peek
        finally:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, SO_PEEK_OFF, -1)

    @staticmethod
    def _set_lowat(conn: _Conn, size: int) -> None:
        """SO_RCVLOWAT counts unread bytes, peeked ones included. Best effort, as in the C core."""
        if size <= 1 and not conn.lowat:
            return
        try:
            conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, size)
        except OSError:
            return
        conn.lowat = size > 1

    def _evict_one(self) -> bool:
        """Over max_held, as the C core's evict_one(): the oldest idle connection of the source
        that holds the most idle ones; only then the oldest partial one without fresh data in
        this batch. False when there is none."""
        victim = self._sources.victim()
        if victim is not None:
            self._emit(victim, EVICT)
            return True
        for fd in self._fifo:
            if fd not in self._events:
                self._emit(fd, EVICT)
                return True
        return False

    def _count_surfaced(self, age: float) -> None:
        """Surfaced by the core itself (the matcher certified it): no caller will count it."""
        st = self._stats
        st["surfaced"] += 1
        st["surfaced_age"] += age
        st["surfaced_hist"][bisect.bisect_left(self._buckets, age)] += 1

    def _settle(self, fd: int, kind: int, err: int) -> bool:
        """A final kind for a HELD connection, as the C core's settle(): READY goes to
        accept_ready()'s caller if it has none yet (True), else into the ready queue if there
        is one; otherwise it is reported, as any final kind."""
        handed = self._fast_mode and self._fast is None
        if kind == READY and (handed or self._queue is not None):
            conn = self._owned[fd]
            data, age = conn.data, max(0.0, self._now() - conn.accepted_at)
            try:
                addr = self.release(fd, err)
            except OSError as exc:
                self._emit(fd, ERROR, exc.errno or errno.EIO)
                return False
            self._count_surfaced(age)
            if handed:
                self._fast = (fd, addr, data, err, age)
                return True
            # Before the put: the application may take it and read the counters before this
            # batch ends, and must find it counted.
            self.snapshot()
            lost = self._queue.put_ready(fd, addr, data, err, age)
            if lost:
                self._stats["surfaced_lost"] += lost
                self.snapshot()
            return False
        self._emit(fd, kind, err)
        return False

    def _accept_batch(self, now: float) -> None:
        while (self._listening and self._paused_until is None and len(self._events) + 2 <= self._max_events
               and self._fast is None):
            try:
                sock, addr = self._lsock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue
            except OSError as exc:
                if exc.errno in _EXHAUSTION:
                    self._stats["fd_exhaustion"] += 1
                    self._backoff = min(_BACKOFF_MAX, self._backoff * 2 or _BACKOFF_MIN)
                    self._paused_until = now + self._backoff
                    self._ep.modify(self._lfd, 0)
                else:
                    self._stats["accept_errors"] += 1
                return
            self._backoff = 0.0
            self._stats["accepted"] += 1
            # Left blocking, as in the C core: every read here says MSG_DONTWAIT.
            if self._max_held and len(self._idle) + len(self._fifo) - self._fresh_data >= self._max_held:
                self._evict_one()
            fd = sock.fileno()
            conn = _Conn(sock, addr, now)
            if self._program is not None:
                conn.match = self._program.start()
            self._owned[fd] = conn
            self._append_held(fd, conn)
            kind, err = self._peek(fd, conn, False)
            if kind:
                if self._settle(fd, kind, err):
                    self._stats["fast"] += 1  # certified at accept: accept_ready() returns it now
                    return
            elif conn.data and conn.match is None:
                self._emit(fd, DATA)
                self._pending.append(fd)
            elif self._direct_ok and not conn.data and now >= self._direct_resume and self._direct_wait > 0:
                # As the C core: stop accepting and wait on this one (_wait_direct).
                self._direct = fd
                return
            else:
                self._arm(fd, conn)  # nothing yet, or the matcher still says MORE: no Python

    def _take_in(self, now: float, timeout: float | None) -> bool:
        """A waiting accept_ready(), as the C core's take_in(): _accept_batch(), then a direct
        wait on the byte-less connection it stopped at. True: the caller's wait is used up."""
        self._direct_ok = timeout is None or timeout > 0
        self._direct = None
        try:
            self._accept_batch(now)
        finally:
            self._direct_ok = False
        fd, self._direct = self._direct, None
        if fd is None:
            return False
        conn = self._owned[fd]
        if self._fast is not None or self._events:
            self._arm(fd, conn)
            return False
        self.snapshot()  # what was taken in is counted before the wait
        return self._wait_direct(fd, conn, timeout)

    def _wait_direct(self, fd: int, conn: _Conn, timeout: float | None) -> bool:
        """As the C core's wait_direct(): a poll on this connection and the wake fd alone, for
        at most DIRECT_WAIT (within the caller's wait and the next deadline); an idle client
        turns direct waits off for DIRECT_BACKOFF. True: the caller's wait is used up."""
        wait, bounded = self._direct_wait, False
        if timeout is not None and timeout <= wait:
            wait, bounded = timeout, True
        nxt = self._next_deadline()
        if nxt is not None and nxt - self._now() <= wait:
            wait, bounded = max(0.0, nxt - self._now()), True
        p = select.poll()
        p.register(fd, select.POLLIN | select.POLLPRI | select.POLLRDHUP)
        p.register(self._wakefd, select.POLLIN)
        ready = dict(p.poll(wait * 1000))
        flags = ready.get(fd, 0)
        if flags:
            epoll_flags = 0
            if flags & select.POLLERR:
                epoll_flags |= select.EPOLLERR
            if flags & (select.POLLHUP | select.POLLRDHUP):
                epoll_flags |= select.EPOLLRDHUP
            if flags & select.POLLPRI:
                epoll_flags |= select.EPOLLPRI
            self._on_readable(fd, epoll_flags)
        elif not ready and not bounded:
            self._stats["direct_idle"] += 1
            self._direct_resume = self._now() + self._direct_backoff
        if conn.state == HELD and not conn.armed and self._held(fd) is conn:
            self._arm(fd, conn)
        return not ready and bounded

    def _next_deadline(self) -> float | None:
        nxt = None
        if self._timeout is not None and self._fifo:
            nxt = next(iter(self._fifo.values())).data_at + self._timeout
        if self._idle_timeout is not None and self._idle:
            idle = next(iter(self._idle.values())).accepted_at + self._idle_timeout
            nxt = idle if nxt is None else min(nxt, idle)
        if self._paused_until is not None and (nxt is None or self._paused_until < nxt):
            nxt = self._paused_until
        return nxt

    def _collect(self, now: float) -> list[Event]:
        owned = self._owned
        out: list[Event] = [
            (fd, kind, err, owned[fd].data, max(0.0, now - owned[fd].accepted_at))
            for fd, (kind, err) in self._events.items()
        ]
        self._events = {}
        self._fresh_data = 0
        return out

    # -- the interface ---------------------------------------------------
    def fileno(self) -> int:
        return self._ep.fileno()

    def poll(self, timeout: float | None) -> list[Event]:
        # As af_poll: with no timeout, what the core settles alone (connections put into
        # the ready queue) is no reason to return; events, wake() and fd exhaustion are.
        while True:
            exhausted = self._stats["fd_exhaustion"]
            self._woken = False
            events = self._poll(timeout, False)
            if events or timeout is not None or self._woken or self._stats["fd_exhaustion"] != exhausted:
                return events

    def accept_ready(self, timeout: float | None) -> tuple[list[Event], Ready | None]:
        # As af_accept: a wait that saw nothing, or only settled connections into the ready
        # queue, waits again, for at most timeout in all (on the real clock).
        end = None if timeout is None else time.monotonic() + timeout
        wait = timeout
        while True:
            exhausted = self._stats["fd_exhaustion"]
            self._woken = False
            events = self._poll(wait, True)
            ready, self._fast = self._fast, None
            if (events or ready is not None or timeout == 0 or self._woken
                    or self._stats["fd_exhaustion"] != exhausted):
                return events, ready
            if end is not None:
                wait = end - time.monotonic()
                if wait <= 0:
                    return events, ready

    def set_ready_queue(self, queue: Any, buckets: tuple[float, ...]) -> None:
        self._queue = queue
        self._buckets = tuple(buckets)
        self._stats["surfaced_hist"] = [0] * (len(self._buckets) + 1)

    def set_matcher(self, program: Program | None) -> None:
        if self._stats["accepted"]:
            raise OSError(errno.EBUSY, "set matcher: only before the first connection")
        self._program = program

    def _poll(self, timeout: float | None, fast: bool) -> list[Event]:
        self._events = {}
        self._fresh_data = 0
        self._fast = None
        self._fast_mode = fast
        try:
            return self._poll_once(timeout, fast)
        finally:
            self._fast_mode = False
            self.snapshot()  # published after every poll, as the C core does

    def _poll_once(self, timeout: float | None, fast: bool) -> list[Event]:
        self._report_finals()
        for fd in self._pending:
            conn = self._held(fd)
            if conn is not None and not conn.armed:
                self._arm(fd, conn)
        self._pending = []
        while (self._max_held and len(self._idle) + len(self._fifo) > self._max_held
               and len(self._events) + 2 <= self._max_events):
            if not self._evict_one():
                break
        now = self._now()
        if self._paused_until is not None and now >= self._paused_until:
            self._paused_until = None
            if self._listening:
                self._ep.modify(self._lfd, select.EPOLLIN)
        waited_out = False
        if fast and not self._events and not self._fifo and not self._idle:
            # A thread waiting in accept(), nothing held: the listen queue first; what was taken
            # in is published before the wait (stats() must not lag behind it), and the wait hands
            # over the first connection the matcher certifies. With connections held, the epoll
            # wait looks at them and the listen queue together (as the C core: no starving).
            waited_out = self._take_in(now, timeout)
            if self._fast is not None or self._events:
                return self._finish(self._now())
            self.snapshot()
            now = self._now()
        wait = 0.0 if waited_out else -1.0 if timeout is None else timeout
        nxt = self._next_deadline()
        if nxt is not None and (wait < 0 or nxt - now < wait):
            wait = max(0.0, nxt - now)
        if self._events:
            wait = 0.0
        room = max(1, (self._max_events - len(self._events)) // 2)
        try:
            ready = self._ep.poll(wait, room)
        except InterruptedError:
            ready = []
        now = self._now()
        want_accept = False
        for fd, flags in ready:
            if fd == self._lfd:
                want_accept = True
            elif fd == self._wakefd:
                self._woken = True
                try:
                    os.eventfd_read(self._wakefd)
                except BlockingIOError:
                    pass
            else:
                self._on_readable(fd, flags)
        if want_accept:
            if fast:
                self._take_in(now, timeout)
                now = self._now()
            else:
                self._accept_batch(now)
        return self._finish(now)

    def _finish(self, now: float) -> list[Event]:
        if self._timeout is not None:
            while self._fifo and len(self._events) < self._max_events:
                fd, conn = next(iter(self._fifo.items()))
                if conn.data_at + self._timeout > now:
                    break
                self._emit(fd, TIMEOUT)
        if self._idle_timeout is not None:
            while self._idle and len(self._events) < self._max_events:
                fd, conn = next(iter(self._idle.items()))
                if conn.accepted_at + self._idle_timeout > now:
                    break
                self._emit(fd, TIMEOUT)
        return self._collect(now)

    def _on_readable(self, fd: int, flags: int) -> None:
        conn = self._held(fd)
        if conn is None:
            return
        if flags & select.EPOLLERR:  # reset while held, whatever it sent before (a FIN has no EPOLLERR)
            err = conn.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            self._emit(fd, ERROR, err or errno.ECONNRESET)
            return
        before = len(conn.data)
        kind, err = self._peek(fd, conn, bool(flags & (select.EPOLLRDHUP | select.EPOLLHUP)), bool(flags & select.EPOLLPRI))
        if kind:
            self._settle(fd, kind, err)
        elif len(conn.data) != before and conn.match is None:
            self._emit(fd, DATA)  # while the matcher says MORE, arrivals wake no Python

    def next_timeout(self) -> float | None:
        if self._finals:
            return 0.0  # unresolved finals: report them again now
        nxt = self._next_deadline()
        return None if nxt is None else max(0.0, nxt - self._now())

    def release(self, fd: int, consume: int = 0) -> Address:
        conn = self._owned.get(fd)
        if conn is None:
            raise OSError(errno.EBADF, "release: not a held connection")
        self._disarm(fd, conn)
        while consume > 0:
            try:
                chunk = conn.sock.recv(min(consume, 65536), socket.MSG_DONTWAIT)
            except InterruptedError:
                continue
            if not chunk:
                raise OSError(errno.EPIPE, "release: connection closed while consuming")
            consume -= len(chunk)
        if conn.nonblock:
            conn.sock.setblocking(True)
        if conn.lowat:  # the application's socket: the default low-water mark again
            conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)
        self._clear_abortive(conn)
        self._forget(fd)
        conn.sock.detach()
        return conn.addr

    def peer(self, fd: int) -> Address:
        conn = self._owned.get(fd)
        if conn is None:
            raise OSError(errno.EBADF, "peer: not a held connection")
        return conn.addr

    def close(self, fd: int, reset: bool = False) -> None:
        if fd not in self._owned:
            raise OSError(errno.EBADF, "close: not a held connection")
        conn = self._forget(fd)
        try:
            if reset:
                conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            else:
                if conn.data or not conn.eof:
                    # Closing with unread data sends an RST; read everything there (not just
                    # max_bytes: the client may have sent more), up to CLOSE_DRAIN, so "close" is a FIN.
                    left = CLOSE_DRAIN
                    try:
                        while left > 0 and (got := len(conn.sock.recv(min(left, 16384), socket.MSG_DONTWAIT))):
                            left -= got
                    except OSError:
                        pass
                self._clear_abortive(conn)
        except OSError:
            pass
        conn.sock.close()

    def wake(self) -> None:
        with self._life:  # any thread, any time: after free() a wake is a no-op
            if self._wakefd < 0:
                return
            try:
                os.eventfd_write(self._wakefd, 1)
            except OSError:
                pass

    def adopt(self, fd: int) -> None:
        if fd in self._owned:
            raise OSError(errno.EEXIST, "adopt: already held")
        sock = socket.socket(fileno=fd)  # checks it is a socket
        try:
            addr = sock.getpeername()  # and a connected one
        except OSError:
            sock.detach()  # still the caller's
            raise
        self._stats["accepted"] += 1  # taken in, so the accounting still adds up
        conn = _Conn(sock, addr, self._now())
        conn.nonblock = not os.get_blocking(fd)  # left as it is; made blocking when released
        oob_inline(sock)
        self._owned[fd] = conn
        self._append_held(fd, conn)
        self._pending.append(fd)  # armed, and so peeked, by the next poll(); evicted there if over the bound

    def stop_accepting(self) -> None:
        if self._listening:
            self._listening = False
            self._ep.unregister(self._lfd)

    def drain(self) -> list[Event]:
        self._events = {}
        self._fresh_data = 0
        self._report_finals()
        now = self._now()
        while (self._idle or self._fifo) and len(self._events) < self._max_events:
            fd, conn = next(iter((self._idle or self._fifo).items()))
            if not conn.eof:
                self._peek(fd, conn, False)
            self._emit(fd, SHUTDOWN)
        return self._collect(now)

    def snapshot(self) -> None:
        self._saved = {**self._stats, "surfaced_hist": list(self._stats["surfaced_hist"]), "buffered": self._buffered,
                       "held": len(self._owned), "held_idle": len(self._idle), "paused": int(self._paused_until is not None),
                       "oldest_accepted": self._oldest_accepted()}

    def _oldest_accepted(self) -> float | None:
        """When the oldest held connection was accepted: the older of the two heads, as the C core does."""
        heads = [next(iter(held.values())).accepted_at for held in (self._idle, self._fifo) if held]
        return min(heads) if heads else None

    def saved_stats(self) -> dict[str, Any]:
        return dict(self._saved)

    def set_clock(self, now: float | None) -> None:
        self._fake_now = now

    def set_idle_timeout(self, timeout: float | None) -> None:
        self._idle_timeout = min(timeout, MAX_TIMEOUT) if timeout and timeout > 0 else None

    def set_direct_wait(self, wait: float, backoff: float) -> None:
        self._direct_wait, self._direct_backoff = max(0.0, wait), max(0.0, backoff)
        self._direct_resume = 0.0

    def free(self) -> None:
        self.snapshot()
        for conn in self._owned.values():
            conn.sock.close()
        self._owned.clear()
        self._fifo.clear()
        self._idle.clear()
        self._sources = _Sources()
        self._finals.clear()
        if not self._ep.closed:
            self._ep.close()
            with self._life:
                wakefd, self._wakefd = self._wakefd, -1
            os.close(wakefd)
