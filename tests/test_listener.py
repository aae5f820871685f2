"""FilteredListener end to end: real sockets on loopback, both I/O cores."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest

import acceptfilter
from acceptfilter import Decision, Filter, FilteredListener
from acceptfilter.engine import OUTCOMES

from .conftest import open_fds, wait_for

HEAD = b"GET /index.html HTTP/1.1\r\nHost: example.test\r\nUser-Agent: t\r\n\r\n"


def connect(listener: FilteredListener) -> socket.socket:
    return socket.create_connection(listener.getsockname()[:2], timeout=5)


def accept_within(listener: FilteredListener, seconds: float) -> socket.socket | None:
    listener.settimeout(seconds)
    try:
        sock, _ = listener.accept()
    except TimeoutError:
        return None
    return sock


@pytest.fixture
def make(listen_sock: socket.socket, core: str) -> Iterator[object]:
    made: list[FilteredListener] = []

    def factory(spec: object = "httpready", **kw: object) -> FilteredListener:
        listener = acceptfilter.wrap(listen_sock, spec, core=core, **kw)  # type: ignore[arg-type]
        made.append(listener)
        return listener

    yield factory
    for listener in made:
        listener.close()


def test_head_in_pieces_surfaces_only_after_last_piece(make) -> None:  # type: ignore[no-untyped-def]
    listener = make(timeout=10)
    client = connect(listener)
    pieces = [HEAD[:5], HEAD[5:20], HEAD[20:-2], HEAD[-2:]]
    for piece in pieces[:-1]:
        client.sendall(piece)
        assert accept_within(listener, 0.15) is None, "surfaced before the head was complete"
    client.sendall(pieces[-1])
    sock = accept_within(listener, 10)
    assert sock is not None
    # The application reads the complete request from byte 0.
    sock.settimeout(2)
    assert sock.recv(4096) == HEAD
    info = acceptfilter.connection_info(sock)
    assert info is not None and info.reason == "ready"
    assert info["method"] == "GET" and info["target"] == "/index.html" and info["host"] == "example.test"
    sock.close()
    client.close()


@pytest.mark.parametrize("listener_timeout", [None, 5.0])
def test_accepted_socket_is_exact_and_blocking(make, listener_timeout: float | None) -> None:  # type: ignore[no-untyped-def]
    """As from socket.accept(): blocking, the descriptor too, whatever the listener's timeout
    (socket.accept() calls setblocking(True) when the listener has one; accept() relies on
    the descriptor being blocking already)."""
    import fcntl
    import os

    listener = make()
    client = connect(listener)
    client.sendall(HEAD)
    listener.settimeout(listener_timeout)
    sock, addr = listener.accept()
    assert type(sock) is socket.socket
    assert sock.gettimeout() is None and sock.getblocking()
    assert not fcntl.fcntl(sock.fileno(), fcntl.F_GETFL) & os.O_NONBLOCK
    assert addr == client.getsockname()
    assert sock.getpeername() == client.getsockname()
    sock.sendall(b"HTTP/1.0 200 OK\r\n\r\nhi")
    sock.close()
    assert client.recv(100).endswith(b"hi")
    client.close()


def test_connection_info_lives_as_long_as_the_socket(make) -> None:  # type: ignore[no-untyped-def]
    """The info store keeps an entry per surfaced socket, and drops it when the socket goes
    (many connections, none left behind), without keeping the socket alive."""
    import gc
    import weakref

    from acceptfilter import listener as listener_module

    listener = make()
    gc.collect()  # an earlier test's socket caught in a cycle would leave the store while we count
    before = list(listener_module._info_by_socket)  # its keys (held, so no id is reused)
    alive: list[weakref.ref[socket.socket]] = []
    for _ in range(20):
        client = connect(listener)
        client.sendall(HEAD)
        sock = accept_within(listener, 10)
        assert sock is not None
        assert acceptfilter.connection_info(sock) is not None
        alive.append(weakref.ref(sock))
        sock.close()
        client.close()
        del sock
    gc.collect()
    assert all(ref() is None for ref in alive), "the info store kept a socket alive"
    known = {id(key) for key in before}
    left = [key for key in list(listener_module._info_by_socket) if id(key) not in known]
    assert left == [], f"{len(left)} entries outlived their sockets"
    with socket.socket() as never_surfaced:
        assert acceptfilter.connection_info(never_surfaced) is None
    assert acceptfilter.connection_info(42) is None  # type: ignore[arg-type]


def test_idle_connection_surfaced_after_its_idle_limit(make) -> None:  # type: ignore[no-untyped-def]
    listener = make(idle_timeout=0.4, on_timeout="surface")
    start = time.monotonic()  # before connect: the deadline starts after this, however late we run
    client = connect(listener)
    sock = accept_within(listener, 10)
    assert sock is not None
    assert time.monotonic() - start >= 0.4  # never before the deadline (a busy machine may be late)
    info = acceptfilter.connection_info(sock)
    assert info is not None and info.reason == "timeout"
    # A load balancer's pre-opened connection still works after the deadline.
    client.sendall(HEAD)
    sock.settimeout(2)
    assert sock.recv(4096) == HEAD
    assert listener.stats()["timed_out"] == listener.stats()["timed_out_idle"] == 1
    sock.close()
    client.close()


@pytest.mark.parametrize("policy", ["close", "reset"])
def test_idle_connection_closed_by_policy(make, policy: str) -> None:  # type: ignore[no-untyped-def]
    listener = make(timeout=0.3, idle_timeout=0.3, on_timeout=policy)
    client = connect(listener)
    client.settimeout(10)
    if policy == "close":
        assert client.recv(10) == b""
    else:
        with pytest.raises(ConnectionResetError):
            client.recv(10)
    assert listener.queued == 0  # closed, never surfaced
    wait_for(lambda: listener.stats()["dropped"] == 1)
    stats = listener.stats()
    assert stats["timed_out"] == 1 and stats["dropped"] == 1 and stats["surfaced"] == 0
    client.close()


def test_trickling_client_is_treated_like_idle(make) -> None:  # type: ignore[no-untyped-def]
    """A new byte resets nothing: the deadline is per connection, however slowly it trickles."""
    listener = make(timeout=0.5, on_timeout="close")
    client = connect(listener)
    start = time.monotonic()
    closed = threading.Event()

    def trickle() -> None:  # one header byte every 50 ms: the head would take 1.5 s to complete
        for byte in HEAD:
            if closed.is_set():
                return
            try:
                client.sendall(bytes([byte]))
            except OSError:
                return
            time.sleep(0.05)

    sender = threading.Thread(target=trickle)
    sender.start()
    client.settimeout(20)
    answer = b""
    try:
        while chunk := client.recv(100):
            answer += chunk
    except ConnectionResetError:
        pass  # closed while a trickled byte was still unread there: the same verdict
    assert answer in (b"", b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\nContent-Length: 0\r\n\r\n")
    closed.set()
    sender.join(10)
    elapsed = time.monotonic() - start
    assert elapsed < len(HEAD) * 0.05, f"closed after {elapsed:.2f} s: the trickle extended the deadline"
    wait_for(lambda: listener.stats()["timed_out"] == 1)
    assert listener.stats()["surfaced"] == 0
    client.close()


def test_many_idle_connections_do_not_delay_a_real_request(make) -> None:  # type: ignore[no-untyped-def]
    listener = make(timeout=30, max_held=1000)
    idle = [connect(listener) for _ in range(200)]
    client = connect(listener)
    start = time.monotonic()
    client.sendall(HEAD)
    sock = accept_within(listener, 10)
    elapsed = time.monotonic() - start
    assert sock is not None and sock.recv(4096) == HEAD
    assert elapsed < 1.0
    stats = listener.stats()
    assert stats["held"] == 200 and stats["surfaced"] == 1
    sock.close()
    for c in [client, *idle]:
        c.close()


@pytest.mark.parametrize(
    ("payload", "expect_method"),
    [
        (b"POST /upload HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n\r\nabc", "POST"),
        (b"PUT /x HTTP/1.0\n\n", "PUT"),
        (b"GET /old\r\n", "GET"),  # HTTP/0.9
        (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", "PRI"),
        (b"GET /a HTTP/1.1\r\nHost: h\r\n\r\nGET /b HTTP/1.1\r\nHo", "GET"),  # pipelined, second half there
    ],
)
def test_http_variants_surface_with_every_byte(make, payload: bytes, expect_method: str) -> None:  # type: ignore[no-untyped-def]
    listener = make(timeout=10)
    client = connect(listener)
    client.sendall(payload)
    sock = accept_within(listener, 10)
    assert sock is not None
    sock.settimeout(2)
    got = b""
    while len(got) < len(payload):
        got += sock.recv(4096)
    assert got == payload
    info = acceptfilter.connection_info(sock)
    assert info is not None and info["method"] == expect_method
    sock.close()
    client.close()


def test_garbage_is_rejected_by_default_and_passed_on_request(listen_sock: socket.socket, core: str) -> None:
    """Standalone httpready is not bypassable by garbage (issue 14, item 2); FreeBSD's pass is opt-in."""
    with acceptfilter.wrap(listen_sock, "httpready", core=core) as listener:
        client = connect(listener)
        client.sendall(b"\x16\x03\x01\x00\xa5\x01")
        assert accept_within(listener, 0.5) is None
        client.settimeout(2)
        assert client.recv(10) == b""
        assert listener.stats()["rejected"] == 1
        client.close()
    other = socket.create_server(("127.0.0.1", 0))
    with acceptfilter.wrap(other, "httpready:non_http=accept", core=core) as listener:
        client = connect(listener)
        client.sendall(b"\x16\x03\x01\x00\xa5\x01")
        sock = accept_within(listener, 10)
        assert sock is not None
        assert acceptfilter.connection_info(sock)["protocol"] == "unknown"  # type: ignore[index]
        sock.close()
        client.close()


def test_head_over_the_cap_is_final(make) -> None:  # type: ignore[no-untyped-def]
    listener = make("httpready:max_bytes=1024", timeout=10)
    client = connect(listener)
    client.sendall(b"GET / HTTP/1.1\r\nX-Big: " + b"a" * 2000)
    assert accept_within(listener, 0.5) is None
    client.settimeout(2)
    try:  # closed at once, not after the 10 s deadline (RST: unread bytes beyond the cap)
        assert client.recv(10) == b""
    except ConnectionResetError:
        pass
    assert listener.stats()["rejected"] == 1


def test_oversize_accept_lets_the_app_answer(make) -> None:  # type: ignore[no-untyped-def]
    listener = make("httpready:max_bytes=1024,oversize=accept", timeout=10)
    client = connect(listener)
    client.sendall(b"GET / HTTP/1.1\r\nX-Big: " + b"a" * 2000)
    sock = accept_within(listener, 10)
    assert sock is not None
    assert acceptfilter.connection_info(sock)["method"] == "GET"  # type: ignore[index]
    sock.close()
    client.close()


def test_half_close_after_complete_request(make) -> None:  # type: ignore[no-untyped-def]
    listener = make(timeout=10)
    client = connect(listener)
    client.sendall(HEAD)
    client.shutdown(socket.SHUT_WR)
    sock = accept_within(listener, 10)
    assert sock is not None
    sock.settimeout(2)
    assert sock.recv(4096) == HEAD
    sock.sendall(b"HTTP/1.0 204 No Content\r\n\r\n")
    sock.close()
    assert client.recv(100).startswith(b"HTTP/1.0 204")
    client.close()


def test_half_close_after_partial_head_is_aborted(make) -> None:  # type: ignore[no-untyped-def]
    """The peer left in the middle of its request: its doing (aborted), not a rejection nor a failure."""
    listener = make(timeout=10)
    client = connect(listener)
    client.sendall(HEAD[:10])
    client.shutdown(socket.SHUT_WR)
    assert accept_within(listener, 0.5) is None
    wait_for(lambda: listener.stats()["held"] == 0)
    stats = listener.stats()
    assert (stats["aborted"], stats["rejected"], stats["failed"]) == (1, 0, 0)
    client.close()


def test_half_close_after_garbage_is_rejected(make) -> None:  # type: ignore[no-untyped-def]
    """Bytes the filter rejects as they are stay "rejected" when a FIN comes with them."""
    listener = make(timeout=10)
    client = connect(listener)
    client.sendall(b"\x16\x03\x01\x02\x00\x01")
    client.shutdown(socket.SHUT_WR)
    assert accept_within(listener, 0.5) is None
    wait_for(lambda: listener.stats()["held"] == 0)
    stats = listener.stats()
    assert (stats["aborted"], stats["rejected"], stats["failed"]) == (0, 1, 0)
    client.close()


def test_eof_with_nothing_sent_is_closed_and_counted(make) -> None:  # type: ignore[no-untyped-def]
    listener = make(timeout=10)
    for _ in range(3):
        connect(listener).close()
    deadline = time.monotonic() + 2
    while listener.stats()["closed_empty"] < 3 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert accept_within(listener, 0.1) is None
    stats = listener.stats()
    assert stats["closed_empty"] == 3 and stats["held"] == 0


def test_rst_mid_head_is_counted_as_aborted(make) -> None:  # type: ignore[no-untyped-def]
    listener = make(timeout=10)
    client = connect(listener)
    client.sendall(HEAD[:10])
    time.sleep(0.1)
    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    client.close()  # RST
    wait_for(lambda: listener.stats()["held"] == 0, timeout=10)
    stats = listener.stats()
    assert stats["held"] == 0 and (stats["aborted"], stats["failed"], stats["rejected"]) == (1, 0, 0)
    assert accept_within(listener, 0.1) is None


def test_held_bound_evicts_the_oldest(make) -> None:  # type: ignore[no-untyped-def]
    listener = make(timeout=30, max_held=3, on_timeout="close")
    clients = []
    for _ in range(5):
        clients.append(connect(listener))
        time.sleep(0.05)
    deadline = time.monotonic() + 2
    while listener.stats()["evicted"] < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    stats = listener.stats()
    assert stats["evicted"] == 2 and stats["held"] == 3
    for c in clients[:2]:  # the two oldest were closed
        c.settimeout(2)
        assert c.recv(10) == b""
    clients[2].sendall(HEAD)  # the others are still held and work
    sock = accept_within(listener, 10)
    assert sock is not None and sock.recv(4096) == HEAD
    sock.close()
    for c in clients:
        c.close()


def test_evicted_partial_connection_surfaces_with_on_timeout_surface(make) -> None:  # type: ignore[no-untyped-def]
    listener = make(timeout=30, max_held=1, on_timeout="surface")
    first = connect(listener)
    first.sendall(b"GET / HT")  # partial: with no idle one held, the one to make room
    wait_for(lambda: listener.stats()["held_partial"] == 1)
    second = connect(listener)
    sock = accept_within(listener, 10)
    assert sock is not None and sock.getpeername() == first.getsockname()
    assert acceptfilter.connection_info(sock).reason == "evicted"  # type: ignore[union-attr]
    assert listener.stats()["evicted_partial"] == 1
    sock.close()
    first.close()
    second.close()


class Exploding(Filter):
    """Raises on a magic byte (a user's bug)."""

    name = "exploding"

    def check(self, data: bytes, final: bool) -> Decision:
        if b"!" in data:
            raise RuntimeError("boom")
        return acceptfilter.ACCEPT if len(data) >= 4 else (acceptfilter.REJECT if final else acceptfilter.WAIT)


@pytest.mark.parametrize(("on_error", "surfaced"), [(None, False), ("surface", True), ("close", False)])
def test_raising_filter_is_contained(make, caplog: pytest.LogCaptureFixture, on_error: str | None, surfaced: bool) -> None:  # type: ignore[no-untyped-def]
    kw = {"on_error": on_error} if on_error else {}
    listener = make(Exploding(), timeout=10, **kw)
    clients = [connect(listener) for _ in range(3)]
    for c in clients:
        c.sendall(b"ab!")
    got = [accept_within(listener, 10 if surfaced else 0.4) for _ in clients]
    if surfaced:
        assert all(s is not None for s in got)
        assert {acceptfilter.connection_info(s).reason for s in got if s} == {"filter_error"}  # type: ignore[union-attr]
    else:
        assert got == [None, None, None]
    stats = listener.stats()
    assert stats["filter_errors"] == 3 and stats["filter_errors_by_filter"] == {"exploding": 3}
    assert sum("raised RuntimeError" in r.getMessage() for r in caplog.records) == 1  # logged once per filter
    good = connect(listener)  # the engine keeps working
    good.sendall(b"abcd")
    sock = accept_within(listener, 10)
    assert sock is not None and sock.recv(10) == b"abcd"
    for s in [*got, sock]:
        if s:
            s.close()
    for c in [*clients, good]:
        c.close()


def test_close_leaves_no_fd_open(listen_sock: socket.socket, core: str) -> None:
    before = open_fds()
    listener = acceptfilter.wrap(listen_sock, "httpready", core=core, timeout=30)
    clients = [connect(listener) for _ in range(20)]
    for c in clients[:5]:
        c.sendall(HEAD[:10])  # held with data
    for c in clients[5:8]:
        c.sendall(HEAD)  # queued, never accepted
    deadline = time.monotonic() + 2
    while listener.queued < 3 and time.monotonic() < deadline:
        time.sleep(0.02)
    listener.close()
    listener.close()  # idempotent
    assert listener.fileno() == -1
    with pytest.raises(OSError):
        listener.accept()
    for i, c in enumerate(clients):
        c.settimeout(2)
        if 5 <= i < 8:  # queued with an unread request: closed like a kernel accept queue, RST
            with pytest.raises(ConnectionResetError):
                c.recv(100)
        else:  # held ones get a clean FIN
            assert c.recv(100) == b""
        c.close()
    assert open_fds() - before == set()
    assert listen_sock.fileno() == -1  # the listener owned the socket


def test_close_wakes_a_blocked_accept(make) -> None:  # type: ignore[no-untyped-def]
    listener = make()
    errors: list[BaseException] = []

    def blocked() -> None:
        try:
            listener.accept()
        except OSError as exc:
            errors.append(exc)

    t = threading.Thread(target=blocked)
    t.start()
    time.sleep(0.1)
    listener.close()
    t.join(2)
    assert not t.is_alive() and len(errors) == 1


def test_nonblocking_accept_and_readiness_fd(make) -> None:  # type: ignore[no-untyped-def]
    import selectors

    listener = make()
    listener.setblocking(False)
    with pytest.raises(BlockingIOError):
        listener.accept()
    sel = selectors.DefaultSelector()
    sel.register(listener, selectors.EVENT_READ)
    assert sel.select(0.05) == []
    clients = [connect(listener) for _ in range(3)]
    for c in clients:
        c.sendall(HEAD)
    accepted = []
    deadline = time.monotonic() + 3
    while len(accepted) < 3 and time.monotonic() < deadline:
        for _key, _ in sel.select(0.5):
            accepted.append(listener.accept()[0])
    assert len(accepted) == 3
    assert sel.select(0.05) == []  # one token per connection: no spurious readiness
    sel.close()
    for s in accepted + clients:
        s.close()


def test_several_threads_accept_each_connection_once(make) -> None:  # type: ignore[no-untyped-def]
    listener = make("dataready", timeout=10)
    n = 60
    got: list[bytes] = []
    lock = threading.Lock()

    def worker() -> None:
        listener.settimeout(None)
        while True:
            try:
                sock, _ = listener.accept()
            except OSError:
                return
            data = sock.recv(100)
            with lock:
                got.append(data)
            sock.close()

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    clients = []
    for i in range(n):
        c = connect(listener)
        c.sendall(b"%04d" % i)
        clients.append(c)
    deadline = time.monotonic() + 5
    while len(got) < n and time.monotonic() < deadline:
        time.sleep(0.02)
    listener.close()
    for t in threads:
        t.join(2)
    assert sorted(got) == [b"%04d" % i for i in range(n)]
    for c in clients:
        c.close()


def test_accounting_invariant(make) -> None:  # type: ignore[no-untyped-def]
    listener = make("httpready:non_http=reject", timeout=0.3, idle_timeout=0.3, on_timeout="close")
    clients = [connect(listener) for _ in range(4)]  # idle -> timed out at the idle limit
    good = connect(listener)
    good.sendall(HEAD)
    bad = connect(listener)
    bad.sendall(b"\x00\x01garbage")
    connect(listener).close()  # closed empty
    wait_for(lambda: listener.stats()["held"] == 0 and listener.stats()["accepted"] == 7, timeout=20)
    s = listener.stats()
    outcomes = sum(s[name] for name in OUTCOMES)
    assert s["accepted"] == 7 == outcomes + s["held"]
    assert (s["surfaced"], s["rejected"], s["closed_empty"], s["dropped"], s["timed_out"]) == (1, 1, 1, 4, 4)
    for c in [*clients, good, bad]:
        c.close()


def test_bad_arguments_get_clear_errors(listen_sock: socket.socket) -> None:
    with pytest.raises(acceptfilter.UnknownFilterError, match="unknown filter 'nope'"):
        acceptfilter.wrap(listen_sock, "nope")
    with pytest.raises(acceptfilter.FilterSpecError, match="on_timeout must be one of"):
        acceptfilter.wrap(listen_sock, "httpready", on_timeout="explode")
    with pytest.raises(acceptfilter.FilterSpecError, match="timeout must be a positive"):
        acceptfilter.wrap(listen_sock, "httpready", timeout=0)
    with pytest.raises(ValueError, match="unknown I/O core"):
        acceptfilter.wrap(listen_sock, "httpready", core="rust")
    unbound = socket.socket()
    with pytest.raises(ValueError, match="not listening"):
        acceptfilter.wrap(unbound, "httpready")
    unbound.close()
    # Nothing above took the socket over: it still works as a plain listener.
    assert listen_sock.fileno() >= 0
