"""The thread that keeps every engine's stats file (:mod:`.statsfile`) up to date.

One daemon thread per process, started with the first engine, rewrites each
registered engine's file every :data:`INTERVAL` seconds
(``ACCEPTFILTER_STATS_INTERVAL``). Why a thread and not the stepping thread
after each batch: an engine holding idle connections gets no events and can
sleep in ``epoll_wait`` for minutes, and the fast path surfaces connections with
no batch at all; a batch-driven writer would leave the held count and the
oldest held age stale exactly when an operator looks. The snapshot takes the
engine's stats lock for the few microseconds a ``stats()`` call takes, the same
as the status line; the file write itself happens outside it.

An engine that an asyncio loop drives (``driver="asyncio"``) is refreshed by a
timer on that loop instead, and starts no thread: "no thread" stays true of the
async integrations.

A forked child starts with no registrations (``os.register_at_fork``): the
parent's files are the parent's to update and remove.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import os
import socket
import sys
import threading
from collections.abc import Callable
from typing import Any

from .statsfile import StatsWriter

__all__ = ["INTERVAL", "Publication", "publish"]

log = logging.getLogger("acceptfilter")


def _interval() -> float:
    try:
        value = float(os.environ.get("ACCEPTFILTER_STATS_INTERVAL", "0.5"))
    except ValueError:
        return 0.5
    return value if value > 0 else 0.5


#: Seconds between two rewrites of a stats file (read at each round: tests set it after import).
INTERVAL = _interval()

_lock = threading.Lock()
_registered: dict[int, Publication] = {}
_thread: threading.Thread | None = None
_thread_stop = threading.Event()  #: set to end the current thread


class Publication:
    """One engine's file and the callable that gives its stats; :meth:`close` removes the file."""

    def __init__(self, writer: StatsWriter, source: Callable[[], dict[str, Any]],
                 loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.writer = writer
        self.source = source
        self.closed = False
        #: The loop whose timer refreshes this file (None: the process's publishing thread does).
        self.loop = loop
        self._timer: asyncio.TimerHandle | None = None

    def _tick(self) -> None:
        """On the loop: rewrite the file, then come back in one interval."""
        if self.closed or self.loop is None or self.loop.is_closed():
            return
        self.write()
        self._timer = self.loop.call_later(_interval(), self._tick)

    def write(self) -> None:
        try:
            stats = self.source()
        except Exception:  # closing under us: the next round (or close) settles it
            return
        self.writer.write(stats)

    def move_to(self, loop: asyncio.AbstractEventLoop) -> None:
        """Refresh from now on by a timer on ``loop`` (the engine's new driver), not the thread.

        Called on that loop. The thread stops once no file needs it.
        """
        with _lock:
            if self.closed or self.loop is not None:
                return
            self.loop = loop
            self._timer = loop.call_later(_interval(), self._tick)
        _stop_thread_if_unused()

    def close(self) -> None:
        with _lock:
            if self.closed:
                return
            self.closed = True
            _registered.pop(id(self), None)
        _stop_thread_if_unused()
        timer, self._timer = self._timer, None
        if timer is not None and self.loop is not None:
            try:
                running = asyncio.get_running_loop()
            except RuntimeError:
                running = None
            if running is self.loop:
                timer.cancel()  # from another thread the closed flag stops the next tick instead
        self.writer.close()


def _label() -> str:
    """What runs this engine, for the reader: the program (``python -m X``: X) and its arguments, shortened."""
    program = os.path.basename(sys.argv[0] if sys.argv and sys.argv[0] else sys.executable)
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if program == "__main__.py" and spec is not None:
        program = spec.name.removesuffix(".__main__").removesuffix(".cli")  # acceptfilter.cli -> acceptfilter
    return " ".join([program, *sys.argv[1:]])[:64]


def publish(sock: socket.socket, source: Callable[[], dict[str, Any]],
            loop: asyncio.AbstractEventLoop | None = None) -> Publication | None:
    """Start publishing ``source()`` for the listener ``sock``; None where it cannot (a UNIX socket, no directory).

    With ``loop`` (the loop that drives the engine) the file is refreshed by a timer on it, with no thread.

    Publishing is an aid, never a reason for a server not to start: a runtime
    directory that cannot be written is one warning.
    """
    if sock.family not in (socket.AF_INET, socket.AF_INET6) or os.environ.get("ACCEPTFILTER_STATS") == "off":
        return None
    try:
        writer = StatsWriter(sock, _label())
    except OSError as exc:
        log.warning("acceptfilter: no stats file for `acceptfilter stats` (%s)", exc)
        return None
    publication = Publication(writer, source, loop)
    publication.write()
    global _thread, _thread_stop
    with _lock:
        _registered[id(publication)] = publication  # atexit removes its file either way
        if loop is not None:
            publication._timer = loop.call_later(_interval(), publication._tick)
        elif _thread is None:
            _thread_stop = threading.Event()
            _thread = threading.Thread(target=_run, args=(_thread_stop,), name="acceptfilter-stats", daemon=True)
            _thread.start()
    return publication


def _stop_thread_if_unused() -> None:
    """End the publishing thread when no registered file is refreshed by it (the process may have none)."""
    global _thread
    with _lock:
        if _thread is None or any(p.loop is None for p in _registered.values()):
            return
        thread, _thread = _thread, None
        _thread_stop.set()
    if thread is not threading.current_thread():
        thread.join(5)


def _run(stop: threading.Event) -> None:
    while not stop.wait(_interval()):
        with _lock:
            publications = list(_registered.values())
        for publication in publications:
            if not publication.closed and publication.loop is None:
                publication.write()


def _after_fork_in_child() -> None:
    global _thread, _lock
    _lock = threading.Lock()  # another thread may have held it at the fork
    _registered.clear()  # the parent's engines are not this process's to publish or remove
    _thread = None


@atexit.register
def _remove_all() -> None:
    """Files of engines the program never closed go with the process (a kill -9 leaves them: readers clean up)."""
    with _lock:
        publications = list(_registered.values())
    for publication in publications:
        publication.close()


os.register_at_fork(after_in_child=_after_fork_in_child)
