"""Engine counters, the time-to-surface histogram, logging and Prometheus exposition, on both cores."""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Iterator

import pytest

import acceptfilter
from acceptfilter import Decision, Filter, FilteredListener

from .conftest import wait_for

HEAD = b"GET / HTTP/1.1\r\nHost: t\r\n\r\n"


@pytest.fixture
def listener(core: str) -> Iterator[FilteredListener]:
    sock = socket.create_server(("127.0.0.1", 0), backlog=128)
    lst = acceptfilter.wrap(sock, "httpready:non_http=reject", idle_timeout=0.3, on_timeout="surface", core=core)
    yield lst
    lst.close()


def _connect(lst: FilteredListener) -> socket.socket:
    return socket.create_connection(lst.getsockname()[:2], timeout=5)


def _drain(lst: FilteredListener, count: int) -> list[socket.socket]:
    lst.settimeout(5)
    return [lst.accept()[0] for _ in range(count)]


def test_counters_match_what_clients_did(listener: FilteredListener) -> None:
    n_idle, m_ready, k_bad = 3, 4, 2
    idle = [_connect(listener) for _ in range(n_idle)]
    wait_for(lambda: listener.stats()["held"] == n_idle)
    assert listener.stats()["timed_out"] == 0
    ready = [_connect(listener) for _ in range(m_ready)]
    for c in ready:
        c.sendall(HEAD)
    bad = [_connect(listener) for _ in range(k_bad)]
    for c in bad:
        c.sendall(b"\x16\x03\x01\x02\x00 not http at all\r\n\r\n")
    got = _drain(listener, m_ready + n_idle)  # the ready ones first, the idle ones after 0.3 s
    wait_for(lambda: listener.stats()["rejected"] == k_bad)
    s = listener.stats()
    assert s["timed_out"] == n_idle
    assert s["surfaced"] == m_ready + n_idle
    assert s["rejected"] == k_bad
    assert s["held"] == 0 and s["evicted"] == 0 and s["filter_errors"] == 0
    assert s["accepted"] == n_idle + m_ready + k_bad
    assert s["surfaced_by_route"] == {"default": m_ready + n_idle}
    assert s["surfaced_by_reason"].get("ready", 0) >= m_ready
    assert sum(s["surfaced_by_reason"].values()) == m_ready + n_idle
    assert s["bytes_peeked"] >= m_ready * len(HEAD)
    hist = s["time_to_surface"]
    assert hist["count"] == s["surfaced"] == sum(hist["counts"])
    # The idle clients waited at least the 0.3 s deadline: they are in buckets above 0.25 s.
    slow = sum(c for b, c in zip([*hist["buckets"], float("inf")], hist["counts"], strict=True) if b > 0.25)
    assert slow >= n_idle
    assert hist["sum"] >= 0.3 * n_idle
    for sock in got + idle + ready + bad:
        sock.close()


def test_histogram_counts_every_surfaced_connection(listener: FilteredListener) -> None:
    clients = [_connect(listener) for _ in range(10)]
    for c in clients[:9]:
        c.sendall(HEAD)
    got = _drain(listener, 9)
    wait_for(lambda: listener.stats()["held"] == 1)  # the core holds the silent tenth client
    time.sleep(0.15)  # ... which waits before it talks: the histogram must show that wait
    clients[9].sendall(HEAD)
    got += _drain(listener, 1)
    hist = listener.stats()["time_to_surface"]
    assert hist["count"] == 10 == sum(hist["counts"])
    assert hist["sum"] >= 0.15
    assert sum(c for b, c in zip([*hist["buckets"], float("inf")], hist["counts"], strict=True) if b > 0.1) >= 1
    for sock in got + clients:
        sock.close()


class Exploding(Filter):
    """Raises on every byte: a user's bug."""

    name = "exploding"

    def check(self, data: bytes, final: bool) -> Decision:
        if data:
            raise RuntimeError("boom")
        return acceptfilter.REJECT if final else acceptfilter.WAIT


def test_filter_errors_counted_and_warning_rate_limited(core: str, caplog: pytest.LogCaptureFixture) -> None:
    sock = socket.create_server(("127.0.0.1", 0))
    with acceptfilter.wrap(sock, Exploding(), timeout=5, on_error="close", core=core) as lst:
        caplog.set_level(logging.DEBUG, logger="acceptfilter")
        clients = [socket.create_connection(lst.getsockname()[:2]) for _ in range(4)]
        for c in clients:
            c.sendall(b"x")
        wait_for(lambda: lst.stats()["filter_errors"] == 4)
        assert lst.stats()["filter_errors_by_filter"] == {"exploding": 4}
        warnings = [r for r in caplog.records if r.name == "acceptfilter" and r.levelno == logging.WARNING]
        assert len(warnings) == 1, [r.getMessage() for r in warnings]
        for c in clients:
            c.close()


def test_reject_and_timeout_logged_at_debug(listener: FilteredListener, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="acceptfilter")
    with _connect(listener) as bad:
        bad.sendall(b"\x16\x03\x01 tls?\r\n\r\n")
        wait_for(lambda: listener.stats()["rejected"] == 1)
    debug = [r.getMessage() for r in caplog.records if r.name == "acceptfilter" and r.levelno == logging.DEBUG]
    assert any("rejected" in m for m in debug), debug


def test_prometheus_exposition(listener: FilteredListener) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    from acceptfilter.metrics import exposition

    with _connect(listener) as c:
        c.sendall(HEAD)
        (sock,) = _drain(listener, 1)
        sock.close()
    text = exposition(listener, labels={"listener": "web"}).decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    surfaced = families["acceptfilter_surfaced"].samples
    assert [s.value for s in surfaced if s.name == "acceptfilter_surfaced_total"] == [1.0]
    assert surfaced[0].labels == {"listener": "web"}
    hist = families["acceptfilter_time_to_surface_seconds"].samples
    assert [s.value for s in hist if s.name.endswith("_count")] == [1.0]
    assert [s.value for s in hist if s.labels.get("le") == "+Inf"] == [1.0]
    assert families["acceptfilter_held_connections"].samples[0].value == 0.0
    assert [s.value for s in families["acceptfilter_peeked_bytes"].samples] == [float(len(HEAD))]


_FD_SCRIPT = r"""
import logging, os, resource, socket, sys, time
import acceptfilter
logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(name)s %(levelname)s %(message)s")
sock = socket.create_server(("127.0.0.1", 0), backlog=64)
lst = acceptfilter.wrap(sock, "httpready", timeout=30, core=sys.argv[1])
time.sleep(0.2)
used = len(os.listdir("/proc/self/fd"))
resource.setrlimit(resource.RLIMIT_NOFILE, (used + 3, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
print(lst.getsockname()[1], flush=True)
sys.stdin.readline()
time.sleep(2.5)
print(lst.stats()["fd_exhaustion"], lst.stats()["held"], flush=True)
"""


def test_fd_exhaustion_is_counted_and_warned_once(core: str) -> None:
    """A process out of fds: the core pauses accepting, the engine warns, once (rate-limited)."""
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", _FD_SCRIPT, core], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdin is not None
    port = int(proc.stdout.readline())
    clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(12)]
    proc.stdin.write("go\n")
    proc.stdin.flush()
    out, err = proc.communicate(timeout=20)
    exhausted, held = (int(x) for x in out.split())
    assert exhausted > 0, err
    assert held <= 4
    assert err.count("out of file descriptors") == 1, err
    for c in clients:
        c.close()
