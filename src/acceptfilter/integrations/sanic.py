"""Sanic behind a filter, on the event loop with no thread.

``sanic app.app`` and ``app.run()`` start Sanic's own process manager, which
binds its sockets itself in every worker; the filter goes in through Sanic's
low-level API instead, ``app.create_server(sock=listener)``, which serves the
listener with ``loop.create_server(sock=...)``: the selector loop as is, or
uvloop as :class:`acceptfilter.integrations.uvloop.Loop`::

    from acceptfilter.integrations.sanic import run
    run(app, host="0.0.0.0", port=8000, filter="httpready", policy={"timeout": 10})

Handlers read what the filters learnt with :func:`request_info` (by TCP peer).
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from typing import Any

from ..engine import ConnectionInfo
from ..listener import FilteredListener, FilterSpecs, connection_info_by_peer, wrap
from .asgi import index_peers
from .asyncio import _is_selector_loop

__all__ = ["request_info", "run", "serve"]


def request_info(request: Any) -> ConnectionInfo | None:
    """What the filters learnt about the connection that carried a Sanic ``request``, or None."""
    transport = getattr(request, "transport", None)
    peer = transport.get_extra_info("peername") if transport is not None else None
    if not isinstance(peer, tuple) or len(peer) < 2:
        return None
    return connection_info_by_peer(str(peer[0]), int(peer[1]))


def _check_loop(loop: asyncio.AbstractEventLoop) -> None:
    if _is_selector_loop(loop):
        return
    try:
        from .uvloop import Loop
    except ImportError:
        Loop = None  # type: ignore[assignment,misc]
    if Loop is None or not isinstance(loop, Loop):
        raise RuntimeError("Sanic serves the listener with loop.create_server(sock=listener): run it on the "
                           "selector loop or on acceptfilter.integrations.uvloop.Loop")


async def serve(
    app: Any,
    *,
    sock: socket.socket | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    filter: FilterSpecs = "httpready",
    core: str = "c",
    policy: dict[str, Any] | None = None,
    backlog: int = 1024,
    started: Callable[[FilteredListener, Any], None] | None = None,
    **kwargs: Any,
) -> None:
    """Serve a Sanic ``app`` on the running loop behind ``filter`` until cancelled.

    ``sock`` replaces ``host``/``port``; ``policy`` goes to
    :func:`acceptfilter.wrap`, ``kwargs`` to ``app.create_server``;
    ``started(listener, server)`` is called once Sanic serves.
    """
    _check_loop(asyncio.get_running_loop())
    raw = sock or socket.create_server((host, port), backlog=backlog)
    try:
        listener = wrap(raw, filter, core=core, driver="asyncio", **(policy or {}))
    except Exception:
        if sock is None:
            raw.close()
        raise
    index_peers(listener)
    try:
        server = await app.create_server(sock=listener, return_asyncio_server=True, **kwargs)
        await server.startup()
        await server.before_start()
        await server.after_start()
        try:
            if started is not None:
                started(listener, server)
            await server.serve_forever()
        finally:
            await server.before_stop()
            closing = server.close()
            if closing is not None:
                await closing
            await server.after_stop()
    finally:
        listener.close()


def run(app: Any, host: str = "127.0.0.1", port: int = 8000, *, loop: str = "asyncio", **kwargs: Any) -> None:
    """Serve until interrupted (Ctrl-C), one process; ``loop`` is "asyncio" or "uvloop" (keywords: :func:`serve`)."""
    factory: Callable[[], asyncio.AbstractEventLoop] = asyncio.SelectorEventLoop
    if loop == "uvloop":
        from .uvloop import new_event_loop

        factory = new_event_loop
    elif loop != "asyncio":
        raise ValueError(f"loop must be 'asyncio' or 'uvloop', not {loop!r}")
    with asyncio.Runner(loop_factory=factory) as runner:
        try:
            runner.run(serve(app, host=host, port=port, **kwargs))
        except KeyboardInterrupt:
            pass
