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


def _peek_offset_supported() -> bool:
    """SO_PEEK_OFF on TCP (Linux 6.10+): what lets a peek go past an urgent mark."""
    with socket.create_server(("127.0.0.1", 0)) as srv, socket.create_connection(srv.getsockname()) as c:
        conn, _ = srv.accept()
        with conn:
            try:
                conn.setsockopt(socket.SOL_SOCKET, 42, 0)  # SO_PEEK_OFF
            except OSError:
                return False
    return c is not None


needs_peek_offset = pytest.mark.skipif(not _peek_offset_supported(),
                                       reason="this kernel has no SO_PEEK_OFF for TCP (Linux 6.10+)")


def _send_urgent(client: socket.socket, before: bytes, urgent: bytes, after: bytes) -> None:
    client.sendall(before)
    client.send(urgent, socket.MSG_OOB)
    client.sendall(after)


@needs_peek_offset
def test_a_peek_sees_the_bytes_after_an_urgent_byte(core: str) -> None:
    """Issue 24 item 3: a peek stops at the urgent mark, so the core saw b"AB" of b"AB" + urgent b"C"
    + b"DEF" for ever; it now sees all six bytes, and the application reads them all, C in place."""
    with socket.create_server(("127.0.0.1", 0)) as sock:
        io = make_core(core, sock, max_bytes=1024, timeout=None, max_held=16)
        try:
            client = socket.create_connection(sock.getsockname(), timeout=30)
            client.sendall(b"AB")
            seen: dict[int, bytes] = {}

            def peeked(want: bytes) -> bool:
                seen.update((fd, data) for fd, _kind, _err, data, _age in io.poll(0.05))
                return want in seen.values()

            wait_for(lambda: peeked(b"AB"), timeout=30)
            _send_urgent(client, b"", b"C", b"DEF")
            wait_for(lambda: peeked(b"ABCDEF"), timeout=10)
            (fd,) = seen
            io.release(fd)
            with socket.socket(fileno=fd) as conn:
                conn.settimeout(30)
                client.shutdown(socket.SHUT_WR)
                got = b""
                while chunk := conn.recv(100):
                    got += chunk
                assert got == b"ABCDEF"  # SO_OOBINLINE: the urgent byte is ordinary data, in place
            client.close()
        finally:
            io.free()


@needs_peek_offset
def test_httpready_sees_a_head_completed_after_an_urgent_byte(core: str) -> None:
    """Through the filters: the head's last bytes come after an urgent byte (the urgent one is its
    final CR); the filter sees them and surfaces the connection at once, not at its deadline."""
    import acceptfilter

    with socket.create_server(("127.0.0.1", 0)) as sock:
        listener = acceptfilter.wrap(sock, "httpready", timeout=60, core=core)
        try:
            client = socket.create_connection(sock.getsockname()[:2], timeout=30)
            _send_urgent(client, b"GET /urgent HTTP/1.1\r\nHost: x\r\n", b"\r", b"\n")
            listener.settimeout(20)  # well inside the 60 s deadline
            conn, _ = listener.accept()
            with conn:
                conn.settimeout(30)
                head = b""
                while not head.endswith(b"\r\n\r\n"):
                    head += conn.recv(100)
                assert head == b"GET /urgent HTTP/1.1\r\nHost: x\r\n\r\n"
            client.close()
        finally:
            listener.close()
