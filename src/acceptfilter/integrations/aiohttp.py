"""aiohttp's web server behind a filter, on the event loop with no thread.

aiohttp serves a socket with ``loop.create_server(handler, sock=...)``
(``SockSite``, and ``web.run_app(app, sock=...)``), so a listener in its place
works on the selector loop; on uvloop, run on
:class:`acceptfilter.integrations.uvloop.Loop`. Two ways in::

    from acceptfilter.integrations.aiohttp import run_app
    run_app(app, host="0.0.0.0", port=8080, filter="httpready", policy={"timeout": 10})

    runner = web.AppRunner(app); await runner.setup()
    site = FilteredSockSite(runner, socket.create_server(("", 8080)), filter="httpready")
    await site.start()

A handler reads what the filters learnt with :func:`request_info` (by TCP
peer: aiohttp gives handlers a transport, never the socket accept() returned).
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from typing import Any

from aiohttp import web

from ..engine import ConnectionInfo
from ..listener import FilteredListener, FilterSpecs, connection_info_by_peer, wrap
from .asgi import index_peers
from .asyncio import attach

__all__ = ["FilteredSockSite", "request_info", "run_app"]


def request_info(request: web.BaseRequest) -> ConnectionInfo | None:
    """What the filters learnt about the connection that carried ``request``, or None."""
    transport = request.transport
    peer = transport.get_extra_info("peername") if transport is not None else None
    if not isinstance(peer, tuple) or len(peer) < 2:
        return None
    return connection_info_by_peer(str(peer[0]), int(peer[1]))


class FilteredSockSite(web.SockSite):
    """``web.SockSite`` whose socket is wrapped in a filter when the site starts (inside the loop)."""

    def __init__(
        self,
        runner: web.BaseRunner,
        sock: socket.socket,
        *,
        filter: FilterSpecs = "httpready",
        core: str = "c",
        policy: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(runner, sock, **kwargs)
        self._acceptfilter = (filter, core, dict(policy or {}))
        self.listener: FilteredListener | None = None

    async def start(self) -> None:
        filter, core, policy = self._acceptfilter
        if self.listener is None:
            self.listener = wrap(self._sock, filter, core=core, driver="asyncio", **policy)
            index_peers(self.listener)
            self._sock = self.listener  # type: ignore[assignment]
        await super().start()

    async def stop(self) -> None:
        try:
            await super().stop()
        finally:
            if self.listener is not None:
                self.listener.close()


def run_app(
    app: web.Application,
    *,
    host: str = "127.0.0.1",
    port: int = 8080,
    sock: socket.socket | None = None,
    filter: FilterSpecs = "httpready",
    core: str = "c",
    policy: dict[str, Any] | None = None,
    backlog: int = 1024,
    loop: asyncio.AbstractEventLoop | None = None,
    started: Callable[[FilteredListener], None] | None = None,
    **kwargs: Any,
) -> None:
    """``web.run_app(app, sock=listener, ...)`` behind ``filter`` (``kwargs`` go to ``run_app``).

    The loop is made here (a selector loop unless ``loop`` is given) so the
    engine can run on it before aiohttp starts it: no thread.
    ``started(listener)`` is called once the listener exists.
    """
    loop = loop or asyncio.SelectorEventLoop()
    raw = sock or socket.create_server((host, port), backlog=backlog)
    try:
        listener = wrap(raw, filter, core=core, driver="none", **(policy or {}))
    except Exception:
        if sock is None:
            raw.close()
        raise
    index_peers(listener)
    if started is not None:
        started(listener)
    try:
        attach(listener, loop)
        web.run_app(app, sock=listener, loop=loop, backlog=backlog, **kwargs)  # type: ignore[arg-type]
    finally:
        listener.close()
