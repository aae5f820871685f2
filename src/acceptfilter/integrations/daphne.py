"""Daphne (Django Channels' ASGI server, on Twisted) behind a filter.

Daphne listens through Twisted endpoint strings; :class:`FilteredServer`
instead serves Daphne's own HTTP/WebSocket factory on a filtered listener
(:func:`acceptfilter.integrations.twisted.listen_socket`), once Daphne has
built it and before the reactor runs. Daphne installs Twisted's asyncio
reactor, so the engine runs on that loop, with no thread::

    from acceptfilter.integrations.daphne import FilteredServer
    FilteredServer(application, socket.create_server(("", 8000)), filter="httpready",
                   policy={"timeout": 10}).run()

The application reads what the filters learnt with
:func:`acceptfilter.integrations.asgi.scope_info` (the application is wrapped
so that Daphne's ``scope["client"]`` finds the adopted connection).
Importing this module imports ``daphne.server``, which installs the asyncio
reactor: import it before anything else imports ``twisted.internet.reactor``.
"""

from __future__ import annotations

import socket
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import daphne.server

from ..listener import FilterSpecs
from .asgi import KEY
from .twisted import FilteredPort, listen_socket, transport_info_by_peer

__all__ = ["FilteredServer", "InfoMiddleware"]

Scope = MutableMapping[str, Any]


class InfoMiddleware:
    """Puts the connection's ConnectionInfo into ``scope["extensions"]["acceptfilter"]`` (read it with ``scope_info``)."""

    def __init__(self, app: Callable[[Scope, Any, Any], Awaitable[None]]) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        client = scope.get("client")
        if scope.get("type") in ("http", "websocket") and client:
            info = transport_info_by_peer(str(client[0]), int(client[1]))
            if info is not None:
                scope = dict(scope)
                scope["extensions"] = {**(scope.get("extensions") or {}), KEY: info}
        await self.app(scope, receive, send)


class FilteredServer(daphne.server.Server):  # type: ignore[misc]
    """``daphne.server.Server`` serving one filtered listening socket instead of endpoint strings.

    ``sock`` is owned from now on; ``policy`` goes to :func:`acceptfilter.wrap`;
    other keywords to Daphne's ``Server``. ``port`` (a :class:`FilteredPort`)
    exists once the server is ready (``ready_callable``).
    """

    def __init__(
        self,
        application: Any,
        sock: socket.socket,
        *,
        filter: FilterSpecs = "httpready",
        core: str = "c",
        policy: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        # Daphne exits when it has no endpoint: give it a placeholder, then listen ourselves in run().
        super().__init__(InfoMiddleware(application), endpoints=["acceptfilter"], **kwargs)
        self.endpoints: list[str] = []
        self._acceptfilter = (sock, filter, core, dict(policy or {}))
        self.port: FilteredPort | None = None

    def run(self) -> None:
        theirs: Callable[[], None] | None = getattr(self, "ready_callable", None)

        def ready() -> None:
            from twisted.internet import reactor

            sock, filter, core, policy = self._acceptfilter
            self.port = listen_socket(reactor, sock, self.http_factory, filter=filter, core=core, **policy)
            self.listening_addresses.append(tuple(self.port.getHost()[:2]))
            if theirs is not None:
                theirs()

        self.ready_callable = ready
        try:
            super().run()
        finally:
            if self.port is not None:
                self.port.stopListening()
