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
    """The client sends only once the accepting thread is inside a blocking engine call.

    That thread holds the step lock while it waits, so the background thread cannot
    take the connection: it must be surfaced by the thread that will serve it. (A
    connection that is ready *before* accept() is called may be taken by the
    background thread and queued; that is allowed and not what this test is about.)
    """
    listener = acceptfilter.wrap(socket.create_server(("127.0.0.1", 0)), "httpready", core=core)
    port = listener.getsockname()[1]
    me = threading.current_thread()
    blocking_calls = 0
    in_blocking_call = threading.Event()
    engine = listener.engine
    real_step = engine.step
    real_accept_ready = engine.accept_ready

    def note(timeout: float | None) -> None:
        nonlocal blocking_calls
        if threading.current_thread() is me and timeout != 0:
            blocking_calls += 1
            in_blocking_call.set()

    def step(timeout: float | None) -> int:
        note(timeout)
        return real_step(timeout)

    def accept_ready(timeout: float | None) -> object:  # the fast path: a step that may take one at accept
        note(timeout)
        return real_accept_ready(timeout)

    engine.step = step  # type: ignore[method-assign]
    engine.accept_ready = accept_ready  # type: ignore[method-assign,assignment]
    clients: list[socket.socket] = []

    def client(i: int) -> None:
        assert in_blocking_call.wait(30)
        c = socket.create_connection(("127.0.0.1", port))
        clients.append(c)
        c.sendall(b"GET /%d HTTP/1.1\r\nHost: x\r\n\r\n" % i)

    try:
        listener.settimeout(30)
        for i in range(10):
            in_blocking_call.clear()
            before = blocking_calls
            sender = threading.Thread(target=client, args=(i,))
            sender.start()
            conn, _ = listener.accept()
            sender.join(30)
            with conn:
                assert conn.recv(100).startswith(b"GET /%d " % i)
            assert blocking_calls > before, f"accept() #{i} did not wait in the engine in the calling thread"
    finally:
        for c in clients:
            c.close()
        listener.close()


def test_background_thread_takes_over_when_nobody_accepts() -> None:
    """Deadlines are kept while the application is away from accept()."""
    listener = acceptfilter.wrap(socket.create_server(("127.0.0.1", 0)), "httpready", timeout=0.3,
                                 idle_timeout=0.3, on_timeout="close")
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
