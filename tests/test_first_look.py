"""A gunicorn worker's first look (FirstLookListener), with the C look (acceptfilter._look) and the Python one.

Real sockets on loopback; the filter process's side of the hand-off is a socket
pair whose other end the test reads. What the matcher certifies is served at once
with its info parsed lazily; what is incomplete goes to the filter process
undecided and unread; garbage is rejected; a client gone before its first byte is
skipped; an empty listen queue is BlockingIOError.
"""

from __future__ import annotations

import socket
import time
import weakref
from collections.abc import Iterator
from typing import Any

import pytest

import acceptfilter
from acceptfilter.decision import Decider
from acceptfilter.integrations.gunicorn.first_look import FirstLookListener
from acceptfilter.integrations.gunicorn.supervisor import _compiled_matcher
from acceptfilter.integrations.handoff import receive_fds
from acceptfilter.matcher import Program
from acceptfilter.policy import Policy, Route
from acceptfilter.registry import load_chain

from .conftest import open_fds, wait_for

HEAD = b"GET /look HTTP/1.1\r\nHost: example.test\r\n\r\n"


@pytest.fixture(params=["c", "python"])
def look(request: pytest.FixtureRequest) -> Iterator[tuple[FirstLookListener, socket.socket, socket.socket]]:
    """(the worker's listener, the listen socket, the filter process's end of the offload channel)."""
    listen = socket.create_server(("127.0.0.1", 0), backlog=64)
    route = Route("default", load_chain("httpready"))
    matcher: Any = _compiled_matcher(route)
    if request.param == "python":
        matcher = matcher.program if not isinstance(matcher, Program) else matcher
    ready_recv, ready_send = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    offload_send, offload_recv = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    lst = FirstLookListener(ready_recv, listen, listen=listen, offload=offload_send, decider=Decider((route,)),
                            policy=Policy.build(), max_bytes=route.max_bytes, matcher=matcher)
    assert (lst._looker is not None) == (request.param == "c")
    yield lst, listen, offload_recv
    lst.close()
    for s in (listen, ready_recv, ready_send, offload_send, offload_recv):
        s.close()


def _wait_queued(listen: socket.socket, n: int) -> None:
    from acceptfilter import diag

    wait_for(lambda: diag.inspect(listen).accept_queue >= n, timeout=30)


def test_a_complete_head_is_served_at_once_with_lazy_info(look: Any) -> None:
    lst, listen, offload = look
    clients = [socket.create_connection(listen.getsockname()) for _ in range(3)]
    for c in clients:
        c.sendall(HEAD)
    time.sleep(0.05)
    for _ in clients:
        conn, addr, info = lst.accept_with_info()
        with conn:
            assert addr in {x.getsockname() for x in clients} and info.peer == addr
            assert info.reason == "ready" and not info.parsed
            assert conn.gettimeout() is None and conn.recv(4096) == HEAD  # blocking, every byte still there
            assert acceptfilter.connection_info(conn) is info
            assert info["target"] == "/look" and info.parsed
    assert receive_fds(offload) == []  # nothing went to the filter process
    for c in clients:
        c.close()


def test_accept_builds_the_info_only_when_asked(look: Any) -> None:
    """accept(), what gunicorn calls, keeps only the makings of a certified connection's info:
    connection_info() builds it on first use, once, and it matches accept_with_info()'s."""
    from acceptfilter import listener as listener_module

    lst, listen, offload = look
    clients = [socket.create_connection(listen.getsockname()) for _ in range(2)]
    for c in clients:
        c.sendall(HEAD)
    _wait_queued(listen, 2)
    conn, addr = lst.accept()
    conn2, _, eager = lst.accept_with_info()
    with conn, conn2:
        if lst._looker is not None:  # the C look keeps a tuple until asked
            assert isinstance(listener_module._info_by_socket[weakref.ref(conn)], tuple)
        info = acceptfilter.connection_info(conn)
        assert info is not None and acceptfilter.connection_info(conn) is info  # built once
        assert info.reason == "ready" and info.peer == addr and info.route == eager.route
        assert info["target"] == "/look" and dict(info) == dict(eager)
        assert conn.recv(4096) == HEAD
    assert receive_fds(offload) == []
    for c in clients:
        c.close()


def test_an_incomplete_head_goes_to_the_filter_process_unread(look: Any) -> None:
    lst, listen, offload = look
    client = socket.create_connection(listen.getsockname())
    client.sendall(HEAD[:12])
    idle = socket.create_connection(listen.getsockname())  # nothing sent yet: held elsewhere too
    _wait_queued(listen, 2)
    time.sleep(0.05)
    with pytest.raises(BlockingIOError):
        lst.accept_with_info()  # both handed off; then the listen queue is empty
    fds = receive_fds(offload)
    assert len(fds) == 2
    held = [socket.socket(fileno=fd) for fd in fds]
    peers = {h.getpeername() for h in held}
    assert peers == {client.getsockname(), idle.getsockname()}
    for h in held:
        if h.getpeername() == client.getsockname():
            assert h.recv(100, socket.MSG_PEEK) == HEAD[:12]  # unread: the filter process sees byte 0
        h.close()
    client.close()
    idle.close()


def test_garbage_is_rejected_and_a_client_gone_before_a_byte_is_skipped(look: Any) -> None:
    lst, listen, offload = look
    before = open_fds()
    gone = socket.create_connection(listen.getsockname())
    gone.close()
    garbage = socket.create_connection(listen.getsockname())
    garbage.sendall(b"\x00\x01\x02 not http\r\n\r\n")
    good = socket.create_connection(listen.getsockname())
    good.sendall(HEAD)
    _wait_queued(listen, 3)
    time.sleep(0.05)
    conn, addr, info = lst.accept_with_info()  # the first two never reach the application
    assert addr == good.getsockname() and info["target"] == "/look"
    conn.close()
    garbage.settimeout(10)
    assert garbage.recv(10) == b""  # rejected: closed, a clean FIN (what it sent was read)
    assert receive_fds(offload) == []
    garbage.close()
    good.close()
    wait_for(lambda: open_fds() <= before, timeout=10)
