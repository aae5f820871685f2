"""tornado (``TCPServer``/``HTTPServer.add_socket``), on asyncio or uvloop, no thread.

tornado selects on ``sock.fileno()`` through the asyncio loop's ``add_reader``
and calls ``accept()`` until ``BlockingIOError``, so a non-blocking listener
with the asyncio driver is all it needs::

    server = tornado.httpserver.HTTPServer(app)
    listener = add_socket(server, socket.create_server(("", 8000)), "httpready")

Handlers get the filter's info with :func:`request_info` (tornado keeps the
very socket ``accept()`` returned in ``request.connection.stream.socket``).
"""

from __future__ import annotations

import socket
from typing import Any

from tornado.httputil import HTTPServerRequest
from tornado.tcpserver import TCPServer

from ..engine import ConnectionInfo
from ..listener import FilteredListener, FilterSpecs, connection_info, wrap

__all__ = ["add_socket", "request_info"]


def add_socket(
    server: TCPServer,
    sock: socket.socket | FilteredListener,
    filter: FilterSpecs = "httpready",
    *,
    core: str = "c",
    **policy: Any,
) -> FilteredListener:
    """Wrap ``sock`` (call inside the running IOLoop) and add it to ``server``; returns the listener."""
    listener = sock if isinstance(sock, FilteredListener) else wrap(sock, filter, core=core, driver="asyncio", **policy)
    listener.setblocking(False)  # tornado accepts until BlockingIOError
    server.add_socket(listener)  # type: ignore[arg-type]
    return listener


def request_info(request: HTTPServerRequest) -> ConnectionInfo | None:
    """What the filters learnt about the connection that carried ``request``."""
    stream = getattr(request.connection, "stream", None)
    sock = getattr(stream, "socket", None)
    return connection_info(sock) if isinstance(sock, socket.socket) else None
