"""trio: a ``trio.abc.Listener`` over a FilteredListener.

trio has no ``add_reader`` to hang the engine on, so the listener uses the
background engine thread (``driver="thread"``; the C core waits without the
GIL) and the trio side only waits for the listener's eventfd with
``wait_readable`` and accepts without blocking::

    listener = await open_filtered_tcp_listener(8000, filter="httpready")
    await trio.serve_listeners(handler, [listener])

Handlers get the filter's info with :func:`stream_info`.
"""

from __future__ import annotations

import weakref
from typing import Any

import trio

from ..engine import ConnectionInfo
from ..listener import FilteredListener, FilterSpecs, wrap
from ._tcp import bind_tcp

__all__ = ["FilteredTrioListener", "open_filtered_tcp_listener", "stream_info"]

_infos: weakref.WeakKeyDictionary[trio.SocketStream, ConnectionInfo] = weakref.WeakKeyDictionary()


def stream_info(stream: trio.SocketStream) -> ConnectionInfo | None:
    """What the filters learnt about the connection behind ``stream``."""
    return _infos.get(stream)


class FilteredTrioListener(trio.abc.Listener[trio.SocketStream]):
    """Accepts only connections the filter let through, as ``trio.SocketStream``."""

    def __init__(self, listener: FilteredListener) -> None:
        listener.setblocking(False)
        self.listener = listener

    async def accept(self) -> trio.SocketStream:
        while True:
            if self.listener.closed:
                raise trio.ClosedResourceError("the listener is closed")
            try:
                sock, _, info = self.listener.accept_with_info()
            except BlockingIOError:
                await trio.lowlevel.wait_readable(self.listener.fileno())
                continue
            stream = trio.SocketStream(trio.socket.from_stdlib_socket(sock))
            _infos[stream] = info
            return stream

    async def aclose(self) -> None:
        fd = self.listener.fileno()
        if fd >= 0:
            trio.lowlevel.notify_closing(fd)  # wake a task blocked in accept()
        self.listener.close()
        await trio.lowlevel.checkpoint()


async def open_filtered_tcp_listener(
    port: int, host: str | None = None, *, filter: FilterSpecs = "httpready", backlog: int = 1024, **options: Any
) -> FilteredTrioListener:
    """Bind ``host:port``, wrap it in ``filter`` (``options`` go to :func:`acceptfilter.wrap`).

    ``host=None`` listens on every interface, as ``trio.open_tcp_listeners(port)`` does, with one
    socket: every IPv4 one (``"::"``: IPv6 and IPv4; ``"127.0.0.1"``: this machine only).
    """
    sock = bind_tcp(host, port, backlog)
    try:
        return FilteredTrioListener(wrap(sock, filter, driver="thread", **options))
    except Exception:
        sock.close()
        raise
