"""A peer that resets or leaves mid-request before a decision is ``aborted``, never ``failed``.

HAProxy's ``check-send-proxy`` health checks connect, send a PROXY header and
reset, once per ``inter``: counted ``failed`` they paged whoever alerts on
``acceptfilter_failed_total``. ``failed`` keeps meaning a filter error or a
fault on this side. Real sockets on loopback, both I/O cores, a real HAProxy.
"""

from __future__ import annotations

import shutil
import socket
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import acceptfilter
from acceptfilter import FilteredListener
from acceptfilter.cli.serve import status_line
from acceptfilter.engine import unaccounted

from .conftest import free_port, wait_for

HEAD = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
#: What HAProxy's check-send-proxy sends first: a PROXY v2 LOCAL header with no address (16 bytes).
V2_LOCAL = b"\r\n\r\n\x00\r\nQUIT\n" + bytes([0x20, 0x00, 0x00, 0x00])
V1_UNKNOWN = b"PROXY UNKNOWN\r\n"
CHAIN = ["proxy:trusted=127.0.0.0/8", "httpready"]


def reset(client: socket.socket) -> None:
    """Close with an RST (SO_LINGER 0), as HAProxy's checks do."""
    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    client.close()


@pytest.fixture
def listener(listen_sock: socket.socket, core: str) -> Iterator[FilteredListener]:
    with acceptfilter.wrap(listen_sock, CHAIN, core=core, timeout=30) as lst:
        yield lst


def _done(stats: dict[str, Any], accepted: int) -> bool:
    """One snapshot (two stats() calls could straddle an accept)."""
    return bool(stats["accepted"] == accepted and stats["held"] == 0)


def _settled(lst: FilteredListener, accepted: int) -> dict[str, Any]:
    wait_for(lambda: _done(lst.stats(), accepted), timeout=20)
    stats = lst.stats()
    assert unaccounted(stats) == 0, stats
    return stats


@pytest.mark.parametrize("first", [V2_LOCAL, V1_UNKNOWN, b""], ids=["proxy-v2-local", "proxy-v1", "plain"])
def test_health_check_shapes_are_aborted_not_failed(listener: FilteredListener, first: bytes) -> None:
    port = listener.getsockname()[1]
    for _ in range(5):
        client = socket.create_connection(("127.0.0.1", port), timeout=10)
        if first:
            client.sendall(first)
            # The header reaches the core before the RST (HAProxy's order); without
            # this the RST may overtake nothing, which is the plain shape anyway.
            wait_for(lambda: listener.stats()["bytes_peeked"] > 0, timeout=10)
        reset(client)
    stats = _settled(listener, 5)
    assert (stats["aborted"], stats["failed"], stats["rejected"], stats["surfaced"]) == (5, 0, 0, 0), stats


def test_every_way_to_leave_has_its_outcome(listener: FilteredListener) -> None:
    """One of each: the invariant holds with aborted in it, and nothing is failed."""
    port = listener.getsockname()[1]

    def client(data: bytes) -> socket.socket:
        c = socket.create_connection(("127.0.0.1", port), timeout=10)
        if data:
            c.sendall(data)
        return c

    half = client(V2_LOCAL + HEAD)  # a whole request, then a half-close: served
    half.shutdown(socket.SHUT_WR)
    sock, _ = listener.accept()
    with sock:
        sock.settimeout(10)
        assert sock.recv(100) == HEAD
        sock.sendall(b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n")
    assert half.recv(100).startswith(b"HTTP/1.1 204")
    half.close()
    client(b"").close()  # connect, FIN: closed_empty
    unfinished = client(V2_LOCAL + HEAD[:12])  # a FIN in the middle of the head: aborted
    unfinished.shutdown(socket.SHUT_WR)
    local_fin = client(V2_LOCAL)  # a health check that ends with a FIN: aborted too
    local_fin.shutdown(socket.SHUT_WR)
    garbage = client(b"\x16\x03\x01\x00\x05hello")  # not PROXY: rejected by what it is
    garbage.shutdown(socket.SHUT_WR)
    reset(client(V2_LOCAL + HEAD[:5]))  # a reset mid-request: aborted
    stats = _settled(listener, 6)
    got = {k: stats[k] for k in ("surfaced", "closed_empty", "aborted", "rejected", "failed")}
    assert got == {"surfaced": 1, "closed_empty": 1, "aborted": 3, "rejected": 1, "failed": 0}
    for c in (unfinished, local_fin, garbage):
        c.close()


def test_a_filter_error_is_still_failed(listen_sock: socket.socket, core: str) -> None:
    """``failed`` keeps its meaning: here a filter that raises, with on_error=close."""
    from .broken_filters import Raises

    with acceptfilter.wrap(listen_sock, Raises(), core=core, timeout=30, on_error="close") as lst:
        c = socket.create_connection(lst.getsockname(), timeout=10)
        c.sendall(b"NOSPACES\r\n\r\n")  # Raises unpacks the line: ValueError
        wait_for(lambda: _done(lst.stats(), 1), timeout=20)
        stats = lst.stats()
        assert (stats["filter_errors"], stats["dropped"], stats["aborted"]) == (1, 1, 0), stats
        assert unaccounted(stats) == 0
        c.close()


def test_aborted_in_metrics_and_status_line(listener: FilteredListener) -> None:
    pytest.importorskip("prometheus_client", reason="prometheus_client (the prometheus extra) is not installed")
    from acceptfilter.metrics import exposition

    reset(socket.create_connection(listener.getsockname(), timeout=10))
    stats = _settled(listener, 1)
    text = exposition(listener).decode()
    assert "acceptfilter_aborted_total 1.0" in text and "acceptfilter_failed_total 0.0" in text
    line = status_line(stats, None)
    assert "aborted 1 " in line and "failed 0 " in line


@pytest.fixture
def haproxy_exe() -> str:
    exe = shutil.which("haproxy")
    if exe is None:
        pytest.skip("haproxy is not installed (requirements/apt-test.txt)")
    return exe


@pytest.mark.parametrize("proxy", ["send-proxy-v2", "send-proxy"])
def test_real_haproxy_check_send_proxy_is_aborted(listener: FilteredListener, haproxy_exe: str, tmp_path: Path,
                                                   proxy: str) -> None:
    """HAProxy itself, health-checking the filtered port every 100 ms with check-send-proxy."""
    backend = listener.getsockname()[1]
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(
        "defaults\n  mode tcp\n  timeout connect 2s\n  timeout client 5s\n  timeout server 5s\n"
        f"listen fe\n  bind 127.0.0.1:{free_port()}\n"
        f"  server s1 127.0.0.1:{backend} check {proxy} check-send-proxy inter 100ms\n"
    )
    proc = subprocess.Popen([haproxy_exe, "-f", str(cfg), "-db"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for(lambda: listener.stats()["aborted"] >= 5 or proc.poll() is not None, timeout=60)
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else b""
    finally:
        proc.terminate()
        proc.wait(10)
    deadline = time.monotonic() + 20
    while listener.stats()["held"] and time.monotonic() < deadline:
        time.sleep(0.02)
    stats = listener.stats()
    assert stats["aborted"] >= 5 and stats["failed"] == 0 and stats["rejected"] == 0, stats
    assert unaccounted(stats) == 0
