"""The ready queue: what the core certifies reaches accept() with no Python and no system call each.

Unit tests of both queues (the C one and its Python mirror) on real socket
pairs, then the whole path: connections the background thread's core certifies
after accept go straight into the queue (no READY event, no filter run), with
exact counters, lazy info and nothing lost at close.
"""

from __future__ import annotations

import os
import select
import selectors
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

import acceptfilter
from acceptfilter.engine import ConnectionInfo, unaccounted
from acceptfilter.readyqueue import CReadyQueue, PyReadyQueue, ReadyQueue, make_queue

from .conftest import open_fds, wait_for
from .test_fast_path import HEAD, CountingHttp


@pytest.fixture
def queue(core: str) -> Iterator[ReadyQueue]:
    q = make_queue(core)
    assert isinstance(q, CReadyQueue if core == "c" else PyReadyQueue)
    yield q
    q.close()
    q.free()


def _entries(n: int) -> tuple[list[tuple[int, Any, ConnectionInfo]], list[socket.socket]]:
    """n entries as the engine queues them (one end of a socket pair each) and the other ends."""
    entries, peers = [], []
    for i in range(n):
        a, b = socket.socketpair()
        peers.append(b)
        entries.append((a.detach(), ("192.0.2.1", 1000 + i), ConnectionInfo("default", {"i": i}, "ready", 0.0)))
    return entries, peers


def _readable(fd: int) -> bool:
    return bool(select.select([fd], [], [], 0)[0])


def _counter(fd: int) -> int:
    """The eventfd's value (read, then written back: the test looks without changing it)."""
    value = os.eventfd_read(fd)
    os.eventfd_write(fd, value)
    return value


def test_a_non_empty_queue_costs_one_signal_not_one_per_connection(queue: ReadyQueue) -> None:
    entries, peers = _entries(50)
    assert not _readable(queue.fileno())
    queue.put_many(entries[:1])
    for entry in entries[1:]:
        queue.put_many([entry])  # one at a time, as connections are decided
    assert len(queue) == 50
    # 50 connections, one write: the eventfd was signalled when the queue became non-empty.
    assert _counter(queue.fileno()) == 1
    for i in range(49):
        fd, addr, info = queue.get_nowait()
        assert info["i"] == i and addr == ("192.0.2.1", 1000 + i)  # FIFO, the engine's own entries
        os.close(fd)
        assert _readable(queue.fileno()), "readable while anything is queued"
    fd, _, info = queue.get_nowait()
    os.close(fd)
    assert not _readable(queue.fileno()), "cleared by the take that emptied it"
    with pytest.raises(BlockingIOError):
        queue.get_nowait()
    for p in peers:
        p.close()


def test_closing_closes_what_is_queued_and_what_comes_after(queue: ReadyQueue) -> None:
    entries, peers = _entries(4)
    queue.put_many(entries[:3])
    assert queue.close() == 3
    for p in peers[:3]:
        p.settimeout(10)
        assert p.recv(1) == b""  # closed: the peer sees EOF
    assert queue.put_many(entries[3:]) == 1 and queue.lost == 1
    peers[3].settimeout(10)
    assert peers[3].recv(1) == b""
    with pytest.raises(OSError):
        queue.get_nowait()
    assert queue.close() == 0  # idempotent
    for p in peers:
        p.close()


def test_a_waiter_wakes_when_something_is_queued_and_when_closed(queue: ReadyQueue) -> None:
    woke: list[bool] = []
    t = threading.Thread(target=lambda: woke.append(queue.wait(30)))
    t.start()
    entries, peers = _entries(1)
    time.sleep(0.05)
    queue.put_many(entries)
    t.join(30)
    assert woke == [True]
    os.close(queue.get_nowait()[0])
    assert not queue.wait(0)
    t = threading.Thread(target=lambda: woke.append(queue.wait(30)))
    t.start()
    time.sleep(0.05)
    queue.close()
    t.join(30)
    assert woke == [True, True] and not t.is_alive()
    peers[0].close()


def test_free_waits_for_the_last_waiter(core: str) -> None:
    q = make_queue(core)
    efd = q.fileno()
    started = threading.Event()

    def waiter() -> None:
        started.set()
        q.wait(30)

    t = threading.Thread(target=waiter)
    t.start()
    started.wait(10)
    time.sleep(0.05)
    q.close()
    q.free()  # a thread may still be polling the eventfd: it closes it on its way out
    t.join(30)
    assert not t.is_alive()
    assert not _is_eventfd(efd), "the last waiter did not close the eventfd"
    with pytest.raises(OSError):
        q.get_nowait()


def _is_eventfd(fd: int) -> bool:
    try:
        return os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[eventfd]"
    except OSError:
        return False


def _late_senders(port: int, n: int) -> list[socket.socket]:
    """n clients that connect first and send their request later: certified after accept."""
    return [socket.create_connection(("127.0.0.1", port)) for _ in range(n)]


def test_certified_after_accept_goes_straight_to_the_queue(listen_sock: socket.socket, core: str) -> None:
    """A selector-based server: nobody in accept(), the background thread polls. The request
    arrives after accept; the core certifies it and queues it itself: no READY event, no filter."""
    CountingHttp.checks = 0
    lst = acceptfilter.wrap(listen_sock, CountingHttp(), core=core)
    try:
        port = lst.getsockname()[1]
        clients = _late_senders(port, 20)
        wait_for(lambda: lst.stats()["held"] == 20, timeout=30)
        time.sleep(0.02)  # held_for is measurable
        for c in clients:
            c.sendall(HEAD)
        sel = selectors.DefaultSelector()
        sel.register(lst, selectors.EVENT_READ)
        lst.setblocking(False)
        got = []
        while len(got) < 20:
            assert sel.select(30), "the queue's fd never became readable"
            try:
                got.append(lst.accept_with_info())
            except BlockingIOError:
                continue
        assert CountingHttp.checks == 0, "the filter ran for connections the core certified"
        stats = lst.stats()
        assert stats["surfaced_by_core"] == 20 and stats["surfaced"] == 20 and stats["surfaced_at_accept"] == 0
        assert stats["surfaced_by_reason"] == {"ready": 20} and stats["surfaced_by_route"] == {"default": 20}
        assert stats["time_to_surface"]["count"] == 20 and stats["time_to_surface"]["sum"] >= 20 * 0.02
        assert unaccounted(stats) == 0 and stats["held"] == 0
        addrs = {c.getsockname() for c in clients}
        for conn, addr, info in got:
            with conn:
                assert addr in addrs and info.peer == addr
                assert info.reason == "ready" and info.held_for >= 0.02 and not info.parsed
                assert conn.recv(4096) == HEAD  # every byte still there
                assert info["target"] == "/fast" and info.parsed  # parsed on request
        for c in clients:
            c.close()
    finally:
        lst.close()


def test_counters_include_a_connection_as_soon_as_accept_returns_it(listen_sock: socket.socket, core: str) -> None:
    """The core publishes its counters when it queues a connection: an application that takes it
    and looks at stats() at once never sees fewer surfaced than it took."""
    lst = acceptfilter.wrap(listen_sock, CountingHttp(), core=core)
    try:
        port = lst.getsockname()[1]
        sel = selectors.DefaultSelector()
        sel.register(lst, selectors.EVENT_READ)
        lst.setblocking(False)
        taken = 0
        for _ in range(60):
            with socket.create_connection(("127.0.0.1", port)) as client:
                wait_for(lambda n=taken: lst.stats()["accepted"] > n, timeout=30)
                client.sendall(HEAD)
                while True:
                    assert sel.select(30)
                    try:
                        conn, _ = lst.accept()
                        break
                    except BlockingIOError:
                        continue
                taken += 1
                stats = lst.stats()
                assert stats["surfaced"] >= taken and unaccounted(stats) == 0, stats
                conn.close()
    finally:
        lst.close()


def test_closing_with_core_queued_connections_loses_nothing(listen_sock: socket.socket, core: str) -> None:
    lst = acceptfilter.wrap(listen_sock, CountingHttp(), core=core)
    port = lst.getsockname()[1]
    before = open_fds()
    clients = _late_senders(port, 10)
    wait_for(lambda: lst.stats()["held"] == 10, timeout=30)
    for c in clients:
        c.sendall(HEAD)
    wait_for(lambda: len(lst._queue) == 10, timeout=30)  # queued by the core, never taken
    stats = lst.stats()
    assert stats["surfaced_by_core"] == 10 and unaccounted(stats) == 0
    engine = lst.engine
    lst.close()
    final = engine.stats()
    assert final["unclaimed"] == 10 and unaccounted(final) == 0
    for c in clients:
        c.settimeout(10)
        try:
            assert c.recv(1) == b""  # closed by the queue
        except ConnectionResetError:
            pass  # closed with its request unread: the kernel resets, as close() on any socket would
        c.close()
    wait_for(lambda: open_fds() <= before, timeout=10)
