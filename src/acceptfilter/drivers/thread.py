"""Drivers run the engine. This one is a background thread for sync servers.

The C core's ``af_poll`` releases the GIL while it waits, accepts and peeks,
so the thread costs the application's threads nothing while connections sit
idle. (The asyncio driver, with no thread, is in :mod:`.asyncio`.)

An application thread blocked in ``FilteredListener.accept()`` steps the engine
itself (:meth:`ThreadDriver.step_inline`): the connection it is waiting for is
then accepted, peeked, decided and surfaced in the thread that will serve it,
with no hand-off between two threads (two wake-ups and two GIL transfers per
connection). The background thread stands down while an application thread
does this and takes over again once no thread has stepped inline for
:data:`INLINE_GRACE` seconds, so deadlines, evictions and servers that wait on
``fileno()`` with a selector are served as before.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable

from ..engine import Engine, Surfaced

__all__ = ["INLINE_GRACE", "ThreadDriver"]

log = logging.getLogger("acceptfilter")

#: Seconds the background thread waits after the last inline step before it
#: drives the engine again (while the application serves a connection).
INLINE_GRACE = 0.05


def raised_by_signal_handler(exc: BaseException) -> bool:
    """Whether ``exc`` comes from a Python signal handler that ran during an engine step.

    The core waits in C; when a signal interrupts the wait, Python runs the handler as the
    call returns, inside the engine's frames. What the handler raises is the application's
    (a server's own ``raise Shutdown`` on SIGTERM) and must leave ``accept()`` as it would
    leave ``socket.accept()``, not be logged and retried as an engine failure.
    """
    handlers = set()
    for signum in signal.valid_signals():
        try:
            handler = signal.getsignal(signum)
        except (OSError, ValueError):
            continue
        code = getattr(handler, "__code__", None)
        if code is not None:
            handlers.add(code)
    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code in handlers:
            return True
        tb = tb.tb_next
    return False


class ThreadDriver:
    """Calls ``engine.step()`` in a daemon thread until :meth:`stop`; see the module docstring."""

    def __init__(self, engine: Engine, *, name: str = "acceptfilter-engine") -> None:
        self.engine = engine
        self._stopping = False
        self._step_lock = threading.Lock()  # one engine step at a time, in whichever thread
        self._cond = threading.Condition(threading.Lock())
        self._inline = 0  # application threads stepping (or about to step) inline
        self._last_inline = -INLINE_GRACE
        self._polling = False  # the background thread is in (or entering) a step
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        step = self.engine.step
        cond = self._cond
        while True:
            with cond:
                while not self._stopping:
                    idle = time.monotonic() - self._last_inline
                    if self._inline == 0 and idle >= INLINE_GRACE:
                        break
                    cond.wait(INLINE_GRACE if self._inline else INLINE_GRACE - idle)
                if self._stopping:
                    return
                self._polling = True
            try:
                with self._step_lock:
                    # Checked again under the lock: a thread in accept() may have held
                    # it for a whole wait (try_accept) while this one was queued for it.
                    if (not self._stopping and self._inline == 0
                            and time.monotonic() - self._last_inline >= INLINE_GRACE):
                        step(None)
            except Exception:
                # Never die silently and never spin: log, pause, carry on.
                log.exception("acceptfilter: engine step failed; retrying in 50 ms")
                time.sleep(0.05)
            finally:
                with cond:
                    self._polling = False

    def step_inline(self, timeout: float | None, queued: Callable[[], int] | None = None) -> bool:
        """Step the engine in the calling thread, waiting at most ``timeout`` seconds (None: until
        something happens), unless ``queued()`` says a connection is already waiting (another
        thread's step surfaced it). Returns False once the driver is stopping (do not retry)."""
        return self._inline_step(timeout, queued, take=False) is not False

    def try_accept(self, timeout: float | None) -> Surfaced | None:
        """The fast path, for a thread entering ``accept()`` with nothing queued: if nobody
        else is in the core, one C call that waits up to ``timeout`` seconds (None: for as
        long as it takes) and returns the first connection the core's matcher certifies,
        at accept or while it waits, handling whatever else happens as a step would.
        None: nothing came (a wake, a signal, the timeout, another thread in the core, an
        event for Python); use the queue and the other paths.

        Unlike :meth:`accept_inline` it counts no inline thread: a wait here only keeps
        the background thread standing down (it checks the time of the last inline step
        again once it has the lock), so a server that is always back in ``accept()``
        within :data:`INLINE_GRACE` pays for no condition variable per connection."""
        lock = self._step_lock
        if not lock.acquire(False):
            return None
        # The background thread cannot step while this one holds the lock, and checks the
        # time of the last inline step again once it has it: setting it on the way out is enough.
        try:
            if self._stopping:
                return None
            return self.engine.accept_ready(timeout)
        except Exception as exc:
            if raised_by_signal_handler(exc):
                raise
            log.exception("acceptfilter: engine step failed")
            return None
        finally:
            self._last_inline = time.monotonic()
            lock.release()

    def accept_inline(self, timeout: float | None, queued: Callable[[], int] | None = None) -> Surfaced | bool:
        """Like :meth:`step_inline`, but a connection the core's matcher certifies at accept comes
        straight back (one C call, no filter run, nothing queued): the fast path of ``accept()``.
        Returns it, True when the caller should look at its queue again, False once stopping."""
        return self._inline_step(timeout, queued, take=True)

    def _inline_step(self, timeout: float | None, queued: Callable[[], int] | None, *, take: bool) -> Surfaced | bool:
        with self._cond:
            if self._stopping:
                return False
            self._inline += 1
            if self._polling:
                self.engine.wake()  # get the background thread out of its wait
        try:
            if not self._step_lock.acquire(timeout=-1 if timeout is None else max(0.0, timeout)):
                return True
            try:
                if self._stopping:
                    return False
                if queued is None or not queued():
                    try:
                        if take:
                            got = self.engine.accept_ready(timeout)
                            if got is not None:
                                return got
                        else:
                            self.engine.step(timeout)
                    except Exception as exc:
                        # As in the background thread: accept() never raises an engine failure
                        # (what a signal handler raises is not one).
                        if raised_by_signal_handler(exc):
                            raise
                        log.exception("acceptfilter: engine step failed; retrying in 50 ms")
                        time.sleep(0.05)
            finally:
                self._step_lock.release()
        finally:
            with self._cond:
                self._inline -= 1
                self._last_inline = time.monotonic()
        return True

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the thread (it finishes the batch it is handling) and any inline step. Idempotent."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self.engine.wake()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.error("acceptfilter: the engine thread did not stop within %.0f s", timeout)
        # An application thread may be stepping inline: wait for its step to end
        # (the wake above ends its wait); after this nobody steps again.
        if self._step_lock.acquire(timeout=timeout):
            self._step_lock.release()
        else:
            log.error("acceptfilter: an inline engine step did not end within %.0f s", timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()
