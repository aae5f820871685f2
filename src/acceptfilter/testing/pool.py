"""A client that uses connections the way a load balancer's pool does, to test a deployment with.

Balancers (HAProxy, Envoy, nginx ``keepalive``, cloud balancers) open back-end
connections ahead of need, leave them idle until traffic comes, and reuse a
connection after a keep-alive response. A server that closes a connection it
thinks idle while the balancer sends on it gives that request an empty reply:
the failure accept filters became infamous for (``TCP_DEFER_ACCEPT`` behind
Juniper DX balancers). :class:`BalancerPool` reproduces that use::

    from acceptfilter.testing.pool import BalancerPool
    report = BalancerPool(("127.0.0.1", 8000), size=20, idle=8.0).run()
    assert report.unanswered == 0, report

* every connection is opened before any is used;
* connection ``i`` is first used after its own idle time (``idle`` or ``idle[i]``),
  without a liveness check: a request sent on a pre-opened connection must be answered;
* after a keep-alive response it is used again ``uses - 1`` times, ``reuse_idle``
  seconds apart. Before a reuse it checks, as balancers do, whether the server
  closed the connection in the meantime (its own keep-alive timeout): then it
  opens a new one (counted in ``server_closed``), and that request too must be
  answered. After a ``Connection: close`` response it opens a new one (``closed_by_response``).

Standard library only (``http.client`` parses the responses); one thread per connection.
"""

from __future__ import annotations

import http.client
import socket
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

__all__ = ["BalancerPool", "PoolReport"]


@dataclass
class PoolReport:
    """What happened to every request the pool sent."""

    #: Requests the pool meant to send: size x uses.
    planned: int = 0
    sent: int = 0
    #: A whole response came back.
    answered: int = 0
    #: Sent on an open connection, and no response came back: an empty reply, a reset, a timeout.
    unanswered: int = 0
    #: Reuses the server had closed (its keep-alive timeout), found before sending: reopened.
    server_closed: int = 0
    #: Connections not reused because the response said ``Connection: close``.
    closed_by_response: int = 0
    #: Connections that could not be opened at all.
    connect_errors: int = 0
    #: A pool thread that failed in its own code (a bug here, not the server's doing).
    client_errors: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    #: The first few failures, as text.
    errors: list[str] = field(default_factory=list)

    @property
    def all_answered(self) -> bool:
        return (self.sent == self.planned > 0 and self.answered == self.sent and self.connect_errors == 0
                and self.client_errors == 0)


class BalancerPool:
    """``size`` connections to ``address``, opened ahead, each used after its idle time; see the module."""

    def __init__(
        self,
        address: tuple[str, int],
        *,
        size: int,
        idle: float | Sequence[float],
        uses: int = 2,
        reuse_idle: float = 0.2,
        path: str = "/",
        host: str = "pool",
        timeout: float = 30.0,
        source: str | None = None,
    ) -> None:
        if size < 1 or uses < 1:
            raise ValueError("size and uses must be at least 1")
        idles = [float(idle)] * size if isinstance(idle, int | float) else [float(x) for x in idle]
        if len(idles) != size:
            raise ValueError(f"idle has {len(idles)} times for {size} connections")
        self.address = address
        self.size = size
        self.idles = idles
        self.uses = uses
        self.reuse_idle = reuse_idle
        self.path = path
        self.host = host
        self.timeout = timeout
        self.source = source
        self._lock = threading.Lock()
        self._report = PoolReport()

    # -- connections ---------------------------------------------------------------------
    def _open(self) -> socket.socket | None:
        try:
            sock = socket.create_connection(self.address, timeout=self.timeout,
                                            source_address=(self.source, 0) if self.source else None)
        except OSError as exc:
            self._count("connect_errors", f"connect: {exc}")
            return None
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    @staticmethod
    def _closed_by_peer(sock: socket.socket) -> bool:
        """A balancer's liveness check before reusing: readable with nothing to read means a FIN or RST.
        (No select(): it fails on descriptors past 1023.)

        Non-blocking for the peek: on a socket with a timeout, Python waits for it to be readable
        before any recv, MSG_DONTWAIT or not, so a live idle connection cost the whole timeout and
        then counted as closed (a TimeoutError is an OSError), and the pool reopened instead of reusing.
        """
        timeout = sock.gettimeout()
        sock.setblocking(False)
        try:
            return sock.recv(1, socket.MSG_PEEK) == b""
        except BlockingIOError:
            return False
        except OSError:
            return True
        finally:
            sock.settimeout(timeout)

    def _count(self, name: str, error: str | None = None) -> None:
        with self._lock:
            setattr(self._report, name, getattr(self._report, name) + 1)
            if error is not None and len(self._report.errors) < 20:
                self._report.errors.append(error)

    def _request(self, sock: socket.socket) -> bool | None:
        """One keep-alive GET on ``sock``: True if the connection may be reused, False if the
        response said close, None if no response came."""
        conn = http.client.HTTPConnection(*self.address, timeout=self.timeout)
        conn.sock = sock  # the pool's connection, as it is: no new connect
        with self._lock:
            self._report.sent += 1
        try:
            conn.request("GET", self.path, headers={"Host": self.host, "Connection": "keep-alive"})
            response = conn.getresponse()
            response.read()
        except (OSError, http.client.HTTPException) as exc:
            self._count("unanswered", f"{type(exc).__name__}: {exc}")
            return None
        with self._lock:
            self._report.answered += 1
            self._report.statuses[response.status] += 1
        return not response.will_close

    def _one(self, index: int, sock: socket.socket | None, start: float) -> None:
        held = [sock]  # the connection open now, closed at the end whatever happened
        try:
            self._use(index, held, start)
        except Exception as exc:  # counted: a thread that died would send less and hide it
            self._count("client_errors", f"pool thread {index}: {type(exc).__name__}: {exc}")
        finally:
            if held[0] is not None:
                held[0].close()

    def _use(self, index: int, held: list[socket.socket | None], start: float) -> None:
        """Connection ``index``'s requests (``held[0]``: its socket, replaced when reopened)."""
        delay = start + self.idles[index] - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        for use in range(self.uses):
            sock = held[0]
            if sock is not None and use and self._closed_by_peer(sock):
                self._count("server_closed")
                sock.close()
                sock = held[0] = None
            if sock is None:
                sock = held[0] = self._open()
                if sock is None:
                    return
            reusable = self._request(sock)
            if not reusable:
                sock.close()
                held[0] = None
                if reusable is False and use + 1 < self.uses:
                    self._count("closed_by_response")
            if use + 1 < self.uses:
                time.sleep(self.reuse_idle)

    def run(self) -> PoolReport:
        """Open every connection, use them as described, and report (blocks until all are done)."""
        self._report.planned = self.size * self.uses
        socks = [self._open() for _ in range(self.size)]
        start = time.monotonic()
        threads = [threading.Thread(target=self._one, args=(i, s, start), daemon=True) for i, s in enumerate(socks)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return self._report
