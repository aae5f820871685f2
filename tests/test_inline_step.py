"""A thread blocked in FilteredListener.accept() steps the engine itself (no hand-off per connection)."""

from __future__ import annotations

import socket
import threading
import time

import pytest

import acceptfilter
from acceptfilter.drivers import INLINE_GRACE


@pytest.mark.parametrize("core", ["c", "python"])
def test_blocking_accept_surfaces_in_the_calling_thread(core: str) -> None:
    listener = acceptfilter.wrap(socket.create_server(("127.0.0.1", 0)), "httpready", core=core)
    port = listener.getsockname()[1]
    stepped_in: list[str] = []
    engine = listener.engine
    real_step = engine.step

    def step(timeout: float | None) -> int:
        stepped_in.append(threading.current_thread().name)
        return real_step(timeout)

    real_accept_ready = engine.accept_ready

    def accept_ready(timeout: float | None) -> object:  # the fast path: a step that may take one at accept
        stepped_in.append(threading.current_thread().name)
        return real_accept_ready(timeout)

    engine.step = step  # type: ignore[method-assign]
    engine.accept_ready = accept_ready  # type: ignore[method-assign,assignment]
    try:
        for i in range(10):
            with socket.create_connection(("127.0.0.1", port)) as c:
                c.sendall(b"GET /%d HTTP/1.1\r\nHost: x\r\n\r\n" % i)
                conn, _ = listener.accept()
                with conn:
                    assert conn.recv(100).startswith(b"GET /%d " % i)
        assert threading.current_thread().name in stepped_in
    finally:
        listener.close()


def test_background_thread_takes_over_when_nobody_accepts() -> None:
    """Deadlines are kept while the application is away from accept()."""
    listener = acceptfilter.wrap(socket.create_server(("127.0.0.1", 0)), "httpready", timeout=0.3,
                                 on_timeout="close")
    port = listener.getsockname()[1]
    try:
        listener.settimeout(0.05)
        with pytest.raises(TimeoutError):
            listener.accept()  # an inline step; then nobody accepts
        idle = socket.create_connection(("127.0.0.1", port))
        idle.settimeout(5)
        t0 = time.monotonic()
        assert idle.recv(1) == b""  # closed by the deadline policy, with no thread in accept()
        assert time.monotonic() - t0 < 0.3 + INLINE_GRACE + 2
        idle.close()
        assert listener.stats()["dropped"] == 1
    finally:
        listener.close()
