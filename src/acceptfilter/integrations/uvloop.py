"""uvloop, whose ``create_server(sock=...)`` accepts in C and so cannot take a listener.

:class:`Loop` is a uvloop loop whose ``create_server`` recognises a
:class:`FilteredListener` and serves it through ``connect_accepted_socket``
(see :class:`acceptfilter.integrations.asyncio.FilteredServer`); anything else
goes to uvloop unchanged. Servers that call ``loop.create_server(sock=...)``
themselves (uvicorn) then work unmodified: ``uvicorn --loop
acceptfilter.integrations.uvloop:new_event_loop`` or
``asyncio.Runner(loop_factory=new_event_loop)``.
"""

from __future__ import annotations

import asyncio
from typing import Any

import uvloop

from ..listener import FilteredListener
from .asyncio import FilteredServer

__all__ = ["Loop", "new_event_loop"]


class Loop(uvloop.Loop):
    """uvloop, plus filtered listeners in ``create_server(sock=listener)``."""

    async def create_server(self, protocol_factory: Any, host: Any = None, port: Any = None, **kwargs: Any) -> Any:
        sock = kwargs.get("sock")
        if isinstance(sock, FilteredListener):
            start = kwargs.pop("start_serving", True)
            for ignored in ("sock", "backlog", "reuse_address", "reuse_port", "family", "flags"):
                kwargs.pop(ignored, None)
            if kwargs.get("ssl") is None:
                kwargs.pop("ssl", None)
            server = FilteredServer(self, protocol_factory, sock, kwargs)
            if start:
                await server.start_serving()
            return server
        return await super().create_server(protocol_factory, host, port, **kwargs)


def new_event_loop() -> asyncio.AbstractEventLoop:
    """A :class:`Loop` (use as a loop factory)."""
    return Loop()
