"""adopt() and detach_held(): connections accepted elsewhere, held and handed on (both cores)."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator

import pytest

import acceptfilter

from .conftest import open_fds


@pytest.fixture
def elsewhere() -> Iterator[socket.socket]:
    """A second listening socket: where 'another process' accepted the connections."""
    sock = socket.create_server(("127.0.0.1", 0))
    yield sock
    sock.close()


def _connection(elsewhere: socket.socket, payload: bytes) -> tuple[socket.socket, int]:
    client = socket.create_connection(elsewhere.getsockname())
    server_side, _ = elsewhere.accept()
    if payload:
        client.sendall(payload)
    return client, server_side.detach()


def _run(listener: acceptfilter.FilteredListener, rounds: int = 5) -> None:
    for _ in range(rounds):
        listener.engine.step(0.02)


def test_an_adopted_connection_is_filtered_like_an_accepted_one(core: str, listen_sock: socket.socket,
                                                                elsewhere: socket.socket) -> None:
    listener = acceptfilter.wrap(listen_sock, "httpready", core=core, driver="none", timeout=5)
    listener.setblocking(False)
    try:
        ready_client, ready_fd = _connection(elsewhere, b"GET /now HTTP/1.1\r\nHost: a\r\n\r\n")
        slow_client, slow_fd = _connection(elsewhere, b"GET /later HTTP/1.1\r\n")
        time.sleep(0.05)
        listener.adopt(ready_fd)
        listener.adopt(slow_fd)
        _run(listener)
        conn, addr, info = listener.accept_with_info()
        assert info.info["target"] == "/now" and addr == ready_client.getsockname()
        assert conn.recv(100).startswith(b"GET /now")  # nothing consumed
        with pytest.raises(BlockingIOError):
            listener.accept()  # /later is still held
        slow_client.sendall(b"Host: b\r\n\r\n")
        _run(listener)
        later, _, info = listener.accept_with_info()
        assert info.info["target"] == "/later"
        stats = listener.stats()
        assert stats["accepted"] == 2 == stats["surfaced"] and stats["held"] == 0  # the accounting adds up
        for s in (conn, later, ready_client, slow_client):
            s.close()
    finally:
        listener.close()


def test_adopt_refuses_what_is_not_a_connected_socket_and_leaves_it_to_the_caller(core: str,
                                                                                 listen_sock: socket.socket) -> None:
    listener = acceptfilter.wrap(listen_sock, "dataready", core=core, driver="none")
    fd = os.open(os.devnull, os.O_RDONLY)
    unconnected = socket.socket()
    try:
        with pytest.raises(OSError):
            listener.adopt(fd)
        with pytest.raises(OSError):
            listener.adopt(unconnected.fileno())
        os.fstat(fd)  # still open: the caller's
        assert listener.stats()["held"] == 0
    finally:
        os.close(fd)
        unconnected.close()
        listener.close()


def test_adopt_needs_the_engine_thread(listen_sock: socket.socket, elsewhere: socket.socket) -> None:
    listener = acceptfilter.wrap(listen_sock, "dataready")  # a thread driver runs the engine
    client, fd = _connection(elsewhere, b"")
    try:
        with pytest.raises(ValueError, match="driver='none'"):
            listener.adopt(fd)
    finally:
        os.close(fd)
        client.close()
        listener.close()


def test_adopting_past_max_held_evicts_the_oldest_with_the_timeout_policy(core: str, listen_sock: socket.socket,
                                                                           elsewhere: socket.socket) -> None:
    listener = acceptfilter.wrap(listen_sock, "httpready", core=core, driver="none", max_held=2, on_timeout="close")
    clients = []
    try:
        for _ in range(3):
            client, fd = _connection(elsewhere, b"GET / HTTP/1.1\r\n")
            clients.append(client)
            listener.adopt(fd)
            time.sleep(0.01)
        _run(listener)
        stats = listener.stats()
        assert (stats["evicted"], stats["held"]) == (1, 2)
        clients[0].settimeout(2)
        assert clients[0].recv(1) == b""  # the oldest got a FIN
    finally:
        for c in clients:
            c.close()
        listener.close()


def test_detach_held_hands_connections_on_undecided_and_unconsumed(core: str, listen_sock: socket.socket,
                                                                   elsewhere: socket.socket) -> None:
    first = acceptfilter.wrap(listen_sock, ["proxy:trusted=127.0.0.0/8", "httpready"], core=core, driver="none")
    other = socket.create_server(("127.0.0.1", 0))
    second = acceptfilter.wrap(other, ["proxy:trusted=127.0.0.0/8", "httpready"], core=core, driver="none")
    second.setblocking(False)
    before = open_fds()
    client, fd = _connection(elsewhere, b"PROXY TCP4 198.51.100.1 10.0.0.1 4000 80\r\nGET /moved HTTP/1.1\r\n")
    try:
        first.adopt(fd)
        _run(first)
        assert first.stats()["held"] == 1
        fds = first.detach_held()
        assert len(fds) == 1 and first.stats()["detached"] == 1 and first.stats()["held"] == 0
        second.adopt(fds[0])  # the PROXY header was not consumed: the new holder parses it again
        client.sendall(b"Host: m\r\n\r\n")
        _run(second)
        conn, addr, info = second.accept_with_info()
        assert addr == ("198.51.100.1", 4000) and info.info["target"] == "/moved"
        conn.close()
    finally:
        client.close()
        first.close()
        second.close()
    assert open_fds() <= before | {listen_sock.fileno()}


def test_first_look_decides_on_bytes_already_there() -> None:
    """A worker's first look goes through the engine's own decision rules (Decider.look)."""
    from acceptfilter.decision import Decider, Phase
    from acceptfilter.policy import Route
    from acceptfilter.registry import load_chain

    from .broken_filters import Raises

    single = Decider((Route("web", load_chain("httpready")),))
    ready = single.look(b"GET /a HTTP/1.1\r\nHost: h\r\n\r\n")
    assert ready is not None
    assert (ready.phase, ready.route, ready.consume, ready.info["target"]) == (Phase.ACCEPTED, "web", 0, "/a")
    assert single.look(b"GET /a HTTP/1.1\r\n") is None  # wants more
    garbage = single.look(b"\x16\x03\x01garbage")
    assert garbage is not None and garbage.phase is Phase.REJECTED  # not HTTP: rejected by default
    passing = Decider((Route("web", load_chain("httpready:non_http=accept")),)).look(b"\x16\x03\x01garbage")
    assert passing is not None and passing.phase is Phase.ACCEPTED  # FreeBSD's pass, on request
    peer = ("127.0.0.1", 40000)
    chain = Decider((Route("web", load_chain(["proxy:trusted=127.0.0.0/8", "httpready"])),))
    header = b"PROXY TCP4 192.0.2.1 10.0.0.1 1111 80\r\n"
    proxied = chain.look(header + b"GET /b HTTP/1.1\r\n\r\n", peer)
    assert proxied is not None and proxied.phase is Phase.ACCEPTED
    assert (proxied.consume, proxied.info["client_address"]) == (len(header), ("192.0.2.1", 1111))
    missing = chain.look(b"GET /b HTTP/1.1\r\n\r\n", peer)
    assert missing is not None and missing.phase is Phase.REJECTED  # no header
    untrusted = chain.look(header + b"GET /b HTTP/1.1\r\n\r\n", ("192.0.2.9", 40000))
    assert untrusted is not None and untrusted.phase is Phase.REJECTED
    reports: list[str] = []
    raising = Decider((Route("web", (Raises(),)),), on_error=lambda name, what, exc: reports.append(name))
    failed = raising.look(b"a line with too many words\n")
    assert failed is not None and failed.phase is Phase.FAILED and failed.filter == reports[0]
