"""The fast path: a connection that is ready when accepted runs no Python filter.

httpready declares a compiled matcher; the core runs it on the bytes peeked at
accept, and a thread blocked in accept() gets a certified connection straight
from the core (one C call), with its metadata parsed only when asked for. What
the matcher cannot certify goes to the filter exactly as before. Both cores.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

import pytest
from acceptfilter.filters.httpready import HttpReady

import acceptfilter
from acceptfilter import Decision, FilteredListener
from acceptfilter.drivers import thread as thread_driver
from acceptfilter.engine import unaccounted

from .conftest import wait_for

HEAD = b"GET /fast HTTP/1.1\r\nHost: example.test\r\n\r\n"


class CountingHttp(HttpReady):
    """httpready that counts its Python checks (its matcher is httpready's)."""

    name = "counting-http"
    checks = 0

    def check(self, data: bytes, final: bool) -> Decision:
        CountingHttp.checks += 1
        return super().check(data, final)

    def session(self) -> Any:
        outer = super().session()

        class Counted:
            def check(self, data: bytes, final: bool) -> Decision:
                CountingHttp.checks += 1
                return outer.check(data, final)

        return Counted()


@pytest.fixture
def listener(listen_sock: socket.socket, core: str) -> Iterator[FilteredListener]:
    CountingHttp.checks = 0
    lst = acceptfilter.wrap(listen_sock, CountingHttp(), core=core, timeout=10)
    lst.settimeout(10)
    yield lst
    lst.close()


def stand_background_down(listener: FilteredListener, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the thread that calls accept() the one that steps the engine from now on.

    The background thread stands down while a thread steps inline; "a while" is made long,
    so that no connection reaches it instead however slow this machine is right now.
    """
    monkeypatch.setattr(thread_driver, "INLINE_GRACE", 60.0)
    listener.settimeout(0.01)
    with pytest.raises(TimeoutError):
        listener.accept()  # an inline step: the background thread stands down from here on
    listener.settimeout(10)


def test_ready_at_accept_runs_no_filter(listener: FilteredListener, monkeypatch: pytest.MonkeyPatch) -> None:
    stand_background_down(listener, monkeypatch)
    port = listener.getsockname()[1]
    for i in range(20):
        with socket.create_connection(("127.0.0.1", port)) as client:
            client.sendall(HEAD)
            conn, addr = listener.accept()
            with conn:
                assert addr == client.getsockname()
                assert conn.recv(4096) == HEAD  # every byte still there
                info = acceptfilter.connection_info(conn)
                assert info is not None and info.reason == "ready" and info.route == "default"
                assert not info.parsed  # nobody asked yet: nothing parsed
                assert CountingHttp.checks == 0, f"connection {i}: the filter ran"
                assert info["target"] == "/fast" and info["host"] == "example.test"  # parsed now
                assert info.parsed and dict(info)["method"] == "GET"
                CountingHttp.checks = 0  # the parse just ran the filter once, on request
    stats = listener.stats()
    assert stats["surfaced_at_accept"] == 20 and stats["surfaced"] == 20
    assert stats["surfaced_by_reason"] == {"ready": 20} and stats["surfaced_by_route"] == {"default": 20}
    assert stats["time_to_surface"]["count"] == 20 and unaccounted(stats) == 0


def test_what_the_matcher_cannot_certify_goes_to_the_filter(listener: FilteredListener) -> None:
    port = listener.getsockname()[1]
    client = socket.create_connection(("127.0.0.1", port))
    client.sendall(HEAD[:10])  # incomplete: held, the filter decides on each arrival
    wait_for(lambda: listener.stats()["waiting_with_data"] == 1 or listener.stats()["held"] == 1, timeout=10)
    client.sendall(HEAD[10:])
    conn, _ = listener.accept()
    info = acceptfilter.connection_info(conn)
    assert info is not None and info.reason == "ready" and info["target"] == "/fast"
    assert conn.recv(4096) == HEAD
    assert CountingHttp.checks >= 1  # the partial head was the filter's to judge
    conn.close()
    client.close()
    h09 = socket.create_connection(("127.0.0.1", port))
    h09.sendall(b"GET /old\r\n")  # HTTP/0.9: not the matcher's shape, the filter's rules
    conn, _ = listener.accept()
    info = acceptfilter.connection_info(conn)
    assert info is not None and info.parsed and info["protocol"] == "http/0.9"
    conn.close()
    h09.close()
    assert unaccounted(listener.stats()) == 0


def test_selector_servers_and_the_background_thread_still_get_them(listen_sock: socket.socket, core: str) -> None:
    """Nobody blocked in accept(): the background thread surfaces certified connections (READY events)."""
    import selectors

    CountingHttp.checks = 0
    lst = acceptfilter.wrap(listen_sock, CountingHttp(), core=core)
    try:
        port = lst.getsockname()[1]
        clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(5)]
        for c in clients:
            c.sendall(HEAD)
        sel = selectors.DefaultSelector()
        sel.register(lst, selectors.EVENT_READ)
        got = 0
        lst.setblocking(False)
        while got < 5:
            assert sel.select(10), "the listener's fd never became readable"
            conn, _ = lst.accept()
            with conn:
                assert conn.recv(4096) == HEAD
                info = acceptfilter.connection_info(conn)
                assert info is not None and info["target"] == "/fast"
            got += 1
        assert CountingHttp.checks <= 5  # only the lazy info parse of each; no check per arrival
        for c in clients:
            c.close()
        assert unaccounted(lst.stats()) == 0
    finally:
        lst.close()


DNS_QUERY = bytes.fromhex("001d" "abcd01000001000000000000" "076578616d706c6503636f6d0000010001")


def test_a_length_framed_message_wakes_once_not_per_segment(listen_sock: socket.socket, core: str) -> None:
    """The matcher knows how much more it needs (the DNS length): the core sets SO_RCVLOWAT and
    arrivals in between wake nothing, neither the core nor Python; the application's socket gets
    the default low-water mark back."""
    import time

    lst = acceptfilter.wrap(listen_sock, "dnsready", core=core, timeout=30)
    lst.settimeout(30)
    try:
        client = socket.create_connection(("127.0.0.1", lst.getsockname()[1]))
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        client.sendall(DNS_QUERY[:4])  # the length and two bytes of the id
        wait_for(lambda: lst.stats()["held"] == 1, timeout=20)
        time.sleep(0.05)
        before = lst.stats()["peeks"]
        pieces = [DNS_QUERY[4:10], DNS_QUERY[10:16], DNS_QUERY[16:22], DNS_QUERY[22:28], DNS_QUERY[28:]]
        for piece in pieces[:-1]:
            client.sendall(piece)
            time.sleep(0.02)  # separate segments (not a sync point: nothing waits on it)
        assert lst.stats()["surfaced"] == 0 and lst.stats()["waiting_with_data"] == 0  # no Python woke
        client.sendall(pieces[-1])
        conn, _ = lst.accept()
        with conn:
            assert conn.getsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT) == 1
            assert conn.recv(100) == DNS_QUERY
            info = acceptfilter.connection_info(conn)
            assert info is not None and info["qname"] == "example.com." and info.reason == "ready"
        stats = lst.stats()
        # need is a lower bound per field (header, then the question), so some segments still
        # wake the core; without SO_RCVLOWAT every one of them would (one peek each).
        assert stats["peeks"] - before < len(pieces), f"{stats['peeks'] - before} peeks for {len(pieces)} segments"
        assert unaccounted(stats) == 0
        client.close()
    finally:
        lst.close()


def test_kernel_defer_accept_as_stage_one(listen_sock: socket.socket, core: str) -> None:
    """defer_accept=1: the kernel queues connections that have sent data; idle ones wait there
    (invisible to stats) and are surfaced later with no data, never dropped."""
    lst = acceptfilter.wrap(listen_sock, "httpready", core=core, defer_accept=1, idle_timeout=0.5, on_timeout="surface")
    lst.settimeout(30)
    try:
        assert listen_sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT) >= 1
        port = lst.getsockname()[1]
        idle = socket.create_connection(("127.0.0.1", port))
        with socket.create_connection(("127.0.0.1", port)) as client:
            client.sendall(HEAD)
            conn, _ = lst.accept()
            assert conn.recv(4096) == HEAD
            conn.close()
        conn, _ = lst.accept()  # the idle one: after the kernel's period and the idle limit
        info = acceptfilter.connection_info(conn)
        assert info is not None and info.reason == "timeout"
        idle.sendall(HEAD)  # a load balancer's pre-opened connection still works
        conn.settimeout(10)
        assert conn.recv(4096) == HEAD
        conn.close()
        idle.close()
        assert unaccounted(lst.stats()) == 0
    finally:
        lst.close()


def test_defer_accept_on_a_unix_socket_is_a_clear_error(tmp_path: Any) -> None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(tmp_path / "s"))
    sock.listen()
    with pytest.raises(ValueError, match="cannot set defer_accept=1: TCP_DEFER_ACCEPT is for TCP listeners"):
        acceptfilter.wrap(sock, "httpready", defer_accept=1)
    sock.close()


def test_held_connections_show_while_a_thread_waits_in_accept(listen_sock: socket.socket, core: str) -> None:
    """A thread blocked in accept() (the fast path's own wait) still lets stats() see what it holds."""
    import threading

    lst = acceptfilter.wrap(listen_sock, "httpready", core=core, timeout=30)
    waiter = threading.Thread(target=lambda: _accept_quietly(lst))
    waiter.start()
    clients = [socket.create_connection(("127.0.0.1", lst.getsockname()[1])) for _ in range(20)]
    try:
        try:
            wait_for(lambda: lst.stats()["held"] == 20, timeout=20)
        except AssertionError:
            raise AssertionError(f"stats while a thread waits in accept(): {lst.stats()}") from None
        assert lst.stats()["accepted"] == 20 and unaccounted(lst.stats()) == 0
    finally:
        lst.close()
        waiter.join(10)
        for c in clients:
            c.close()


def _accept_quietly(lst: FilteredListener) -> None:
    try:
        lst.accept()
    except OSError:
        pass  # closed under it at the end of the test


def test_a_thread_driver_attached_later_keeps_the_fast_path(listen_sock: socket.socket, core: str,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """`serve` rebuilds its listener on SIGHUP with driver="none" (to adopt the held connections
    first), then attaches a thread driver: accept() must take certified connections at accept
    again, as a listener built with driver="thread" does."""
    lst = acceptfilter.wrap(listen_sock, CountingHttp(), core=core, driver="none")
    try:
        driver = thread_driver.ThreadDriver(lst.engine)
        driver.start()
        lst.attach_driver(driver)
        stand_background_down(lst, monkeypatch)
        port = lst.getsockname()[1]
        for _ in range(5):
            with socket.create_connection(("127.0.0.1", port)) as client:
                client.sendall(HEAD)
                conn, _ = lst.accept()
                conn.close()
        assert lst.stats()["surfaced_at_accept"] == 5
    finally:
        lst.close()


def test_a_request_that_arrives_while_accept_waits_is_handed_over_directly(
        listener: FilteredListener, monkeypatch: pytest.MonkeyPatch) -> None:
    """The thread in accept() accepted the connection before its request came: the core hands
    it over from the same wait once the matcher certifies it (no event, no filter, no queue),
    with its exact time held."""
    import threading
    import time

    stand_background_down(listener, monkeypatch)
    taken_from_queue = []
    real_get = listener._queue.get_nowait

    def spy() -> Any:
        entry = real_get()
        taken_from_queue.append(entry)
        return entry

    monkeypatch.setattr(listener._queue, "get_nowait", spy)
    listener.settimeout(30)
    got: list[Any] = []
    waiter = threading.Thread(target=lambda: got.append(listener.accept_with_info()))
    waiter.start()
    port = listener.getsockname()[1]
    with socket.create_connection(("127.0.0.1", port)) as client:
        from .conftest import wait_for

        wait_for(lambda: listener.stats()["held"] == 1, timeout=30)  # accepted by the waiting thread
        time.sleep(0.05)
        client.sendall(HEAD)
        waiter.join(30)
        assert got, "accept() did not return"
        conn, addr, info = got[0]
        with conn:
            assert addr == client.getsockname() and conn.recv(4096) == HEAD
            assert info.reason == "ready" and info.held_for >= 0.05 and not info.parsed
    assert not taken_from_queue and CountingHttp.checks == 0
    stats = listener.stats()
    assert stats["surfaced_by_core"] == 1 and stats["surfaced_at_accept"] == 0 and stats["surfaced"] == 1
    assert stats["time_to_surface"]["sum"] >= 0.05 and unaccounted(stats) == 0


def _core_stats(lst: FilteredListener) -> dict[str, Any]:
    return lst.engine._core.saved_stats()  # type: ignore[attr-defined,no-any-return]


def test_the_waiting_thread_reads_the_connection_it_accepted_first(
        listener: FilteredListener, monkeypatch: pytest.MonkeyPatch) -> None:
    """Like a plain server (accept, then read), a thread waiting in accept() that took in a
    connection with no request yet waits on that one, leaving the next in the listen queue,
    then serves them in order: the first with no event and no queue (handed over by the
    core), the second certified at accept. (The wait is made long here to see it; it is 1 ms.)"""
    import threading

    stand_background_down(listener, monkeypatch)
    listener.engine._core.set_direct_wait(30.0, 30.0)  # type: ignore[attr-defined]
    got: list[Any] = []
    waiter = threading.Thread(target=lambda: got.append(listener.accept()))
    waiter.start()
    port = listener.getsockname()[1]
    first = socket.create_connection(("127.0.0.1", port))
    second = socket.create_connection(("127.0.0.1", port))
    try:
        wait_for(lambda: listener.stats()["held"] == 1, timeout=30)
        second.sendall(HEAD)  # complete, but behind the first in the listen queue
        import time

        time.sleep(0.2)
        assert listener.stats()["accepted"] == 1 and not got  # still waiting on the first
        first.sendall(HEAD)
        waiter.join(30)
        assert got, "accept() did not return"
        conn, addr = got[0]
        with conn:
            assert addr == first.getsockname() and conn.recv(4096) == HEAD
        conn, addr = listener.accept()
        with conn:
            assert addr == second.getsockname() and conn.recv(4096) == HEAD
        stats = listener.stats()
        assert stats["surfaced_by_core"] == 2 and stats["surfaced_at_accept"] == 1 and CountingHttp.checks == 0
        assert _core_stats(listener)["direct_idle"] == 0 and unaccounted(stats) == 0
    finally:
        first.close()
        second.close()


def test_an_idle_client_costs_the_waiting_thread_one_short_wait(
        listener: FilteredListener, monkeypatch: pytest.MonkeyPatch) -> None:
    """The wait on a just-accepted connection is bounded (1 ms): a client that sends nothing
    is then held like any other, and the requests behind it are served. After one such
    client the waiting thread stops waiting so for a while (100 ms), so that a flood of idle
    clients cannot stall it a millisecond each."""
    stand_background_down(listener, monkeypatch)
    port = listener.getsockname()[1]
    idle = socket.create_connection(("127.0.0.1", port))
    try:
        listener.settimeout(0.3)
        with pytest.raises(TimeoutError):
            listener.accept()  # takes in the idle one, waits on it 1 ms, then on everything
        assert listener.stats()["held"] == 1 and _core_stats(listener)["direct_idle"] == 1
        listener.settimeout(10)
        with socket.create_connection(("127.0.0.1", port)) as client:
            client.sendall(HEAD)
            conn, addr = listener.accept()
            with conn:
                assert addr == client.getsockname() and conn.recv(4096) == HEAD
        assert listener.stats()["held"] == 1  # the idle one, still held
    finally:
        idle.close()


def test_a_held_connection_is_not_starved_by_new_ones(listener: FilteredListener,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A held connection whose request has come is served before the connections that
    arrived after it, however many are waiting in the listen queue: with anything held, the
    waiting thread looks at the held ones and the listen queue together, not the listen queue
    first (which left such a connection waiting for as long as new ones kept coming)."""
    import time

    stand_background_down(listener, monkeypatch)
    port = listener.getsockname()[1]
    early = socket.create_connection(("127.0.0.1", port))
    later: list[socket.socket] = []
    try:
        listener.settimeout(0.3)
        with pytest.raises(TimeoutError):
            listener.accept()  # takes in `early`, which has sent nothing: held
        assert listener.stats()["held"] == 1
        for _ in range(20):
            client = socket.create_connection(("127.0.0.1", port))
            client.sendall(HEAD)
            later.append(client)
        early.sendall(HEAD)
        time.sleep(0.2)
        listener.settimeout(10)
        conn, addr = listener.accept()
        with conn:
            assert addr == early.getsockname(), "a newer connection was served first"
        for _ in later:
            listener.accept()[0].close()
    finally:
        early.close()
        for client in later:
            client.close()


@pytest.mark.parametrize("idle_client", [False, True], ids=["nothing-to-accept", "waiting-on-a-new-connection"])
def test_a_signal_interrupts_a_blocking_accept(listen_sock: socket.socket, core: str, idle_client: bool,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """accept() waits in C without the GIL; a signal must still reach its Python handler at
    once (Ctrl-C, a server's SIGTERM handler), as with socket.accept(). Also while the thread
    waits on the connection it just accepted (made long here to be sure to be in it)."""
    import signal
    import threading
    import time

    class Interrupted(Exception):
        pass

    def handler(signum: int, frame: Any) -> None:
        raise Interrupted

    lst = acceptfilter.wrap(listen_sock, "httpready", core=core)
    port = lst.getsockname()[1]
    lst.engine._core.set_direct_wait(30.0, 30.0)  # type: ignore[attr-defined]
    stand_background_down(lst, monkeypatch)
    # If the signal is lost, a complete request ends the wait after 20 s and the test fails.
    rescue = threading.Timer(20, lambda: socket.create_connection(("127.0.0.1", port)).sendall(HEAD))
    idle = socket.create_connection(("127.0.0.1", port)) if idle_client else None
    old = signal.signal(signal.SIGALRM, handler)
    try:
        rescue.start()
        signal.setitimer(signal.ITIMER_REAL, 0.5)
        t0 = time.monotonic()
        with pytest.raises(Interrupted):
            lst.settimeout(None)
            lst.accept()
        assert time.monotonic() - t0 < 10
        if idle_client:
            assert lst.stats()["held"] == 1  # it was waiting on it
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        rescue.cancel()
        lst.close()
        if idle is not None:
            idle.close()


def test_the_python_core_mirrors_the_direct_wait_constants() -> None:
    from acceptfilter._core import lib

    from acceptfilter.pycore import DIRECT_BACKOFF, DIRECT_WAIT

    assert (round(DIRECT_WAIT * 1e6), round(DIRECT_BACKOFF * 1e6)) == (lib.AF_DIRECT_WAIT_US, lib.AF_DIRECT_BACKOFF_US)
