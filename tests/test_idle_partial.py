"""Idle is not slow (issue 23): two states with two budgets, 408 at the partial deadline, eviction by source.

Engines are driven by hand (``driver="none"``) on an injected clock (``set_clock``),
on both I/O cores: the 620 s idle limit is tested without waiting 620 s, and
nothing depends on how fast this machine is. Real sockets on loopback throughout;
clients from different source addresses bind to 127.0.0.2, 127.0.0.3 first.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest

import acceptfilter
from acceptfilter import FilteredListener
from acceptfilter.engine import unaccounted
from acceptfilter.integrations import asyncio as af_asyncio
from acceptfilter.listener import route
from acceptfilter.policy import DEFAULT_IDLE_TIMEOUT, default_max_held

HEAD = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
REPLY_408 = b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
T0 = 1000.0


def connect(port: int, data: bytes = b"", source: str = "127.0.0.1") -> socket.socket:
    client = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    client.settimeout(10)
    client.bind((source, 0))
    client.connect(("127.0.0.1", port))
    if data:
        client.sendall(data)
    return client


def answer(client: socket.socket, seconds: float = 10) -> bytes:
    """What the server sent until it closed (an RST after it counts as the close too)."""
    client.settimeout(seconds)
    got = b""
    try:
        while chunk := client.recv(4096):
            got += chunk
    except ConnectionResetError:
        pass
    return got


def still_open(client: socket.socket) -> bool:
    """Nothing to read and no FIN: the server still holds it."""
    client.settimeout(0.05)
    try:
        return client.recv(1, socket.MSG_PEEK) != b""
    except TimeoutError:
        return True
    except ConnectionResetError:
        return False


def settle(engine: Any, until: Any = None, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        quiet = engine.step(0) == 0 and engine.step(0.01) == 0
        if quiet and (until is None or until()):
            return
        assert time.monotonic() < deadline, "the engine did not settle"


@pytest.fixture
def hand(listen_sock: socket.socket, core: str) -> Iterator[Any]:
    made: list[FilteredListener] = []

    def make(spec: Any = "httpready", **kwargs: Any) -> FilteredListener:
        listener = acceptfilter.wrap(listen_sock, spec, core=core, driver="none", **kwargs)
        listener.engine.set_clock(T0)
        made.append(listener)
        return listener

    yield make
    for listener in made:
        listener.close()


def test_the_idle_limit_runs_on_the_injected_clock(hand: Any) -> None:
    """An idle client is held 620 s by default (longer than every common balancer), not the 5 s deadline."""
    listener = hand()
    assert listener.idle_timeout == DEFAULT_IDLE_TIMEOUT == 620
    engine, port = listener.engine, listener.getsockname()[1]
    idle = connect(port)
    settle(engine, lambda: listener.stats()["held_idle"] == 1)
    engine.set_clock(T0 + 619)
    settle(engine)
    assert listener.stats()["held_idle"] == 1 and still_open(idle)
    engine.set_clock(T0 + 620.5)
    settle(engine, lambda: listener.stats()["held"] == 0)
    assert answer(idle) == b""  # a FIN, no 408: it never began a request
    stats = listener.stats()
    assert (stats["timed_out"], stats["timed_out_idle"], stats["timeout_replies"], stats["dropped"]) == (1, 1, 0, 1)
    assert unaccounted(stats) == 0
    idle.close()


def test_an_idle_client_that_sends_late_is_served(hand: Any) -> None:
    """A balancer's pre-opened connection used after 300 s: its request is surfaced; the deadline
    counts from its first byte, so its head may take the whole deadline after that."""
    listener = hand(timeout=5)
    engine, port = listener.engine, listener.getsockname()[1]
    client = connect(port)
    settle(engine, lambda: listener.stats()["held_idle"] == 1)
    engine.set_clock(T0 + 300)
    settle(engine)
    client.sendall(HEAD[:10])
    settle(engine, lambda: listener.stats()["held_partial"] == 1)
    engine.set_clock(T0 + 304)  # 4 s after its first byte: still within the deadline
    settle(engine)
    assert listener.stats()["held_partial"] == 1
    client.sendall(HEAD[10:])
    settle(engine, lambda: listener.queued == 1)
    listener.setblocking(False)
    conn, _ = listener.accept()
    assert conn.recv(4096) == HEAD
    conn.close()
    client.close()


def test_unlimited_idle_timeout(hand: Any) -> None:
    listener = hand(idle_timeout=0)
    assert listener.idle_timeout is None
    client = connect(listener.getsockname()[1])
    settle(listener.engine, lambda: listener.stats()["held_idle"] == 1)
    listener.engine.set_clock(T0 + 10 * 365 * 86400)
    settle(listener.engine)
    assert listener.stats()["held_idle"] == 1 and listener.engine.next_timeout() is None
    client.close()


def test_partial_http_gets_408_then_fin_at_its_deadline(hand: Any) -> None:
    listener = hand(timeout=5)
    engine, port = listener.engine, listener.getsockname()[1]
    slow = connect(port, b"GET / HTTP/1.1\r\nHost")
    idle = connect(port)
    settle(engine, lambda: listener.stats()["held_partial"] == 1 and listener.stats()["held_idle"] == 1)
    engine.set_clock(T0 + 5.5)
    settle(engine, lambda: listener.stats()["timeout_replies"] == 1)
    assert answer(slow) == REPLY_408
    stats = listener.stats()
    assert (stats["held_idle"], stats["held_partial"], stats["timed_out"], stats["timed_out_idle"]) == (1, 0, 1, 0)
    assert still_open(idle)  # idle is not slow
    assert unaccounted(stats) == 0
    slow.close()
    idle.close()


@pytest.mark.parametrize(("spec", "partial"), [("dnsready", b"\x00\x30abc"), ("tlsready", b"\x16\x03\x01\x02\x00\x01")])
def test_no_408_on_a_route_that_is_not_http(hand: Any, spec: str, partial: bytes) -> None:
    listener = hand(spec, timeout=5)
    engine, port = listener.engine, listener.getsockname()[1]
    client = connect(port, partial)  # a message under way
    settle(engine, lambda: listener.stats()["held_partial"] == 1)
    engine.set_clock(T0 + 6)
    settle(engine, lambda: listener.stats()["held"] == 0)
    assert answer(client) == b""  # the FIN alone
    assert listener.stats()["timeout_replies"] == 0 and listener.stats()["dropped"] == 1
    client.close()


def test_each_route_answers_its_own_way(listen_sock: socket.socket, core: str) -> None:
    """Several routes: the reply is that of the route still waiting on the connection."""
    router = route(listen_sock, {"http": "httpready", "dns": "dnsready"}, timeout=5, core=core, driver="none")
    try:
        engine = router["http"].engine
        engine.set_clock(T0)
        port = router["http"].getsockname()[1]
        http = connect(port, b"POST /x HTTP/1.1\r\n")
        dns = connect(port, b"\x00\x30\xab\xcd\x01")  # a DNS message under way
        settle(engine, lambda: router.stats()["held_partial"] == 2)
        engine.set_clock(T0 + 6)
        settle(engine, lambda: router.stats()["held"] == 0)
        assert answer(http) == REPLY_408
        assert answer(dns) == b""
        assert router.stats()["timeout_replies"] == 1
        http.close()
        dns.close()
    finally:
        router.close()


def test_a_server_first_route_still_surfaces_silent_clients_at_the_deadline(listen_sock: socket.socket,
                                                                           core: str) -> None:
    router = route(listen_sock, {"http": "httpready"}, default="smtp", timeout=2, core=core, driver="none")
    try:
        engine = router["http"].engine
        assert router["smtp"].idle_timeout == 2
        engine.set_clock(T0)
        silent = connect(router["http"].getsockname()[1])
        settle(engine, lambda: router.stats()["held_idle"] == 1)
        engine.set_clock(T0 + 2.5)
        settle(engine, lambda: router["smtp"].queued == 1)
        router["smtp"].setblocking(False)
        conn, _ = router["smtp"].accept()
        assert acceptfilter.connection_info(conn).reason == "timeout"  # type: ignore[union-attr]
        conn.close()
        silent.close()
    finally:
        router.close()


def test_eviction_takes_the_oldest_idle_of_the_source_holding_the_most(hand: Any) -> None:
    listener = hand(max_held=5)
    engine, port = listener.engine, listener.getsockname()[1]
    a = []
    for i in range(2):  # one at a time, so the accept order (and age) is the creation order
        a.append(connect(port, source="127.0.0.2"))
        settle(engine, lambda i=i: listener.stats()["accepted"] == 1 + i)
    b = []
    for i in range(3):
        b.append(connect(port, source="127.0.0.3"))
        settle(engine, lambda i=i: listener.stats()["accepted"] == 3 + i)
    late = connect(port, source="127.0.0.2")  # the sixth: one must go
    settle(engine, lambda: listener.stats()["evicted"] == 1)
    assert answer(b[0]) == b""  # 127.0.0.3 held the most: its oldest went, with a FIN
    assert all(still_open(c) for c in [*a, *b[1:], late])
    late2 = connect(port, source="127.0.0.4")  # now 127.0.0.2 holds 3, 127.0.0.3 two: a[0] goes
    settle(engine, lambda: listener.stats()["evicted"] == 2)
    assert answer(a[0]) == b""
    assert all(still_open(c) for c in [a[1], *b[1:], late, late2])
    stats = listener.stats()
    assert (stats["evicted_idle"], stats["evicted_partial"], stats["held"]) == (2, 0, 5)
    assert unaccounted(stats) == 0
    for c in [*a, *b, late, late2]:
        c.close()


def test_partial_ones_are_evicted_only_when_no_idle_one_is_left(hand: Any) -> None:
    listener = hand(max_held=2, timeout=30)
    engine, port = listener.engine, listener.getsockname()[1]
    partial = connect(port, b"GET / HT")
    settle(engine, lambda: listener.stats()["held_partial"] == 1)
    idle = connect(port)
    settle(engine, lambda: listener.stats()["held_idle"] == 1)
    newer = connect(port, b"GET /b HT")  # full: the idle one goes, though it is younger than the partial one
    settle(engine, lambda: listener.stats()["evicted"] == 1)
    assert answer(idle) == b""
    assert still_open(partial)
    last = connect(port, b"GET /c HT")  # no idle one left: the oldest partial one goes (no 408: not a timeout)
    settle(engine, lambda: listener.stats()["evicted"] == 2)
    assert answer(partial) == b""
    stats = listener.stats()
    assert (stats["evicted_idle"], stats["evicted_partial"], stats["held_partial"]) == (1, 1, 2)
    assert unaccounted(stats) == 0
    for c in (partial, idle, newer, last):
        c.close()


def test_evictions_are_logged_at_most_once_per_interval(hand: Any, caplog: pytest.LogCaptureFixture) -> None:
    listener = hand(max_held=1)
    engine, port = listener.engine, listener.getsockname()[1]
    clients = []
    for i in range(4):
        clients.append(connect(port))
        settle(engine, lambda i=i: listener.stats()["accepted"] == i + 1)
    assert listener.stats()["evicted_idle"] == 3
    lines = [r for r in caplog.records if "max_held" in r.getMessage()]
    assert len(lines) == 1 and lines[0].levelname == "WARNING"
    for c in clients:
        c.close()


def test_default_max_held_follows_the_fd_limit() -> None:
    assert default_max_held(256) == 192
    assert default_max_held(1024) == 768
    assert default_max_held(100) == 36  # at least 64 descriptors stay for the application
    assert default_max_held(-1) == 1_000_000  # unlimited


def test_408_through_the_asyncio_integration() -> None:
    """The asyncio driver (no thread): the same two budgets, on the real clock."""
    async def main() -> None:
        served: list[bytes] = []

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            served.append(await reader.readuntil(b"\r\n\r\n"))
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            await writer.drain()
            writer.close()

        server = await af_asyncio.start_server(handle, "127.0.0.1", 0, timeout=0.3)
        port = server.sockets[0].getsockname()[1]
        loop = asyncio.get_running_loop()
        idle = connect(port)
        slow = connect(port, b"GET / HTTP/1.1\r\n")
        assert await loop.run_in_executor(None, answer, slow) == REPLY_408
        await asyncio.sleep(0.3)  # past the partial deadline again: the idle one is still held
        assert await loop.run_in_executor(None, still_open, idle)
        idle.sendall(HEAD)
        assert (await loop.run_in_executor(None, answer, idle)).startswith(b"HTTP/1.1 200")
        assert served == [HEAD]
        idle.close()
        slow.close()
        server.close()
        await server.wait_closed()

    asyncio.run(main())
