"""The I/O cores' life and close semantics: wakers racing free(), and what close() promises.

scripts/sanitize.sh runs this file against the ASan/UBSan build of the C core (and CI runs that,
tests/test_reliability.py), where a waker that reaches a freed core is a heap-use-after-free report;
on the plain build the same race shows as a wake-up written into whatever descriptor took the freed
eventfd's number, which the stress test below watches for.
"""

from __future__ import annotations

import os
import socket
import threading

import pytest

from acceptfilter.engine import Engine
from acceptfilter.iocore import DATA, FULL, make_core
from acceptfilter.policy import Policy, Route
from acceptfilter.registry import load_chain

from .conftest import wait_for

ROUNDS = 150
WAKERS = 6


def _engine(core: str, sock: socket.socket) -> Engine:
    io = make_core(core, sock, max_bytes=1024, timeout=None, max_held=16)
    return Engine(io, (Route("r", load_chain("dataready")),), Policy(), lambda route, items: None)


def test_wakers_never_reach_a_freed_core(core: str) -> None:
    """Many threads wake the engine while another frees it: no waker touches the freed core or its
    closed eventfd (a wake-up after free is a no-op), round after round."""
    stray = 0
    for _ in range(ROUNDS):
        sock = socket.create_server(("127.0.0.1", 0))
        engine = _engine(core, sock)
        stop = threading.Event()
        started = threading.Barrier(WAKERS + 1)

        def wake_until_stopped(engine: Engine = engine, stop: threading.Event = stop,
                               started: threading.Barrier = started) -> None:
            started.wait()
            while not stop.is_set():
                engine.wake()

        wakers = [threading.Thread(target=wake_until_stopped) for _ in range(WAKERS)]
        for t in wakers:
            t.start()
        started.wait()
        engine.free()
        # The freed eventfd's number (and the epoll fd's) go to the next descriptors opened: a
        # waker still holding the freed core would write its wake-up into one of these.
        probes = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(4)]
        for _ in range(200):
            engine.wake()  # after free: nothing happens, from this thread too
        stop.set()
        for t in wakers:
            t.join()
        for fd in probes:
            try:
                stray += os.eventfd_read(fd)
            except BlockingIOError:
                pass
            os.close(fd)
        engine.free()  # idempotent
        sock.close()
    assert stray == 0, f"{stray} wake-up(s) were written into descriptors opened after free()"


@pytest.mark.parametrize("unread", [500, 3000])
def test_close_without_reset_is_a_clean_eof_however_much_is_unread(core: str, unread: int) -> None:
    """close(reset=False) promises a FIN: the client reads EOF, not a reset, also when it sent more
    than max_bytes (1024 here) that nobody read."""
    with socket.create_server(("127.0.0.1", 0)) as sock:
        io = make_core(core, sock, max_bytes=1024, timeout=None, max_held=16)
        try:
            client = socket.create_connection(sock.getsockname(), timeout=30)
            client.sendall(b"x" * unread)
            got: list[tuple[int, int, int]] = []

            def peeked() -> bool:
                got.extend((fd, kind, len(data)) for fd, kind, _err, data, _age in io.poll(0.05))
                return any(n >= min(unread, 1024) for _, _, n in got)

            wait_for(peeked, timeout=30)
            fd, kind, _ = got[-1]
            assert kind == (DATA if unread < 1024 else FULL)
            io.close(fd, reset=False)
            client.settimeout(30)
            assert client.recv(100) == b""  # a FIN; a reset raises ConnectionResetError here
            client.close()
        finally:
            io.free()
