"""What the filters learnt, for ASGI applications: ``scope["extensions"]["acceptfilter"]``.

ASGI servers tell the application the peer address (``scope["client"]``),
never the socket. The uvicorn and Hypercorn integrations therefore index
surfaced sockets by TCP peer and wrap the application in
:class:`ConnectionInfoMiddleware`, which puts the
:class:`~acceptfilter.ConnectionInfo` of the request's connection into the
scope. Read it with :func:`scope_info`::

    from acceptfilter.integrations.asgi import scope_info

    async def app(scope, receive, send):
        info = scope_info(scope)          # None for lifespan, or if unknown
        sni = info.get("sni") if info else None

A server-side rewrite of ``scope["client"]`` (uvicorn's ``--proxy-headers``
from a trusted ``X-Forwarded-For``) hides the TCP peer; use the ``proxy``
filter instead, whose real client address is in ``info["client_address"]``.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from ..engine import ConnectionInfo
from ..listener import FilteredListener, connection_info_by_peer

__all__ = ["ConnectionInfoMiddleware", "index_peers", "is_asgi3", "scope_info"]

Scope = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Any, Any], Awaitable[None]]
KEY = "acceptfilter"


def scope_info(scope: Scope) -> ConnectionInfo | None:
    """The ConnectionInfo a :class:`ConnectionInfoMiddleware` put into ``scope``, or None."""
    info = (scope.get("extensions") or {}).get(KEY)
    return info if isinstance(info, ConnectionInfo) else None


def index_peers(listener: FilteredListener) -> None:
    """Make ``listener`` remember its surfaced sockets by TCP peer (for the middleware)."""
    listener._hub.index_peers = True


def is_asgi3(app: Any) -> bool:
    """A single-callable (ASGI 3) application: the only kind a middleware can wrap unnoticed."""
    if inspect.isclass(app):
        return False
    call = app if inspect.isfunction(app) or inspect.ismethod(app) else getattr(app, "__call__", None)  # noqa: B004
    return inspect.iscoroutinefunction(call) and len(inspect.signature(call).parameters) == 3


class ConnectionInfoMiddleware:
    """Adds ``scope["extensions"]["acceptfilter"]`` to HTTP and WebSocket scopes."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        client = scope.get("client")
        if scope.get("type") in ("http", "websocket") and client:
            info = connection_info_by_peer(client[0], client[1])
            if info is not None:
                scope = dict(scope)
                scope["extensions"] = {**(scope.get("extensions") or {}), KEY: info}
        await self.app(scope, receive, send)
