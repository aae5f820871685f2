"""The hand-off channel on its own: real TCP connections passed over a real socket pair."""

from __future__ import annotations

import array
import errno
import os
import socket

import pytest

import acceptfilter
from acceptfilter.engine import ConnectionInfo
from acceptfilter.integrations.handoff import HandoffListener, make_channel, send_connection

from .conftest import open_fds

INFO = ConnectionInfo("default", {"method": "GET", "alpn": ("h2", "http/1.1"), "tlvs": {0x01: b"h2"}}, "ready", 0.25, 0,
                      ("10.0.0.9", 4444))


@pytest.fixture
def tcp_pair() -> tuple[socket.socket, socket.socket, socket.socket]:
    server = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(server.getsockname())
    conn, _ = server.accept()
    yield server, client, conn
    for s in (server, client, conn):
        s.close()


def test_a_connection_and_its_info_cross_the_channel(tcp_pair) -> None:
    server, client, conn = tcp_pair
    send, recv = make_channel()
    listener = HandoffListener(recv, server)
    send_connection(send, conn, ("203.0.113.5", 1234), INFO)
    conn.close()  # the sender's copy: the connection lives on in flight
    got, addr = listener.accept()
    try:
        assert addr == ("203.0.113.5", 1234)
        assert got.family == socket.AF_INET and got.type == socket.SOCK_STREAM
        assert not got.get_inheritable() and os.get_inheritable(got.fileno()) is False
        info = acceptfilter.connection_info(got)
        assert info is not None and info.info["alpn"] == ("h2", "http/1.1") and info.info["tlvs"] == {1: b"h2"}
        assert (info.reason, info.peer, info.held_for) == ("ready", ("10.0.0.9", 4444), 0.25)
        client.sendall(b"ping")
        assert got.recv(4) == b"ping"
        got.sendall(b"pong")
        assert client.recv(4) == b"pong"
        assert listener.getsockname() == server.getsockname() and str(listener) == str(server)
    finally:
        got.close()
        send.close()
        recv.close()


def test_an_empty_channel_says_eagain_without_blocking() -> None:
    send, recv = make_channel()
    listener = HandoffListener(recv, socket.socket())
    with pytest.raises(BlockingIOError):
        listener.accept()
    assert not listener.getblocking()
    send.close()
    with pytest.raises(OSError) as exc:  # every sender gone: a clear error, not a busy loop of EAGAIN
        listener.accept()
    assert exc.value.errno == errno.ECONNABORTED and "filter process" in str(exc.value)
    recv.close()


def test_a_malformed_message_leaks_no_descriptor(tcp_pair) -> None:
    server, _client, conn = tcp_pair
    send, recv = make_channel()
    listener = HandoffListener(recv, server)
    before = open_fds()
    two = array.array("i", [conn.fileno(), conn.fileno()])
    send.sendmsg([b"x"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, two)])  # two fds: not ours
    send_connection(send, conn, ("127.0.0.1", 1), INFO)  # the next good one still arrives
    got, addr = listener.accept()
    got.close()
    assert addr == ("127.0.0.1", 1)
    assert open_fds() - before == set()  # nothing new left open
    send.close()
    recv.close()


def test_a_full_non_blocking_channel_pushes_back(tcp_pair) -> None:
    server, _client, conn = tcp_pair
    send, recv = make_channel()
    send.setblocking(False)
    sent = 0
    with pytest.raises(OSError) as full:
        for _ in range(100_000):
            send_connection(send, conn.fileno(), ("127.0.0.1", 1), INFO)
            sent += 1
    # Out of buffer (EAGAIN), or, for a process without CAP_SYS_RESOURCE, more descriptors
    # in flight than its RLIMIT_NOFILE (ETOOMANYREFS): the filter process treats both as "full".
    assert full.value.errno in (errno.EAGAIN, errno.ETOOMANYREFS)
    assert sent > 100  # room for a real queue of ready connections
    listener = HandoffListener(recv, server)
    for _ in range(sent):
        listener.accept()[0].close()
    with pytest.raises(BlockingIOError):
        listener.accept()
    send.close()
    recv.close()


_AT_THE_FD_LIMIT = r'''
import os, resource, socket, sys
from acceptfilter.integrations.handoff import make_channel, offer_fd, receive_fds

server = socket.create_server(("127.0.0.1", 0))
clients = [socket.create_connection(server.getsockname()) for _ in range(3)]
conns = [server.accept()[0] for _ in clients]
sender, receiver = make_channel()
for conn in conns:
    offer_fd(sender, conn.fileno())
    conn.close()  # the message holds the only server-side reference now
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + 8, hard))
filler = []
try:
    while True:
        filler.append(os.open("/dev/null", os.O_RDONLY))
except OSError:
    pass
dropped = [0]
got = receive_fds(receiver, dropped=dropped)
for fd in filler:
    os.close(fd)
clients[0].settimeout(30)
print(len(got), dropped[0], clients[0].recv(1) == b"")
'''


def test_connections_dropped_at_the_fd_limit_are_counted_not_silent(tmp_path) -> None:
    """A process with no descriptor left receives an SCM_RIGHTS message with its descriptors cut
    off (MSG_CTRUNC): the kernel closes the connections in flight. receive_fds counts every one
    and goes on reading (it stopped at the first, uncounted, as if the sender were gone)."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _AT_THE_FD_LIMIT], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    received, dropped, client_saw_eof = out.stdout.split()
    assert (int(received), int(dropped)) == (0, 3)
    assert client_saw_eof == "True"  # what the lost client saw: the reason it must be counted
