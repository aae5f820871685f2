"""SIGINT, SIGTERM and SIGHUP for ``acceptfilter serve``, as events the main thread waits on."""

from __future__ import annotations

import signal
import threading
from typing import Any


class Signals:
    """SIGINT, SIGTERM and SIGHUP as events for the main thread, caught from the very start.

    Installed before anything is bound, so a SIGTERM that comes while the server is
    still starting is a clean stop too, not a default death (exit 143, no word).
    """

    WATCHED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def __init__(self) -> None:
        self.wake = threading.Event()
        self.pending: list[int] = []
        self._previous: dict[signal.Signals, Any] = {}

    def __enter__(self) -> Signals:
        if threading.current_thread() is threading.main_thread():
            for sig in self.WATCHED:
                self._previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.pending.append(signum)
        self.wake.set()

    def post(self, signum: int) -> None:
        self._on_signal(signum, None)

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
