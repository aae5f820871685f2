"""asyncio (and uvloop) with no extra thread.

:class:`AsyncioDriver` runs the engine on the event loop itself: a reader on
the core's epoll fd and a ``call_at`` timer for the next deadline. Then the
standard calls just work on the selector loop::

    listener = acceptfilter.wrap(sock, "httpready", driver="asyncio")  # inside the loop
    server = await asyncio.start_server(handle, sock=listener)

uvloop accepts in C straight from the fd it is given, which for a listener is
an eventfd: :func:`create_server` (and :func:`start_server`) detect a loop that
is not a selector loop and surface each connection with
``loop.connect_accepted_socket()`` from an accept loop on the listener instead.
:func:`start_server` mirrors ``asyncio.start_server`` and hands the callback a
writer whose ``get_extra_info("acceptfilter")`` is the :class:`ConnectionInfo`.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Awaitable, Callable
from typing import Any, cast

from ..drivers.asyncio import AsyncioDriver
from ..engine import ConnectionInfo
from ..listener import FilteredListener, FilterSpecs, wrap

__all__ = ["AsyncioDriver", "FilteredServer", "attach", "create_server", "start_server"]

log = logging.getLogger("acceptfilter")

ClientConnected = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None] | None]


def attach(listener: FilteredListener, loop: asyncio.AbstractEventLoop | None = None) -> AsyncioDriver:
    """Run a ``driver="none"`` listener's engine on ``loop`` (default: the running one)."""
    driver = AsyncioDriver(listener.engine, loop)
    try:
        listener.attach_driver(driver)
    except Exception:
        driver.stop()
        raise
    return driver


def _is_selector_loop(loop: asyncio.AbstractEventLoop) -> bool:
    """True when ``loop.create_server(sock=listener)`` works: the loop calls ``accept()`` in Python."""
    return isinstance(loop, asyncio.selector_events.BaseSelectorEventLoop)


class _InfoListener:
    """Delegates to a FilteredListener; remembers each accepted connection's info by fd.

    asyncio hands protocols a ``TransportSocket``, not the socket ``accept()``
    returned, so the info is looked up by fd in ``connection_made`` (which the
    loop schedules right after the accept, before the fd can be reused).
    """

    def __init__(self, listener: FilteredListener) -> None:
        self._listener = listener
        self.infos: dict[int, ConnectionInfo] = {}

    def accept(self) -> tuple[socket.socket, Any]:
        sock, addr, info = self._listener.accept_with_info()
        self.infos[sock.fileno()] = info
        return sock, addr

    def __getattr__(self, name: str) -> Any:
        return getattr(self._listener, name)


class FilteredServer(asyncio.AbstractServer):
    """What :func:`create_server` returns on loops that accept in C (uvloop).

    An accept loop on the listener's fd hands each ready connection to
    ``loop.connect_accepted_socket()``; it mirrors ``asyncio.Server``.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        factory: Callable[[], asyncio.BaseProtocol],
        listener: FilteredListener,
        kwargs: dict[str, Any],
    ) -> None:
        self._loop = loop
        self._factory = factory
        self._listener = listener
        self._kwargs = kwargs
        self._serving = False
        self._fd = -1
        self._closed = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()
        self.infos: dict[int, ConnectionInfo] = {}

    @property
    def sockets(self) -> tuple[FilteredListener, ...]:
        return () if self._listener.closed else (self._listener,)

    def get_loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    def is_serving(self) -> bool:
        return self._serving

    async def start_serving(self) -> None:
        if self._serving or self._listener.closed:
            return
        self._serving = True
        self._listener.setblocking(False)
        self._fd = self._listener.fileno()  # remembered: fileno() is -1 once the listener is closed
        self._loop.add_reader(self._fd, self._accept_ready)

    def _accept_ready(self) -> None:
        while self._serving:
            try:
                sock, _, info = self._listener.accept_with_info()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.error("acceptfilter: accept on %r failed: %s", self._listener, exc)
                return
            sock.setblocking(False)
            self.infos[sock.fileno()] = info
            task = self._loop.create_task(self._connect(sock))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _connect(self, sock: socket.socket) -> None:
        fd = sock.fileno()
        try:
            await self._loop.connect_accepted_socket(self._factory, sock, **self._kwargs)
        except Exception as exc:
            log.error("acceptfilter: could not set up a connection: %s", exc)
            sock.close()
        finally:
            self.infos.pop(fd, None)

    def close(self) -> None:
        if self._serving:
            self._serving = False
            self._loop.remove_reader(self._fd)
        self._listener.close()
        self._closed.set()

    async def wait_closed(self) -> None:
        await self._closed.wait()

    async def serve_forever(self) -> None:
        await self.start_serving()
        try:
            await self._closed.wait()
        finally:
            self.close()

    async def __aenter__(self) -> FilteredServer:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()
        await self.wait_closed()


async def create_server(
    protocol_factory: Callable[[], asyncio.BaseProtocol],
    listener: FilteredListener,
    *,
    start_serving: bool = True,
    **kwargs: Any,
) -> asyncio.AbstractServer:
    """``loop.create_server(protocol_factory, sock=listener)`` that also works on uvloop."""
    loop = asyncio.get_running_loop()
    server: asyncio.AbstractServer
    if _is_selector_loop(loop):
        server = await loop.create_server(protocol_factory, sock=cast(socket.socket, listener), start_serving=start_serving, **kwargs)
    else:
        server = FilteredServer(loop, protocol_factory, listener, kwargs)
        if start_serving:
            await server.start_serving()
    return server


class _InfoStreamWriter(asyncio.StreamWriter):
    """A StreamWriter that also answers ``get_extra_info("acceptfilter")``."""

    def __init__(self, *args: Any, info: ConnectionInfo | None) -> None:
        super().__init__(*args)
        self._acceptfilter_info = info

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "acceptfilter":
            return self._acceptfilter_info if self._acceptfilter_info is not None else default
        return super().get_extra_info(name, default)


class _InfoStreamProtocol(asyncio.StreamReaderProtocol):
    """``asyncio.start_server``'s protocol, building an :class:`_InfoStreamWriter`."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        cb: ClientConnected,
        infos: Callable[[], dict[int, ConnectionInfo]],
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        super().__init__(reader, loop=loop)
        self._af_reader = reader
        self._af_cb = cb
        self._af_infos = infos
        self._af_loop = loop

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        sock = transport.get_extra_info("socket")
        info = self._af_infos().pop(sock.fileno(), None) if sock is not None else None
        writer = _InfoStreamWriter(transport, self, self._af_reader, self._af_loop, info=info)
        result = self._af_cb(self._af_reader, writer)
        if asyncio.iscoroutine(result):
            task = self._af_loop.create_task(result)

            def done(t: asyncio.Task[None]) -> None:
                if t.cancelled():
                    transport.close()
                    return
                exc = t.exception()
                if exc is not None:
                    self._af_loop.call_exception_handler(
                        {"message": "Unhandled exception in client_connected_cb", "exception": exc, "transport": transport}
                    )
                    transport.close()

            task.add_done_callback(done)


async def start_server(
    client_connected_cb: ClientConnected,
    host: str | None = None,
    port: int = 0,
    *,
    filter: FilterSpecs = "httpready",
    sock: socket.socket | FilteredListener | None = None,
    limit: int = 2**16,
    backlog: int = 1024,
    core: str = "c",
    start_serving: bool = True,
    **policy: Any,
) -> asyncio.AbstractServer:
    """Like ``asyncio.start_server``, behind ``filter``; no extra thread.

    The writer's ``get_extra_info("acceptfilter")`` is the connection's
    :class:`ConnectionInfo`. Pass ``sock`` (a listening socket, or an existing
    listener) instead of ``host``/``port`` to use your own. ``policy`` goes to
    :func:`acceptfilter.wrap` (``timeout=``, ``on_timeout=``, ...).
    """
    loop = asyncio.get_running_loop()
    if isinstance(sock, FilteredListener):
        listener = sock
    else:
        raw = sock or socket.create_server((host or "127.0.0.1", port), backlog=backlog)
        try:
            listener = wrap(raw, filter, core=core, driver="asyncio", **policy)
        except Exception:
            if sock is None:
                raw.close()
            raise
    server: asyncio.AbstractServer
    if _is_selector_loop(loop):
        recording = _InfoListener(listener)

        def factory() -> asyncio.BaseProtocol:
            return _InfoStreamProtocol(asyncio.StreamReader(limit=limit, loop=loop), client_connected_cb, lambda: recording.infos, loop)

        server = await loop.create_server(factory, sock=cast(socket.socket, recording), start_serving=start_serving)
    else:
        holder: list[FilteredServer] = []

        def uv_factory() -> asyncio.BaseProtocol:
            return _InfoStreamProtocol(asyncio.StreamReader(limit=limit, loop=loop), client_connected_cb, lambda: holder[0].infos, loop)

        filtered = FilteredServer(loop, uv_factory, listener, {})
        holder.append(filtered)
        if start_serving:
            await filtered.start_serving()
        server = filtered
    return server
