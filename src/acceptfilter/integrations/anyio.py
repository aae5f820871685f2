"""anyio (asyncio or trio backend): an ``anyio.abc.Listener`` over a FilteredListener.

Like the trio listener, it waits for the listener's eventfd with
``anyio.wait_readable`` and accepts without blocking. The engine runs on the
background engine thread by default (works on both backends); on the asyncio
backend, pass a listener made with ``driver="asyncio"`` to have no thread::

    listener = await open_filtered_tcp_listener(8000, filter="httpready")
    await listener.serve(handler)

Handlers get the filter's info with :func:`stream_info`.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import anyio
import anyio.abc

from ..engine import ConnectionInfo
from ..listener import FilteredListener, FilterSpecs, wrap
from ._tcp import bind_tcp

__all__ = ["FilteredAnyioListener", "open_filtered_tcp_listener", "stream_info"]

_infos: weakref.WeakKeyDictionary[anyio.abc.SocketStream, ConnectionInfo] = weakref.WeakKeyDictionary()


def stream_info(stream: anyio.abc.SocketStream) -> ConnectionInfo | None:
    """What the filters learnt about the connection behind ``stream``."""
    return _infos.get(stream)


class FilteredAnyioListener(anyio.abc.Listener[anyio.abc.SocketStream]):
    """Yields only connections the filter let through, as anyio socket streams."""

    def __init__(self, listener: FilteredListener) -> None:
        listener.setblocking(False)
        self.listener = listener

    async def accept(self) -> anyio.abc.SocketStream:
        while True:
            if self.listener.closed:
                raise anyio.ClosedResourceError
            try:
                sock, _, info = self.listener.accept_with_info()
            except BlockingIOError:
                await anyio.wait_readable(self.listener.fileno())
                continue
            stream = await anyio.abc.SocketStream.from_socket(sock)
            _infos[stream] = info
            return stream

    async def serve(
        self, handler: Callable[[anyio.abc.SocketStream], Any], task_group: anyio.abc.TaskGroup | None = None
    ) -> None:
        async def run(stream: anyio.abc.SocketStream) -> None:
            async with stream:
                await handler(stream)

        async with anyio.create_task_group() as tg:
            group = task_group or tg
            while True:
                try:
                    stream = await self.accept()
                except anyio.ClosedResourceError:
                    return  # aclose() ends serving
                group.start_soon(run, stream)

    async def aclose(self) -> None:
        fd = self.listener.fileno()
        if fd >= 0:
            anyio.notify_closing(fd)
        self.listener.close()
        await anyio.lowlevel.checkpoint()


async def open_filtered_tcp_listener(
    port: int,
    host: str | None = None,
    *,
    filter: FilterSpecs = "httpready",
    backlog: int = 1024,
    driver: str = "thread",
    **options: Any,
) -> FilteredAnyioListener:
    """Bind ``host:port`` and wrap it (``driver="asyncio"`` on the asyncio backend: no thread).

    ``host=None`` listens on every interface, as ``anyio.create_tcp_listener(local_port=port)`` does:
    one dual-stack ``::`` socket where the machine has IPv6 (IPv4 peers read ``::ffff:a.b.c.d``),
    else ``0.0.0.0``; ``"127.0.0.1"`` listens for this machine only.
    """
    sock = bind_tcp(host, port, backlog, dual_stack=True)
    try:
        return FilteredAnyioListener(wrap(sock, filter, driver=driver, **options))
    except Exception:
        sock.close()
        raise
