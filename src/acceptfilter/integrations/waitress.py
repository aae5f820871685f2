"""waitress behind a filter: its thread pool only ever gets ready connections.

waitress serves with a fixed pool of threads (4 by default) behind one
asyncore loop: the loop itself buffers a request before a thread gets it, but
every idle or slow connection still costs a channel, a socket in its
``select()`` and, against ``connection_limit`` (100), a place that real
clients then cannot have. Behind a filter those connections wait in the
engine's epoll set instead.

waitress's ``create_server(sockets=[...])`` keeps only real ``socket.socket``
objects, so :func:`create_server` builds the server on the raw socket and then
swaps the listener in for it in waitress's socket map::

    from acceptfilter.integrations.waitress import serve
    serve(app, host="0.0.0.0", port=8080, filter="httpready", policy={"timeout": 10}, threads=8)

The application reads what the filters learnt with
:func:`acceptfilter.integrations.wsgi.environ_info` (by ``REMOTE_ADDR`` and
``REMOTE_PORT``; waitress's ``trusted_proxy`` rewrite hides the peer: use the
``proxy`` filter instead).
"""

from __future__ import annotations

import socket
from typing import Any

import waitress.server

from ..listener import FilteredListener, FilterSpecs, wrap
from .asgi import index_peers

__all__ = ["create_server", "serve"]


def create_server(
    app: Any,
    *,
    sock: socket.socket | None = None,
    host: str = "127.0.0.1",
    port: int = 8080,
    filter: FilterSpecs = "httpready",
    core: str = "c",
    policy: dict[str, Any] | None = None,
    **adjustments: Any,
) -> tuple[Any, FilteredListener]:
    """A waitress server (not yet running: call ``server.run()``) and its listener.

    ``sock`` (a listening socket, owned from now on) replaces ``host``/``port``;
    ``policy`` goes to :func:`acceptfilter.wrap`; ``adjustments`` to waitress
    (``threads=``, ``connection_limit=`` ...; ``asyncore_use_poll`` defaults to True here:
    held connections take descriptors, and select() fails past 1023). The engine runs on its own
    thread: waitress's loop is a ``select()`` loop acceptfilter cannot join.
    """
    if any(k in adjustments for k in ("sockets", "listen", "unix_socket", "host", "port")):
        raise ValueError("give the address as sock= or host=/port=, not as waitress adjustments")
    # waitress's loop uses select() by default, which raises ValueError (and stops the server) on
    # a descriptor >= 1024. Idle connections held for a balancer push the ones it is handed past
    # that: with 1,100 held, the first request killed the server. poll() has no such limit.
    adjustments.setdefault("asyncore_use_poll", True)
    raw = sock or socket.create_server((host, port), backlog=adjustments.get("backlog", 1024))
    try:
        server = waitress.server.create_server(app, sockets=[raw], _start=False, **adjustments)
        listener = wrap(raw, filter, core=core, **(policy or {}))
    except Exception:
        raw.close()
        raise
    index_peers(listener)
    socket_map = server._map
    server.del_channel(socket_map)  # waitress selected on the raw socket's fd until now
    listener.setblocking(False)
    server.set_socket(listener, socket_map)
    server.accept_connections()
    return server, listener


def serve(app: Any, **kwargs: Any) -> None:
    """Like ``waitress.serve(app, ...)`` behind a filter (keywords: see :func:`create_server`)."""
    server, listener = create_server(app, **kwargs)
    try:
        server.print_listen("Serving on http://{}:{} behind acceptfilter")
        server.run()
    finally:
        listener.close()
