"""The kernel view (acceptfilter.diag) against real listeners on loopback."""

from __future__ import annotations

import socket

import pytest

from acceptfilter import diag
from acceptfilter.errors import AcceptFilterError

from .conftest import wait_for


@pytest.mark.parametrize("family,host", [(socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")])
def test_accept_queue_rises_and_falls(family: int, host: str) -> None:
    """Nobody accepts: the queue grows by one per client; accepting drains it."""
    try:
        server = socket.create_server((host, 0), family=family, backlog=64)
    except OSError as exc:  # pragma: no cover - a host without IPv6
        pytest.skip(f"no {host}: {exc}")
    clients: list[socket.socket] = []
    with server:
        assert diag.inspect(server).accept_queue == 0
        for _ in range(5):
            clients.append(socket.create_connection(server.getsockname()[:2]))
        wait_for(lambda: diag.inspect(server).accept_queue == 5)
        view = diag.inspect(server)
        assert view.family == ("ipv4" if family == socket.AF_INET else "ipv6")
        assert view.address == host
        assert view.port == server.getsockname()[1]
        assert view.backlog == 64
        accepted = [server.accept()[0] for _ in range(3)]
        assert diag.inspect(server).accept_queue == 2
        accepted += [server.accept()[0] for _ in range(2)]
        assert diag.inspect(server).accept_queue == 0
        for s in accepted + clients:
            s.close()


def test_backlog_truncation_is_reported() -> None:
    with open("/proc/sys/net/core/somaxconn") as f:
        limit = int(f.read())
    requested = limit + 1000
    with socket.create_server(("127.0.0.1", 0), backlog=requested) as server:
        view = diag.inspect(server, requested_backlog=requested)
        assert view.backlog == limit
        assert view.somaxconn == limit
        assert view.truncated
        assert view.warnings and str(requested) in view.warnings[0] and "somaxconn" in view.warnings[0]
        d = view.to_dict()
        assert d["truncated"] is True and d["requested_backlog"] == requested


def test_no_warning_when_backlog_fits() -> None:
    with socket.create_server(("127.0.0.1", 0), backlog=16) as server:
        view = diag.inspect(server, requested_backlog=16)
        assert view.backlog == 16
        assert not view.truncated and view.warnings == ()


def test_overflow_counts_per_listener_drops() -> None:
    """A full accept queue makes the kernel drop SYNs: sk_drops and ListenOverflows both rise."""
    before = diag.listen_counters()
    clients: list[socket.socket] = []
    with socket.create_server(("127.0.0.1", 0), backlog=1) as server:
        assert diag.inspect(server).drops == 0
        for _ in range(8):
            c = socket.socket()
            c.setblocking(False)
            c.connect_ex(server.getsockname())
            clients.append(c)
        wait_for(lambda: (diag.inspect(server).drops or 0) > 0)
        view = diag.inspect(server)
        assert view.accept_queue <= view.backlog + 1
        after = diag.listen_counters()
        assert after["listen_overflows"] > before["listen_overflows"]
        assert after["listen_drops"] > before["listen_drops"]
    for c in clients:
        c.close()


def test_listeners_by_port_and_host() -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        views = diag.listeners(port)
        assert [v.inode for v in views] == [diag.inspect(server).inode]
        assert diag.listeners(port, host="127.0.0.1")[0].port == port
        assert diag.listeners(port, host="::1") == []
        assert any(v.port == port for v in diag.listeners())


def test_unknown_listener_is_a_clear_error() -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))  # bound but not listening
    with sock, pytest.raises(AcceptFilterError, match="listening"):
        diag.inspect(sock)
    with pytest.raises(diag.DiagError, match="resolve"):
        diag.listeners(1, host="no-such-host.invalid")


def test_syn_recv_counts_connections_held_by_defer_accept() -> None:
    """TCP_DEFER_ACCEPT keeps data-less handshakes in SYN_RECV; sending data moves them to the queue."""
    with socket.create_server(("127.0.0.1", 0), backlog=16) as server:
        server.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, 5)
        clients = [socket.create_connection(server.getsockname()) for _ in range(3)]
        wait_for(lambda: diag.inspect(server).syn_recv == 3)
        assert diag.inspect(server).accept_queue == 0
        clients[0].sendall(b"x")
        wait_for(lambda: diag.inspect(server).accept_queue == 1)
        assert diag.inspect(server).syn_recv == 2
        for c in clients:
            c.close()
