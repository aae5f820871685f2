"""The asyncio driver: runs an engine on the event loop, with no thread.

A reader on the core's fd (readable when the core has work) plus a
``call_at`` timer for the next deadline; each wake-up steps the engine until
a poll finds nothing, yielding to the loop after :data:`MAX_ROUNDS` rounds.
"""

from __future__ import annotations

import asyncio
import logging
import threading

from ..engine import Engine

__all__ = ["MAX_ROUNDS", "AsyncioDriver"]

log = logging.getLogger("acceptfilter")

#: Poll rounds per wake-up before yielding to the loop's other callbacks.
MAX_ROUNDS = 64

class AsyncioDriver:
    """Runs ``engine.step(0)`` from the loop whenever the core's fd is readable or a deadline is due."""

    def __init__(self, engine: Engine, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.engine = engine
        self.loop = loop or asyncio.get_running_loop()
        self._fd = engine.fileno()
        self._timer: asyncio.TimerHandle | None = None
        self._soon: asyncio.Handle | None = None
        self._stopped = False
        self.loop.add_reader(self._fd, self._run)
        # Connections already in the listen queue: the epoll fd may not be readable for them yet.
        self._soon = self.loop.call_soon(self._run)

    def _run(self) -> None:
        if self._stopped:
            return
        self._cancel_timers()
        step = self.engine.step
        try:
            for _ in range(MAX_ROUNDS):
                # The C core arms connections peeked at accept time at the start of
                # the next poll: always finish with a poll that found nothing.
                if step(0) == 0:
                    break
            else:
                self._soon = self.loop.call_soon(self._run)  # busy: let the loop breathe
                return
        except Exception:
            log.exception("acceptfilter: engine step failed; retrying in 50 ms")
            self._timer = self.loop.call_later(0.05, self._run)
            return
        delay = self.engine.next_timeout()
        if delay is not None:
            self._timer = self.loop.call_at(self.loop.time() + delay, self._run)

    def _cancel_timers(self) -> None:
        for handle in (self._timer, self._soon):
            if handle is not None:
                handle.cancel()
        self._timer = self._soon = None

    def _detach(self) -> None:
        self._cancel_timers()
        if not self.loop.is_closed():
            self.loop.remove_reader(self._fd)

    def stop(self) -> None:
        """Detach from the loop (from any thread; waits for the loop thread if it is running). Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        if self.loop.is_closed():
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self.loop or not self.loop.is_running():
            self._detach()
            return
        done = threading.Event()

        def detach() -> None:
            try:
                self._detach()
            finally:
                done.set()

        self.loop.call_soon_threadsafe(detach)
        if not done.wait(5):
            log.error("acceptfilter: the event loop did not detach the driver within 5 s")
