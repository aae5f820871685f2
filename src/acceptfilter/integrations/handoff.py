"""Ready connections handed from one filtering process to many serving processes.

A prefork server (gunicorn) has one listen socket and N worker processes that
each call ``accept()`` when they are idle. acceptfilter keeps that shape: one
process filters, and every ready connection goes into a single
``SOCK_SEQPACKET`` socket pair as one message carrying the descriptor
(``SCM_RIGHTS``) and what the filters learnt. All workers share the receiving
end, so the pair behaves like the kernel's accept queue: a worker that is busy
does not read from it, an idle one takes the next connection, and nothing is
pushed to a process that cannot serve it. Messages wait in the kernel, so
they outlive any one worker (killed, recycled by ``max_requests``, reloaded).

The pair is created by the parent of both sides and is trusted: the payload
is pickled (:class:`~acceptfilter.ConnectionInfo` with every metadata type the
filters produce), and only processes of the same server ever hold either end.
"""

from __future__ import annotations

import array
import errno
import logging
import pickle
import socket
from typing import Any

from ..engine import ConnectionInfo
from ..iocore import Address
from ..listener import _remember

__all__ = ["MAX_LOOKS", "HandoffListener", "make_channel", "offer_fd", "receive_fds", "send_connection"]

log = logging.getLogger("acceptfilter.handoff")

#: Room for the pickled address and metadata (SNI, ALPN, PROXY TLVs ...).
MAX_MESSAGE = 64 * 1024
#: Kernel buffer of the pair: how many ready connections may wait for a worker
#: before the filtering side stops handing over (roughly 1 KiB each).
CHANNEL_BUFFER = 4 * 1024 * 1024
# Plain ints: combining socket's IntFlag members costs microseconds per call.
_RECV_FLAGS = int(socket.MSG_CMSG_CLOEXEC)
_DONTWAIT = int(socket.MSG_DONTWAIT)
_TRUNCATED = int(socket.MSG_CTRUNC) | int(socket.MSG_TRUNC)
_ANCILLARY = socket.CMSG_SPACE(4 * 4)  # room for a few: extras are detected and closed


def make_channel() -> tuple[socket.socket, socket.socket]:
    """A (send end, receive end) pair; both non-inheritable across exec."""
    send, recv = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    for end in (send, recv):
        try:  # root may exceed net.core.wmem_max; others get what it allows
            end.setsockopt(socket.SOL_SOCKET, getattr(socket, "SO_SNDBUFFORCE", 32), CHANNEL_BUFFER)
        except OSError:
            end.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, CHANNEL_BUFFER)
    recv.shutdown(socket.SHUT_WR)  # workers only ever receive
    return send, recv


def send_connection(channel: socket.socket, conn: socket.socket | int, addr: Address, info: ConnectionInfo) -> None:
    """Queue one ready connection (a socket or a bare fd) for whichever worker accepts next.

    A blocking channel blocks while it is full (every worker busy, the buffer
    used up): back-pressure, like a full accept queue; a non-blocking one
    raises BlockingIOError. The caller still owns ``conn`` and closes its
    copy afterwards.
    """
    payload = pickle.dumps((addr, info.route, dict(info.info), info.reason, info.held_for, info.consumed, info.peer),
                           protocol=pickle.HIGHEST_PROTOCOL)
    if len(payload) > MAX_MESSAGE:
        raise ValueError(f"connection metadata too large to hand over ({len(payload)} bytes)")
    fds = array.array("i", [conn if isinstance(conn, int) else conn.fileno()])
    channel.sendmsg([payload], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])


def _unpack(payload: bytes) -> tuple[Address, ConnectionInfo]:
    addr, route, info, reason, held_for, consumed, peer = pickle.loads(payload)  # the pair is trusted (module docstring)
    return addr, ConnectionInfo(route, info, reason, held_for, consumed, peer)


def _received_fds(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(data) - len(data) % array.array("i").itemsize
            fds.extend(array.array("i", data[:usable]))
    return fds


class HandoffListener:
    """The receiving end of a channel, dressed as the listen socket it stands for.

    ``accept()`` returns ``(conn, addr)`` like ``socket.accept()``: ``addr`` is
    the client address the filters established (the PROXY header's source
    when there is one), and :func:`acceptfilter.connection_info` works on
    ``conn``. ``getsockname()`` and ``str()`` are the original listener's, so
    the server's environ (``SERVER_PORT``) and logs stay right.

    Receiving never blocks unless ``setblocking(True)`` was asked for: the
    descriptor is shared by every worker, so its O_NONBLOCK flag is left alone
    and the per-call ``MSG_DONTWAIT`` decides.
    """

    def __init__(self, channel: socket.socket, listener: Any) -> None:
        self._channel = channel
        self._listener = listener
        self._blocking = False
        self._sockname: Any = None
        # What the connections are (known, so socket() need not ask the kernel three times each).
        self._kind = (getattr(listener, "family", -1), getattr(listener, "type", -1), getattr(listener, "proto", -1))

    def accept(self) -> tuple[socket.socket, Address]:
        conn, addr, _ = self.accept_with_info()
        return conn, addr

    def accept_with_info(self) -> tuple[socket.socket, Address, ConnectionInfo]:
        flags = _RECV_FLAGS if self._blocking else _RECV_FLAGS | _DONTWAIT
        while True:
            payload, ancdata, msg_flags, _ = self._channel.recvmsg(MAX_MESSAGE, _ANCILLARY, flags)
            fds = _received_fds(ancdata)
            if len(fds) == 1 and payload and not msg_flags & _TRUNCATED:
                break
            for fd in fds:  # never leak what arrived with a malformed message
                socket.close(fd)
            if not payload and not fds:
                # Every sending end is gone: the filtering side has stopped.
                raise OSError(errno.ECONNABORTED, "acceptfilter hand-off channel closed (the filter process is gone)")
            log.error("dropped a malformed hand-off message (%d descriptors, flags %#x)", len(fds), msg_flags)
        try:
            conn = socket.socket(*self._kind, fileno=fds[0])
        except OSError:
            socket.close(fds[0])
            raise
        addr, info = _unpack(payload)
        _remember(conn, info)
        return conn, addr, info

    def fileno(self) -> int:
        return self._channel.fileno()

    def setblocking(self, flag: bool) -> None:
        self._blocking = bool(flag)

    def getblocking(self) -> bool:
        return self._blocking

    def getsockname(self) -> Any:
        # gunicorn asks for every request (SERVER_NAME/SERVER_PORT); a bound listen socket's
        # name never changes, so one system call is enough.
        name = self._sockname
        if name is None:
            name = self._sockname = self._listener.getsockname()
        return name

    def close(self) -> None:
        self._channel.close()

    def __str__(self) -> str:
        return str(self._listener)

    def __repr__(self) -> str:
        return f"<HandoffListener for {self._listener}>"


#: Connections a worker may accept and pass on in one accept() call before it
#: says EAGAIN (and so gets back to gunicorn's loop, which pings the arbiter).
MAX_LOOKS = 64


def offer_fd(channel: socket.socket, fd: int, flags: int = 0) -> None:
    """Pass a bare connection (no metadata) for whoever holds connections to adopt."""
    channel.sendmsg([b"h"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))], flags)


def receive_fds(channel: socket.socket, limit: int = MAX_LOOKS, dropped: list[int] | None = None) -> list[int]:
    """Descriptors waiting in ``channel`` (one per message), without blocking.

    A message that arrives with its descriptors cut off (``MSG_CTRUNC``: this process had no
    descriptor left, so the kernel closed what was in flight) is counted in ``dropped[0]`` when
    given, and receiving goes on: the connections behind it must not wait for another wake-up.
    """
    out: list[int] = []
    for _ in range(limit):
        try:
            payload, ancdata, msg_flags, _ = channel.recvmsg(16, _ANCILLARY, _RECV_FLAGS | _DONTWAIT)
        except BlockingIOError:
            break
        fds = _received_fds(ancdata)
        if not fds:
            if payload and msg_flags & int(socket.MSG_CTRUNC):
                if dropped is not None:
                    dropped[0] += 1
                continue
            break  # every sender is gone
        out.extend(fds)
    return out
