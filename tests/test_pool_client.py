"""A balancer's pool against every server model with DEFAULT settings: every request answered.

Issue 23: with the old defaults a connection pre-opened by a balancer and used
after 8 s got an empty reply (0 of 500). Each server runs as a user would start
it (gunicorn ``-c python:acceptfilter.gunicorn`` with only
``ACCEPTFILTER_FILTER=httpready``, waitress through its integration, ``serve``
and ``run -- uvicorn`` with no options); the pool (tests' and users' helper:
:mod:`acceptfilter.testing.pool`) leaves each connection idle longer than the
old 5 s deadline, then uses it twice. Light traffic alone, then while 1,000 idle
+ 200 slowloris connections attack from another address (127.0.0.2), with the
server at ``ulimit -n 1024``, the common default, so its fd-derived max_held is
smaller than the attack and holding it takes evictions, by source.
"""

from __future__ import annotations

import socket
import tempfile
import threading
from collections.abc import Callable
from contextlib import ExitStack

import pytest

from acceptfilter.testing.pool import BalancerPool, PoolReport

pytest.importorskip("gunicorn", reason="gunicorn is not installed (the test extra)")
pytest.importorskip("waitress", reason="waitress is not installed (the test extra)")
pytest.importorskip("uvicorn", reason="uvicorn is not installed (the test extra)")

from bench.defaults import start_server
from bench.slowclient import start_attack

MODELS = ["gunicorn-sync", "gunicorn-gthread", "waitress", "serve", "uvicorn"]
#: Longer than the old 5 s deadline, spread so the connections are used one after another.
IDLE = [5.5 + i * 0.1 for i in range(10)]


def _pool(port: int) -> PoolReport:
    return BalancerPool(("127.0.0.1", port), size=len(IDLE), idle=IDLE, uses=2, timeout=60).run()


def _check(report: PoolReport) -> None:
    assert report.all_answered and report.unanswered == 0, report
    assert set(report.statuses) == {200}, report


@pytest.mark.parametrize("model", MODELS)
def test_pool_is_answered_with_default_settings(model: str) -> None:
    with tempfile.TemporaryDirectory(prefix="af-pool-") as tmp, ExitStack() as stack:
        port, error = start_server(stack, model, tmp)
        assert not error, error
        _check(_pool(port))


@pytest.mark.parametrize("model", MODELS)
def test_pool_is_answered_under_attack_from_one_address(model: str) -> None:
    with tempfile.TemporaryDirectory(prefix="af-pool-") as tmp, ExitStack() as stack:
        port, error = start_server(stack, model, tmp, nofile=1024)
        assert not error, error
        attack, said = start_attack(stack, port, idle=1000, slowloris=200, seconds=300)
        assert said.get("opened", 0) >= 1000, said
        _check(_pool(port))
        assert attack.poll() is None  # the attack went on for the whole time


@pytest.mark.parametrize("model", ["waitress", "serve"])
def test_pool_is_answered_past_descriptor_1024(model: str) -> None:
    """1,100 idle connections held in the server's process: what it is handed has descriptors past
    1023, where select() fails (waitress's default loop died on the first request)."""
    with tempfile.TemporaryDirectory(prefix="af-pool-") as tmp, ExitStack() as stack:
        port, error = start_server(stack, model, tmp)
        assert not error, error
        for _ in range(1100):
            stack.enter_context(socket.create_connection(("127.0.0.1", port), timeout=30))
        report = BalancerPool(("127.0.0.1", port), size=5, idle=0.5, uses=2, timeout=60).run()
        _check(report)


# -- the pool itself: it must see what a balancer would suffer -------------------------------
def _raw_server(handle: Callable[[socket.socket], None]) -> tuple[socket.socket, threading.Thread]:
    """A listener whose every connection is given to ``handle`` on its own thread."""
    lsock = socket.create_server(("127.0.0.1", 0), backlog=64)

    def loop() -> None:
        while True:
            try:
                conn, _ = lsock.accept()
            except OSError:
                return
            threading.Thread(target=handle, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    return lsock, thread


def test_pool_counts_a_request_on_a_connection_closed_while_idle() -> None:
    """The old failure: the server closes a pre-opened connection that sent nothing (a FIN). Whether
    the FIN arrives before the pool's send or after, that request gets no answer, and is counted."""
    lsock, _ = _raw_server(lambda conn: conn.close())
    with lsock:
        report = BalancerPool(lsock.getsockname(), size=3, idle=0.0, uses=1, timeout=10).run()
    assert (report.sent, report.answered, report.unanswered) == (3, 0, 3), report
    assert not report.all_answered and report.errors


def test_pool_reopens_after_connection_close_and_after_the_servers_keepalive_timeout() -> None:
    def answer_once(conn: socket.socket) -> None:
        with conn:
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = conn.recv(4096)
                if not chunk:
                    return
                data += chunk
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")  # keep-alive... then closed anyway

    lsock, _ = _raw_server(answer_once)
    with lsock:
        report = BalancerPool(lsock.getsockname(), size=2, idle=0.0, uses=3, reuse_idle=1.0, timeout=10).run()
    # Each reuse finds the connection closed (a balancer's liveness check) and opens a new one. The second
    # between uses is for the server's FIN: with none, a reuse could check before the FIN arrived, send on
    # the closed connection and count it unanswered (then the next use opens fresh, uncounted), which made
    # an exact count depend on the scheduler.
    assert report.sent == 6 and report.answered == 6, report
    assert report.server_closed == 4 and report.unanswered == 0, report


def test_pool_counts_what_it_could_not_send() -> None:
    """Nothing listening: no request sent, every connection a connect error, nothing 'all answered'."""
    with socket.create_server(("127.0.0.1", 0)) as probe:
        address = probe.getsockname()
    report = BalancerPool(address, size=3, idle=0.0, uses=2, timeout=10).run()
    assert (report.planned, report.sent, report.connect_errors) == (6, 0, 6) and not report.all_answered, report


def test_pool_reuses_a_connection_the_server_keeps_open() -> None:
    """A balancer reuses a live keep-alive connection: one connection per pool slot, every use answered on it.

    Before: the liveness check peeked on a socket with a timeout, which Python waits on until readable; a live
    connection cost the whole timeout, then counted as closed by the server and was reopened (every server
    model's pool test ran ten times longer with a server that keeps connections, and tested no reuse).
    """
    accepted: list[int] = []

    def keep_alive(conn: socket.socket) -> None:
        accepted.append(1)
        with conn:
            data = b""
            while True:
                while b"\r\n\r\n" not in data:
                    chunk = conn.recv(4096)
                    if not chunk:
                        return
                    data += chunk
                _, _, data = data.partition(b"\r\n\r\n")
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    lsock, _ = _raw_server(keep_alive)
    with lsock:
        report = BalancerPool(lsock.getsockname(), size=3, idle=0.0, uses=3, reuse_idle=0.0, timeout=5).run()
    assert report.all_answered and report.sent == 9 and report.server_closed == 0, report
    assert len(accepted) == 3, f"{len(accepted)} connections for 3 pool slots: the pool reopened live ones"
