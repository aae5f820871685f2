"""Ready queues: the connections of one route waiting for the application's ``accept()``.

Two producers fill a route's queue: the engine, with the connections the
Python filters accepted (:meth:`put_many`, each with its
:class:`~acceptfilter.engine.ConnectionInfo`), and the I/O core itself, with
the connections its compiled matcher certified (no event, no Python: their
info is parsed on first use from a copy of their bytes, by ``make_info``).

The queue's :meth:`fileno` (an eventfd) is readable exactly while the queue is
non-empty or closed: written when the queue goes from empty to non-empty, read
when a take empties it, both under the queue's lock. Under load, while the queue
stays non-empty, neither side makes a system call per connection (the old
design wrote and read an eventfd token for every connection).

:class:`CReadyQueue` is the C queue (``csrc/afqueue.c``) the C core puts into
without the GIL; :class:`PyReadyQueue` is its pure-Python mirror, which the
Python core puts into. Both close what they hold when closed, and what is put
after (counted as lost); their eventfd outlives :meth:`~PyReadyQueue.close`
(waiters wake and see ``closed``) and goes with :meth:`~PyReadyQueue.free`,
once no thread polls it.
"""

from __future__ import annotations

import errno
import itertools
import os
import select
import threading
from collections import deque
from typing import TYPE_CHECKING, Any, Protocol

from .events import Address
from .iocore import c_address

if TYPE_CHECKING:
    from .engine import ConnectionInfo, Surfaced

__all__ = ["CReadyQueue", "InfoFactory", "PyReadyQueue", "ReadyQueue", "make_queue"]


class InfoFactory(Protocol):
    def __call__(self, raw: bytes, consume: int, held_for: float, addr: Address) -> ConnectionInfo: ...


def _closed_error() -> OSError:
    return OSError(errno.EBADF, os.strerror(errno.EBADF))


def _no_info(raw: bytes, consume: int, held_for: float, addr: Address) -> ConnectionInfo:
    raise RuntimeError("a core-certified connection reached a queue with no make_info")


class _Waiting:
    """The eventfd's lifetime: it stays open while a thread polls it (closing it would
    not wake the poll, and its number could be reused); the last waiter closes it
    after :meth:`free`. Shared by both queues."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiters = 0
        self._freed = False
        self.closed = False
        #: What builds the info of a connection the core certified (the engine's ready_info).
        self.make_info: InfoFactory = _no_info

    def _efd(self) -> int:
        raise NotImplementedError

    def _release_efd(self) -> None:
        raise NotImplementedError

    def wait(self, timeout: float | None) -> bool:
        """Wait until an entry may be there (or the queue closed); False on timeout."""
        with self._lock:
            if self._freed or self.closed:
                raise _closed_error()
            self._waiters += 1
            efd = self._efd()
        try:
            poller = select.poll()
            poller.register(efd, select.POLLIN)
            ms = None if timeout is None else max(0, int(timeout * 1000 + 0.999))
            return bool(poller.poll(ms))
        finally:
            with self._lock:
                self._waiters -= 1
                if self._freed and not self._waiters:
                    self._release_efd()

    def free(self) -> None:
        """Release the eventfd (after close(), once nothing can put into the queue). Idempotent."""
        with self._lock:
            self.closed = True
            if not self._freed:
                self._freed = True
                if not self._waiters:
                    self._release_efd()


class PyReadyQueue(_Waiting):
    """The reference queue (the Python core's): a deque and a level eventfd under one lock."""

    def __init__(self) -> None:
        super().__init__()
        # Surfaced (fd, addr, info) from the engine, or (fd, addr, raw, consume, held_for) from the core.
        self._items: deque[tuple[Any, ...]] = deque()
        self._fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.lost = 0

    def _efd(self) -> int:
        return self._fd

    def _release_efd(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def fileno(self) -> int:
        return -1 if self.closed else self._fd

    def _put(self, entries: list[tuple[Any, ...]]) -> int:
        with self._lock:
            if self.closed:
                for entry in entries:
                    os.close(entry[0])
                self.lost += len(entries)
                return len(entries)
            was_empty = not self._items
            self._items.extend(entries)
            if was_empty and entries:
                os.eventfd_write(self._fd, 1)  # empty -> non-empty: the one write
            return 0

    def put_many(self, items: list[Surfaced]) -> int:
        """Queue what the engine surfaced; returns how many were closed because the queue is closed."""
        return self._put(list(items))

    def put_ready(self, fd: int, addr: Address, raw: bytes, consume: int, held_for: float) -> int:
        """The core's put (a connection its matcher certified, released); 1 if closed at once."""
        return self._put([(fd, addr, raw, consume, held_for)])

    def get_nowait(self) -> Surfaced:
        """The oldest entry; BlockingIOError when empty, OSError(EBADF) when closed."""
        with self._lock:
            if self.closed:
                raise _closed_error()
            if not self._items:
                raise BlockingIOError(errno.EAGAIN, "no connection is ready")
            entry = self._items.popleft()
            if not self._items:
                try:
                    os.eventfd_read(self._fd)  # non-empty -> empty: the one read
                except BlockingIOError:
                    pass
        if len(entry) == 3:
            return entry
        fd, addr, raw, consume, held_for = entry
        return fd, addr, self.make_info(raw, consume, held_for, addr)

    def __len__(self) -> int:
        return len(self._items)

    def __bool__(self) -> bool:
        return bool(self._items)

    def close(self) -> int:
        """Close every queued connection; wake blocked acceptors. Returns how many were closed."""
        with self._lock:
            if self.closed:
                return 0
            self.closed = True
            if self._fd >= 0:
                os.eventfd_write(self._fd, 1)  # readable for good: every waiter sees `closed`
            count = 0
            while self._items:
                os.close(self._items.popleft()[0])
                count += 1
            return count


class CReadyQueue(_Waiting):
    """The C queue (``csrc/afqueue.c``): the C core puts certified connections into it without
    the GIL; the engine's entries carry a ticket naming their ConnectionInfo, kept here."""

    def __init__(self) -> None:
        super().__init__()
        from ._core import ffi, lib

        self._ffi = ffi
        self._lib = lib
        err = ffi.new("int *")
        q = lib.afq_new(err)
        if q == ffi.NULL:
            raise OSError(err[0], f"cannot make a ready queue: {os.strerror(err[0])}")
        self.ptr: Any = q
        self._fd = int(lib.afq_fileno(q))
        #: The item count, kept up to date by the C queue in our memory: len() makes no call.
        self._count = ffi.new("uint32_t *")
        lib.afq_mirror_count(q, self._count)
        self._entries: dict[int, Surfaced] = {}  # the engine's entries, by ticket
        self._tickets = itertools.count(1)
        self._item = ffi.new("afq_item *")  # for puts (under the GIL, from the engine's thread)
        self._local = threading.local()  # takes may come from several threads at once

    def _efd(self) -> int:
        return self._fd

    def _release_efd(self) -> None:
        if self.ptr is not None:
            self._lib.afq_free(self.ptr)
            self.ptr = None
            self._fd = -1
            self._entries.clear()

    def fileno(self) -> int:
        return -1 if self.closed else self._fd

    @property
    def lost(self) -> int:
        with self._lock:
            return 0 if self.ptr is None else int(self._lib.afq_lost(self.ptr))

    def put_many(self, items: list[Surfaced]) -> int:
        lost = 0
        with self._lock:  # one item struct; and free() cannot run meanwhile
            if self.ptr is None:
                for fd, _, _ in items:
                    os.close(fd)
                return len(items)
            item = self._item
            for entry in items:
                fd = entry[0]
                ticket = next(self._tickets)
                self._entries[ticket] = entry  # before the put: a taker finds it
                item.fd = fd
                item.ticket = ticket
                item.len = 0
                item.data = self._ffi.NULL
                rc = self._lib.afq_put(self.ptr, item)
                if rc != 0:
                    del self._entries[ticket]
                    if rc < 0:
                        os.close(fd)
                    lost += 1
        return lost

    def get_nowait(self) -> Surfaced:
        local = self._local
        out = getattr(local, "item", None)
        if out is None:
            out = local.item = self._ffi.new("afq_item *")
        with self._lock:  # free() cannot run meanwhile
            rc = -1 if self.ptr is None else self._lib.afq_take(self.ptr, out)
        if rc == 0:
            raise BlockingIOError(errno.EAGAIN, "no connection is ready")
        if rc < 0:
            raise _closed_error()
        if out.ticket:
            entry = self._entries.pop(out.ticket, None)
            if entry is None:  # taken as the queue was freed (closed): nobody will serve it
                os.close(out.fd)
                raise _closed_error()
            return entry
        length = out.len
        raw = self._ffi.buffer(out.data, length)[:] if length else b""
        self._lib.afq_item_clear(out)
        addr = c_address(self._ffi, out.addr)
        return out.fd, addr, self.make_info(raw, out.consume, out.age_us / 1e6, addr)

    def __len__(self) -> int:
        return int(self._count[0])  # a hint between two takes, exact when nobody is taking

    def __bool__(self) -> bool:
        return int(self._count[0]) > 0

    def close(self) -> int:
        with self._lock:
            if self.closed or self.ptr is None:
                self.closed = True
                return 0
            self.closed = True
            return int(self._lib.afq_close(self.ptr))  # entries taken just before may still be popped


ReadyQueue = PyReadyQueue | CReadyQueue


def make_queue(core: str) -> ReadyQueue:
    """The queue that goes with the named core: C with C, Python with Python."""
    return CReadyQueue() if core == "c" else PyReadyQueue()
