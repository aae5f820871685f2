"""pytest plugin for running the docs' ```python blocks (pytest-markdown-docs) as a reader would paste them.

Loaded by tests/test_docs.py with ``-p tests.doc_snippets`` next to ``--markdown-docs``. A snippet that
ends by itself is run as it is. A snippet that starts a server and serves forever is served the way a
reader would try it, then stopped the way a reader would stop it:

* the ports it names are kept (a reader copies them), but a bind to a fixed TCP port binds a free one
  instead, so the documented 8000 or 8080 never clashes with anything else on the machine;
* once the snippet listens on a new TCP port, a watchdog thread sends it ``GET / HTTP/1.0`` and reads
  the answer, then presses Ctrl-C (SIGINT to this process);
* the snippet passes when it raised nothing but that KeyboardInterrupt (or returned) and the answer it
  gave was HTTP. A snippet that raises anything else, or serves no HTTP answer, fails with it.

Snippets for servers that do not speak HTTP (a Redis relay, DNS) are fragments here (``python notest``);
tests of their own run them against the real service.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Generator, Iterator
from typing import Any

import pytest

#: How long a snippet may take to start listening, and its server to answer the probe.
STARTUP_LIMIT = 60.0
ANSWER_LIMIT = 30.0
#: How long a snippet whose listener closed the probe unanswered may take to end by itself.
SELF_END_LIMIT = 15.0


def _listening() -> dict[int, tuple[str, int]]:
    """This process's listening TCP sockets: inode -> (address to connect to, port)."""
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/self/fd/{fd}")
            if target.startswith("socket:["):
                inodes.add(int(target[8:-1]))
    found: dict[int, tuple[str, int]] = {}
    for table, loopback in (("/proc/net/tcp", "127.0.0.1"), ("/proc/net/tcp6", "::1")):
        with contextlib.suppress(OSError), open(table) as f:
            next(f)
            for line in f:
                fields = line.split()
                if fields[3] == "0A" and int(fields[9]) in inodes:  # TCP_LISTEN
                    found[int(fields[9])] = (loopback, int(fields[1].rsplit(":", 1)[1], 16))
    return found


class Watchdog(threading.Thread):
    """Probe the first server the snippet starts, then press Ctrl-C."""

    def __init__(self, snippet_file: str) -> None:
        super().__init__(name="doc-snippet-watchdog", daemon=True)
        self.snippet_file = snippet_file
        self.baseline = set(_listening())
        self.lock = threading.Lock()
        self.running = True
        self.interrupted = False
        self.answer = b""
        self.probed: tuple[str, int] | None = None

    def run(self) -> None:
        deadline = time.monotonic() + STARTUP_LIMIT
        while time.monotonic() < deadline:
            with self.lock:
                if not self.running:
                    return
            new = {k: v for k, v in _listening().items() if k not in self.baseline}
            if new:
                self.probed = min(new.values(), key=lambda a: a[1])
                self.answer = self.probe(*self.probed)
                break
            time.sleep(0.05)
        if not self.answer:
            # No answer at all: either a server that closed the probe unanswered, or a snippet that
            # listens only for a moment and closes its listener itself (which ends the probe too).
            # The second kind is ending on its own: give it time to, rather than interrupting it.
            grace = time.monotonic() + SELF_END_LIMIT
            while time.monotonic() < grace and self.snippet_running():
                with self.lock:
                    if not self.running:
                        return
                time.sleep(0.05)
        with self.lock:
            if self.running and self.snippet_running():
                self.interrupted = True
                os.kill(os.getpid(), signal.SIGINT)

    def snippet_running(self) -> bool:
        """Is the main thread still inside the snippet's code (not past it, freeing its objects)?"""
        frame = sys._current_frames().get(threading.main_thread().ident or 0)
        while frame is not None:
            if frame.f_code.co_filename == self.snippet_file:
                return True
            frame = frame.f_back
        return False

    @staticmethod
    def probe(host: str, port: int) -> bytes:
        answer = b""
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=ANSWER_LIMIT) as conn:
            conn.sendall(b"GET / HTTP/1.0\r\nHost: localhost\r\n\r\n")
            while chunk := conn.recv(65536):
                answer += chunk
        return answer

    def stop(self) -> None:
        with self.lock:
            self.running = False


@contextlib.contextmanager
def any_free_port() -> Iterator[None]:
    """socket.bind((host, 8000)) binds (host, 0): a free port, found again by the watchdog."""
    original = socket.socket.bind

    def bind(self: socket.socket, address: Any) -> None:
        if self.family in (socket.AF_INET, socket.AF_INET6) and isinstance(address, tuple) and address[1]:
            address = (address[0], 0, *address[2:])
        original(self, address)

    socket.socket.bind = bind  # type: ignore[method-assign]
    try:
        yield
    finally:
        socket.socket.bind = original  # type: ignore[method-assign]


def is_ctrl_c(exc: BaseException) -> bool:
    """KeyboardInterrupt, or a group of nothing else (trio raises it from its nursery)."""
    if isinstance(exc, BaseExceptionGroup):
        return exc.split(KeyboardInterrupt)[1] is None
    return isinstance(exc, KeyboardInterrupt)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Any:
    if item.get_closest_marker("markdown-docs") is None:
        return (yield)
    watchdog = Watchdog(str(item.path))
    # Ctrl-C in a reader's terminal raises KeyboardInterrupt. A runner started in the background by a shell
    # without job control inherits SIGINT ignored, and Python then installs no handler: the watchdog's
    # Ctrl-C would do nothing and the snippet would serve until the outer timeout.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return (yield from _run_snippet(watchdog))
    finally:
        signal.signal(signal.SIGINT, previous)


def _run_snippet(watchdog: Watchdog) -> Generator[None, Any, Any]:
    with any_free_port():
        watchdog.start()
        try:
            result = yield
        except BaseException as exc:
            if not (watchdog.interrupted and is_ctrl_c(exc)):
                raise
            result = None
        finally:
            try:
                watchdog.stop()
                time.sleep(0.01)  # a Ctrl-C sent just before stop() is delivered here, not later
            except KeyboardInterrupt:
                pass
    if watchdog.interrupted:
        watchdog.join(ANSWER_LIMIT)
        assert watchdog.answer.startswith(b"HTTP/"), (
            f"the snippet's server on {watchdog.probed} did not answer GET / with HTTP: {watchdog.answer[:200]!r}")
    return result
