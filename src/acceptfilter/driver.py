"""Drivers run the engine. This one is a background thread for sync servers.

The C core's ``af_poll`` releases the GIL while it waits, accepts and peeks,
so the thread costs the application's threads nothing while connections sit
idle. (The asyncio driver, with no thread, is in ``integrations/asyncio.py``.)
"""

from __future__ import annotations

import logging
import threading
import time

from .engine import Engine

__all__ = ["ThreadDriver"]

log = logging.getLogger("acceptfilter")


class ThreadDriver:
    """Calls ``engine.step()`` in a daemon thread until :meth:`stop`."""

    def __init__(self, engine: Engine, *, name: str = "acceptfilter-engine") -> None:
        self.engine = engine
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        step = self.engine.step
        while not self._stopping:
            try:
                step(None)
            except Exception:
                # Never die silently and never spin: log, pause, carry on.
                log.exception("acceptfilter: engine step failed; retrying in 50 ms")
                time.sleep(0.05)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the thread (it finishes the batch it is handling). Idempotent."""
        self._stopping = True
        self.engine.core.wake()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.error("acceptfilter: the engine thread did not stop within %.0f s", timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()
