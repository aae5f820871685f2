"""A gunicorn worker's first look: serve at once what is already complete, pass on the rest."""

from __future__ import annotations

import errno
import logging
import select
import socket
import time
from typing import Any

from ...decision import Decider, Phase
from ...engine import ConnectionInfo
from ...events import Address
from ...listener import _UNPARSED, _remember, remember_certified
from ...policy import Policy
from ...pycore import oob_inline
from ..handoff import _DONTWAIT, MAX_LOOKS, HandoffListener, offer_fd

__all__ = ["FirstLookListener"]

log = logging.getLogger("acceptfilter.handoff")

#: Accepts from the listen socket between two looks at the ready channel.
READY_EVERY = 4
#: Most request heads fit: peeking max_bytes (64 KiB) would allocate that much each time.
FIRST_PEEK = 4096
_PEEK = int(socket.MSG_PEEK) | int(socket.MSG_DONTWAIT)
#: What the Python look says when the listen queue is empty.
_EMPTY = object()


class FirstLookListener(HandoffListener):
    """A worker's listener that accepts by itself and serves at once what is already complete.

    On the fast path the worker accepts from the real listen socket, peeks,
    and runs the filters (:meth:`.Decider.look`, the engine's own rules): a connection whose
    request is already complete is served by this worker with no other
    process involved. One that has sent too little goes to the filter process
    over ``offload`` (``SCM_RIGHTS``), which holds it until the filters are
    satisfied or a policy applies, and hands it back through ``channel``;
    those come first, they have waited longest. ``fileno()`` is an epoll fd
    watching both, so gunicorn's ``select()`` wakes for either.
    """

    def __init__(self, channel: socket.socket, listener: Any, *, listen: socket.socket, offload: socket.socket,
                 decider: Decider, policy: Policy, max_bytes: int, matcher: Any = None) -> None:
        super().__init__(channel, listener)
        #: The route's compiled readiness matcher (C, or the Python mirror), if it has one:
        #: a head it certifies is served without running the filter; info is parsed on demand.
        self._matcher = matcher
        self._listen = listen
        self._offload = offload
        self._decider = decider
        self._route_name = decider.routes[0].name  # what a certified head surfaces into
        self._max_bytes = max_bytes
        self._reset_rejects = policy.on_reject.kind == "reset"
        self._surface_overflow = policy.on_timeout.kind == "surface"
        listen.setblocking(False)
        oob_inline(listen)  # what the worker accepts from it has urgent bytes inline, as the cores do
        self._poller = select.epoll()
        self._poller.register(channel.fileno(), select.EPOLLIN)
        self._poller.register(listen.fileno(), select.EPOLLIN)
        self._channel_poll = select.poll()
        self._channel_poll.register(channel.fileno(), select.POLLIN)
        self._overflow_logged = 0.0
        self._since_ready = READY_EVERY
        #: The look in C (acceptfilter._look: accept4, the peek and the compiled matcher in one
        #: call without the GIL, the address and bytes built in C) when the matcher is the C one;
        #: the Python look otherwise.
        self._looker: Any = None
        program = getattr(matcher, "ptr", None)
        if program is not None:
            from ..._look import Looker

            address = int(matcher.ffi.cast("uintptr_t", program))
            self._looker = Looker(address, max(1, max_bytes), matcher)  # the matcher keeps the program alive
        self._family, self._type, self._proto = self._kind

    def fileno(self) -> int:
        return self._poller.fileno()

    def accept(self) -> tuple[socket.socket, Address]:
        # What gunicorn calls. Nobody reads the info here: a connection the matcher certified
        # gets its ConnectionInfo only if connection_info() asks for it.
        got = self._accept(lazy=True)
        return got[0], got[1]

    def accept_with_info(self) -> tuple[socket.socket, Address, ConnectionInfo]:
        conn, addr, info = self._accept(lazy=False)
        assert info is not None  # only lazy=True leaves it out
        return conn, addr, info

    def _accept(self, *, lazy: bool) -> tuple[socket.socket, Address, ConnectionInfo | None]:
        looker = self._looker
        decided: tuple[socket.socket, Address, ConnectionInfo] | object | None
        while True:
            for _ in range(MAX_LOOKS):
                # Ready ones from the filter process waited longest: take them whenever the
                # listen queue is empty, and at least every READY_EVERY accepts.
                if self._since_ready >= READY_EVERY and (got := self._take_ready()) is not None:
                    return got
                if looker is not None:
                    # The C look, inline: this runs per connection in a worker, between gunicorn's
                    # own code, so as few Python calls as will do.
                    looked = looker.look(self._listen.fileno())
                    if looked is None:
                        break
                    self._since_ready += 1
                    fd, addr, data, ready, consume = looked
                    conn = socket.socket(self._family, self._type, self._proto, fd)
                    if ready:
                        if lazy:  # gunicorn's accept(): the info is built if connection_info() asks
                            remember_certified(conn, self._route_name, data, consume, addr, self._decider)
                            return conn, addr, None
                        info = ConnectionInfo(self._route_name, _UNPARSED, "ready", 0.0, consume, addr, data,
                                              self._decider)
                        _remember(conn, info)
                        return conn, addr, info
                    decided = self._decide(conn, addr, data)
                else:
                    decided = self._next_look()
                    if decided is _EMPTY:
                        break
                    self._since_ready += 1
                if decided is not None:
                    return decided  # type: ignore[return-value]
            if (got := self._take_ready()) is not None:
                return got
            if not self._blocking:
                raise BlockingIOError(errno.EAGAIN, "no ready connection")
            self._poller.poll()

    def _next_look(self) -> tuple[socket.socket, Address, ConnectionInfo] | object | None:
        """The next connection from the listen queue, looked at in Python (``_EMPTY``: none is
        waiting); with the C matcher, :meth:`_accept` does the same in one C call."""
        while True:
            try:
                conn, addr = self._listen.accept()
            except BlockingIOError:
                return _EMPTY
            except ConnectionAbortedError:
                continue
            return self._look(conn, addr)

    def _take_ready(self) -> tuple[socket.socket, Address, ConnectionInfo] | None:
        self._since_ready = 0
        if not self._channel_poll.poll(0):
            # Nothing from the filter process (the usual case): one poll, not a channel read
            # that fails and the exceptions around it. Every idle sync worker wakes for each
            # connection (gunicorn select()s on this fd); those that lose the race pay this.
            return None
        blocking, self._blocking = self._blocking, False
        try:
            return super().accept_with_info()
        except BlockingIOError:
            return None
        finally:
            self._blocking = blocking

    def _look(self, conn: socket.socket, addr: Address) -> tuple[socket.socket, Address, ConnectionInfo] | None:
        try:
            data = conn.recv(min(FIRST_PEEK, self._max_bytes), _PEEK)
            if len(data) == FIRST_PEEK < self._max_bytes:
                data = conn.recv(self._max_bytes, _PEEK)  # a big head: look at all the filters may see
        except BlockingIOError:
            data = None  # connected, nothing sent yet
        except OSError:
            conn.close()  # reset before a byte: nothing to serve
            return None
        if data == b"":
            conn.close()  # closed before a byte
            return None
        if data and self._matcher is not None:
            match = self._matcher.match(data)
            if match.ready:
                route = self._route_name
                consume = match.consume
                while consume > 0:  # already in the socket buffer: this does not block
                    consume -= len(conn.recv(consume))
                ready = ConnectionInfo.lazy(route, data, self._decider, "ready", 0.0, match.consume, addr)
                _remember(conn, ready)
                return conn, addr, ready
        return self._decide(conn, addr, data)

    def _decide(self, conn: socket.socket, addr: Address,
                data: bytes | None) -> tuple[socket.socket, Address, ConnectionInfo] | None:
        """What the matcher did not certify: the filters decide on what was peeked, or it is held elsewhere."""
        if data:
            # Undecided (WAITING) and FAILED go to the filter process, which
            # decides with the same filters and applies the policies.
            outcome = self._decider.look(data, addr)
            if outcome is not None and outcome.phase is Phase.REJECTED and self._decider.default_route is None:
                _close_read(conn, len(data), reset=self._reset_rejects)
                return None
            if outcome is not None and outcome.phase is Phase.ACCEPTED:
                assert outcome.route is not None
                consume = outcome.consume
                while consume > 0:  # already in the socket buffer: this does not block
                    consume -= len(conn.recv(consume))
                ready = ConnectionInfo(outcome.route, outcome.info, "ready", 0.0, outcome.consume, addr)
                _remember(conn, ready)
                proxied = outcome.info.get("client_address")
                return conn, (addr if proxied is None else proxied), ready
        return self._hold_elsewhere(conn, addr)

    def _hold_elsewhere(self, conn: socket.socket, addr: Address) -> tuple[socket.socket, Address, ConnectionInfo] | None:
        try:
            offer_fd(self._offload, conn.fileno(), _DONTWAIT)
        except OSError as exc:
            # The filter process is not keeping up (or gone and its queue full): the
            # on_timeout policy, as for a connection it could not hold.
            now = time.monotonic()
            if now - self._overflow_logged > 10:
                self._overflow_logged = now
                log.warning("could not pass a connection to the filter process (%s); %s it", exc,
                            "serving" if self._surface_overflow else "closing")
            if self._surface_overflow:
                info = ConnectionInfo("default", {}, "evicted", 0.0, 0, addr)
                _remember(conn, info)
                return conn, addr, info
        conn.close()  # ours; the filter process has its own copy now
        return None

    def close(self) -> None:
        self._poller.close()
        super().close()

    def __repr__(self) -> str:
        return f"<FirstLookListener for {self._listener}>"


def _close_read(conn: socket.socket, peeked: int, *, reset: bool) -> None:
    """Close a rejected connection: FIN after reading what it sent (unread bytes would mean RST)."""
    try:
        if reset:
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        else:
            conn.recv(peeked, int(socket.MSG_DONTWAIT))
    except OSError:
        pass
    conn.close()
