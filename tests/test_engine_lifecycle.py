"""Engine v2: one explicit lifecycle, one owner for the core, and the defects that removed.

Each test names the defect it proves fixed; every one runs on both I/O cores.
Engines here are driven by hand (``driver="none"``): the test thread is the
one that steps, so what happens between two steps is exactly what the test did.
"""

from __future__ import annotations

import os
import socket
import struct
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

import acceptfilter
from acceptfilter import Decision, Filter, FilteredListener, Verdict
from acceptfilter.engine import Engine, Surfaced, unaccounted
from acceptfilter.iocore import make_core
from acceptfilter.policy import Policy, Route
from acceptfilter.registry import load_chain

from .conftest import open_fds, wait_for

HEAD = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"


def connect(port: int, data: bytes = b"") -> socket.socket:
    client = socket.create_connection(("127.0.0.1", port), timeout=10)
    if data:
        client.sendall(data)
    return client


def settle(listener: FilteredListener | Engine, until: Any = None, timeout: float = 10.0) -> None:
    """Step a hand-driven engine until nothing happens (and ``until()`` holds, if given)."""
    engine = listener.engine if isinstance(listener, FilteredListener) else listener
    deadline = time.monotonic() + timeout
    while True:
        quiet = engine.step(0) == 0 and engine.step(0.01) == 0
        if quiet and (until is None or until()):
            return
        assert time.monotonic() < deadline, "the engine did not settle"


def assert_closed(client: socket.socket) -> None:
    """The server side closed: EOF, or an RST when our bytes were still unread there."""
    client.settimeout(10)
    try:
        assert client.recv(10) == b""
    except ConnectionResetError:
        pass


def reset(client: socket.socket) -> None:
    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    client.close()


@pytest.fixture
def hand(listen_sock: socket.socket, core: str) -> Iterator[Any]:
    """wrap() with driver="none" on both cores; everything is closed afterwards."""
    made: list[FilteredListener] = []

    def make(spec: Any = "httpready", **kwargs: Any) -> FilteredListener:
        listener = acceptfilter.wrap(listen_sock, spec, core=core, driver="none", **kwargs)
        made.append(listener)
        return listener

    yield make
    for listener in made:
        listener.close()


class NoneInfo(Filter):
    """ACCEPTs with ``info=None``: a contract break the engine must catch before acting."""

    name = "none-info"

    def check(self, data: bytes, final: bool) -> Decision:
        return Decision(Verdict.ACCEPT, None)  # type: ignore[arg-type]


class InterruptOnce(Filter):
    """Raises KeyboardInterrupt the first time it sees bytes (Ctrl-C inside an inline step)."""

    name = "interrupt-once"

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.fired = False

    def check(self, data: bytes, final: bool) -> Decision:
        if data and not self.fired:
            self.fired = True
            raise KeyboardInterrupt
        return Decision.accept() if final or b"\n" in data else Decision(Verdict.WAIT)


def test_detach_keeps_the_invariant(hand: Any) -> None:
    """Defect 1: detached connections are a terminal outcome of the invariant."""
    listener = hand("httpready")
    port = listener.getsockname()[1]
    client = connect(port, b"GET / HTT")
    settle(listener, lambda: listener.stats()["held"] == 1)
    fds = listener.detach_held()
    stats = listener.stats()
    assert (stats["accepted"], stats["detached"], stats["held"]) == (1, 1, 0)
    assert unaccounted(stats) == 0
    for fd in fds:
        os.close(fd)
    client.close()


def test_adopted_connection_keeps_the_invariant(hand: Any, listen_sock: socket.socket) -> None:
    """Adoption counts as accepted; the adopted connection ends in one outcome."""
    holder = hand("httpready")
    other = socket.create_server(("127.0.0.1", 0))
    client = connect(other.getsockname()[1], b"GET / HTTP/1.1\r\n")
    conn, _ = other.accept()
    holder.adopt(conn.detach())
    settle(holder, lambda: holder.stats()["held"] == 1)
    assert unaccounted(holder.stats()) == 0
    client.sendall(b"\r\n")
    settle(holder, lambda: holder.stats()["surfaced"] == 1)
    served, _ = holder.accept()
    assert served.recv(100).startswith(b"GET / HTTP/1.1")
    stats = holder.stats()
    assert (stats["accepted"], stats["surfaced"], stats["held"]) == (1, 1, 0) and unaccounted(stats) == 0
    served.close()
    client.close()
    other.close()


def test_info_none_is_a_filter_error_not_a_leak(hand: Any) -> None:
    """Defect 2: a decision with info=None is validated before anything is done to the fd."""
    listener = hand(NoneInfo(), on_error="close")
    client = connect(listener.getsockname()[1], HEAD)
    settle(listener, lambda: listener.stats()["accepted"] == 1)
    stats = listener.stats()
    assert (stats["surfaced"], stats["failed"], stats["dropped"], stats["filter_errors"]) == (0, 0, 1, 1)
    assert unaccounted(stats) == 0
    client.settimeout(10)
    assert client.recv(10) == b""  # closed by the on_error policy, not left hanging
    client.close()


def test_info_none_surfaces_with_on_error_surface(hand: Any) -> None:
    listener = hand(NoneInfo(), on_error="surface")
    client = connect(listener.getsockname()[1], HEAD)
    settle(listener, lambda: listener.stats()["surfaced"] == 1)
    conn, _, info = listener.accept_with_info()
    assert info.reason == "filter_error" and conn.recv(100) == HEAD
    stats = listener.stats()
    assert (stats["surfaced"], stats["failed"]) == (1, 0) and unaccounted(stats) == 0
    conn.close()
    client.close()


def test_eviction_counts_only_undecided_connections(hand: Any) -> None:
    """Defect 3: with max_held=3, two complete heads in the same batch do not evict the idle one."""
    listener = hand("httpready", max_held=3, on_timeout="close")
    port = listener.getsockname()[1]
    idle = connect(port)
    complete = [connect(port, HEAD), connect(port, HEAD)]
    late = connect(port)
    settle(listener, lambda: listener.stats()["surfaced"] == 2)
    stats = listener.stats()
    assert (stats["evicted"], stats["dropped"], stats["held"]) == (0, 0, 2)
    assert unaccounted(stats) == 0
    # A third undecided connection fits; a fourth is one too many: the oldest undecided goes.
    extra = [connect(port)]
    settle(listener, lambda: listener.stats()["held"] == 3)
    assert listener.stats()["evicted"] == 0
    extra.append(connect(port))
    settle(listener, lambda: listener.stats()["evicted"] == 1)
    idle.settimeout(10)
    assert idle.recv(10) == b""  # the oldest, evicted with on_timeout=close
    for client in (*complete, late, *extra):
        client.close()
    while listener.queued:
        listener.accept()[0].close()


def test_connections_kept_waiting_past_the_bound_are_evicted(hand: Any) -> None:
    """Undecided connections over max_held after a batch: the oldest go at the next poll."""
    listener = hand("httpready", max_held=2, on_timeout="close")
    port = listener.getsockname()[1]
    clients = [connect(port, b"GET / HTTP/1.1\r\n") for _ in range(4)]
    settle(listener, lambda: listener.stats()["evicted"] == 2)
    stats = listener.stats()
    assert (stats["held"], stats["dropped"]) == (2, 2) and unaccounted(stats) == 0
    for client in clients:
        client.close()


def test_an_interrupted_batch_strands_nothing(hand: Any) -> None:
    """Defect 4: KeyboardInterrupt in the middle of a batch; the core reports the rest again."""
    flt = InterruptOnce()
    listener = hand(flt)
    port = listener.getsockname()[1]
    clients = [connect(port, b"one line\n") for _ in range(3)]
    for client in clients:
        client.shutdown(socket.SHUT_WR)  # EOF: every event is final
    with pytest.raises(KeyboardInterrupt):
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            listener.engine.step(0.05)
    assert flt.fired
    settle(listener, lambda: listener.stats()["held"] == 0)
    stats = listener.stats()
    assert stats["accepted"] == 3 and stats["surfaced"] == 3 and unaccounted(stats) == 0
    for _ in range(3):
        listener.accept()[0].close()
    for client in clients:
        client.close()


def test_a_failing_sink_loses_no_fd(listen_sock: socket.socket, core: str) -> None:
    """Defect 5 (second half): one route's failing sink closes its connections, counted, and no fd leaks."""
    before = open_fds()
    delivered: list[Surfaced] = []

    def sink(route: str, items: list[Surfaced]) -> None:
        if route == "bad":
            raise RuntimeError("queue gone")
        delivered.extend(items)

    routes = (Route("bad", load_chain("httpready")), Route("good", load_chain("dataready")))
    io_core = make_core(core, listen_sock, max_bytes=16384, timeout=5.0, max_held=100)
    engine = Engine(io_core, routes, Policy(), sink)
    port = listen_sock.getsockname()[1]
    http = connect(port, HEAD)
    other = connect(port, b"\x00binary")
    settle(engine, lambda: engine.stats()["surfaced"] == 2)
    stats = engine.stats()
    assert stats["unclaimed"] == 1 and unaccounted(stats) == 0
    assert_closed(http)  # closed (unread request: an RST), not leaked
    assert len(delivered) == 1
    for fd, _, _ in delivered:
        os.close(fd)
    engine.shutdown(acceptfilter.policy.Action("close"))
    engine.free()
    http.close()
    other.close()
    assert open_fds() <= before | {listen_sock.fileno()}


def test_closing_a_route_while_the_engine_queues_into_it(listen_sock: socket.socket, core: str) -> None:
    """Defect 5: close_route from the application thread races put_many in the engine thread."""
    before = open_fds()
    port = listen_sock.getsockname()[1]
    router = acceptfilter.listener.route(listen_sock, {"a": "dataready", "b": "httpready"}, core=core)
    stop = threading.Event()

    def flood() -> None:
        while not stop.is_set():
            try:
                connect(port, b"x").close()
            except OSError:
                return

    threads = [threading.Thread(target=flood) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: router.stats()["surfaced"] > 20, timeout=20)
        router["a"].close()  # the engine thread is queueing into "a" right now
        wait_for(lambda: router.stats()["surfaced"] > 40, timeout=20)
        stats = router.stats()
        assert unaccounted(stats) == 0
    finally:
        stop.set()
        for t in threads:
            t.join(10)
        router.close()
    stats = router.stats()
    assert stats["held"] == 0 and unaccounted(stats) == 0
    wait_for(lambda: open_fds() <= before | {listen_sock.fileno()}, timeout=10)


def test_stats_is_a_consistent_snapshot_during_a_flood(listen_sock: socket.socket, core: str) -> None:
    """Defect 6: the invariant holds for a reader in another thread at any moment."""
    listener = acceptfilter.wrap(listen_sock, "httpready", core=core, timeout=0.2, on_timeout="close")
    port = listen_sock.getsockname()[1]
    stop = threading.Event()
    broken: list[dict[str, Any]] = []

    def read() -> None:
        while not stop.is_set():
            stats = listener.stats()
            if unaccounted(stats):
                broken.append(stats)

    def flood() -> None:
        kinds = [HEAD, b"GET / HTTP/1.1\r\n", b"", b"\x00"]
        i = 0
        while not stop.is_set():
            try:
                client = connect(port, kinds[i % len(kinds)])
            except OSError:
                continue
            if i % 3 == 0:
                reset(client)
            else:
                client.close()
            i += 1

    def serve() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                listener.accept()[0].close()
            except (TimeoutError, OSError):
                pass

    threads = [threading.Thread(target=f) for f in (read, read, flood, flood, serve)]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: listener.stats()["accepted"] > 300, timeout=60)
    finally:
        stop.set()
        for t in threads:
            t.join(10)
        listener.close()
    assert not broken, broken[0]
    assert unaccounted(listener.stats()) == 0


def test_huge_timeout_is_clamped_not_overflowed(hand: Any) -> None:
    """C core: timeout_ms * 1000 and accepted_us + timeout_us no longer overflow (run under UBSan too)."""
    listener = hand("httpready", timeout=1e13)
    assert listener.deadline <= acceptfilter.policy.MAX_TIMEOUT
    client = connect(listener.getsockname()[1], b"GET / HTTP/1.1\r\n")
    settle(listener, lambda: listener.stats()["held"] == 1)
    timeout = listener.engine.next_timeout()
    assert timeout is not None and timeout > 1e9  # a real, far deadline: not negative, not due
    client.sendall(b"\r\n")
    settle(listener, lambda: listener.stats()["surfaced"] == 1)
    listener.accept()[0].close()
    client.close()


def test_the_peer_address_is_the_one_taken_at_accept(hand: Any) -> None:
    """A trusted balancer that sends a PROXY LOCAL header and resets (HAProxy health checks)
    is never judged 'not trusted' because getpeername() fails after the reset."""
    listener = hand("proxy:trusted=127.0.0.0/8")
    port = listener.getsockname()[1]
    local = b"\r\n\r\n\x00\r\nQUIT\n" + bytes([0x20, 0x00, 0x00, 0x00])  # v2, LOCAL, UNSPEC, no address
    for _ in range(5):
        client = connect(port, local)
        reset(client)
    settle(listener, lambda: listener.stats()["held"] == 0 and listener.stats()["accepted"] == 5)
    stats = listener.stats()
    assert stats["rejected"] == stats["failed"] == 0 and unaccounted(stats) == 0
    assert stats["surfaced"] + stats["aborted"] == 5
    while listener.queued:
        listener.accept()[0].close()


def test_connection_info_is_a_read_only_mapping(hand: Any) -> None:
    """ConnectionInfo is a Mapping of what the filters learnt (dict(info) works), with exact attributes."""
    from collections.abc import Mapping

    listener = hand("httpready")
    client = connect(listener.getsockname()[1], HEAD)
    settle(listener, lambda: listener.stats()["surfaced"] == 1)
    conn, addr, info = listener.accept_with_info()
    assert isinstance(info, Mapping)
    learnt = dict(info)
    assert learnt["method"] == "GET" and learnt["host"] == "x" and set(info) == set(learnt) and len(info) == len(learnt)
    assert "target" in info and info.get("missing", 7) == 7
    assert (info.route, info.reason, info.consumed, info.peer) == ("default", "ready", 0, addr)
    with pytest.raises(TypeError):
        info["method"] = "POST"  # type: ignore[index]
    import pickle

    assert pickle.loads(pickle.dumps(info)) == info  # the gunicorn hand-off pickles it
    conn.close()
    client.close()
