"""Hypercorn (asyncio worker) behind a filter, with no thread.

Hypercorn's public ``serve(app, config)`` binds its own sockets (``fd://N``
binds would hand it the raw socket, past the filter), so this calls its
asyncio ``worker_serve`` with a ``Sockets`` holding the listener, which it
passes to ``asyncio.start_server(sock=...)``. On uvloop, run it on
:class:`acceptfilter.integrations.uvloop.Loop`::

    config = hypercorn.config.Config()
    await serve(app, config, sock=socket.create_server(("", 8000)), filter="httpready")
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable
from typing import Any

from hypercorn.app_wrappers import ASGIWrapper, WSGIWrapper
from hypercorn.asyncio.run import worker_serve
from hypercorn.config import Config, Sockets
from hypercorn.utils import wrap_app

from ..listener import FilteredListener, FilterSpecs, wrap
from .asgi import ConnectionInfoMiddleware, index_peers, is_asgi3

__all__ = ["serve"]


async def serve(
    app: Any,
    config: Config,
    *,
    sock: socket.socket,
    filter: FilterSpecs = "httpready",
    core: str = "c",
    shutdown_trigger: Callable[..., Awaitable[Any]] | None = None,
    started: Callable[[FilteredListener], None] | None = None,
    **policy: Any,
) -> None:
    """Serve an ASGI (or WSGI) ``app`` on ``sock`` behind ``filter`` (``policy``: see ``wrap``)."""
    asyncio.get_running_loop()  # the asyncio driver needs it
    listener = wrap(sock, filter, core=core, driver="asyncio", **policy)
    index_peers(listener)
    if isinstance(app, ASGIWrapper):  # already loaded by Hypercorn (acceptfilter run)
        app = ASGIWrapper(ConnectionInfoMiddleware(app.app))  # type: ignore[arg-type]
    elif is_asgi3(app):
        app = ConnectionInfoMiddleware(app)
    if started is not None:
        started(listener)
    try:
        await worker_serve(
            app if isinstance(app, ASGIWrapper | WSGIWrapper) else wrap_app(app, config.wsgi_max_body_size, None),
            config,
            sockets=Sockets([], [listener], []),  # type: ignore[list-item]
            shutdown_trigger=shutdown_trigger,
        )
    finally:
        listener.close()
