"""socketserver and http.server (including ThreadingMixIn and ForkingMixIn).

``socketserver.BaseServer`` selects on ``self.socket.fileno()`` and calls
``self.socket.accept()``: a FilteredListener in place of ``self.socket`` is
all it takes. Either mix :class:`FilterMixIn` into the server class::

    class Server(FilterMixIn, http.server.ThreadingHTTPServer):
        accept_filter = "httpready"
        accept_filter_options = {"timeout": 5}

or put a filter in front of a server that already exists::

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 8000), Handler)
    install(server, "httpready")

Handlers read what the filter learnt with ``acceptfilter.connection_info(self.request)``.
"""

from __future__ import annotations

import socketserver
from collections.abc import Mapping
from typing import Any, ClassVar

from ..listener import FilteredListener, FilterSpecs, wrap
from ..policy import WORKER_ON_TIMEOUT

__all__ = ["FilterMixIn", "install"]

#: The smallest listen backlog a filtered server keeps: what ``socket.listen()`` uses when not
#: told. socketserver listens with 5 (``request_queue_size``), and the kernel's accept queue
#: must absorb a burst of connections while the core's thread is in Python. In the hostile
#: soak 5 overflowed 129 times in 15 s, and a client whose handshake the kernel had completed
#: got a reset before the core ever saw it.
MIN_BACKLOG = 128


def install(server: socketserver.TCPServer, filter: FilterSpecs = "httpready", **options: Any) -> FilteredListener:
    """Wrap an activated server's listen socket; the server then only sees ready connections.

    ``on_timeout`` defaults to ``close`` here (:data:`acceptfilter.policy.WORKER_ON_TIMEOUT`),
    not ``surface``: every socketserver model (one thread, a thread or a
    process per connection) blocks a worker reading a surfaced connection, so
    surfacing idle or slowloris clients at the deadline would hand them the
    workers the filter kept them from.

    A listen backlog under :data:`MIN_BACKLOG` (socketserver's is 5) is raised to it.
    """
    current = server.socket
    if isinstance(current, FilteredListener):
        raise ValueError("this server's socket already has an accept filter")
    if options.get("on_timeout") is None:
        options["on_timeout"] = WORKER_ON_TIMEOUT
    if server.request_queue_size < MIN_BACKLOG:
        current.listen(MIN_BACKLOG)  # a listening socket takes a new backlog; a larger one is kept
    listener = wrap(current, filter, **options)
    server.socket = listener  # type: ignore[assignment]
    return listener


class FilterMixIn:
    """Mix in before a TCPServer subclass to filter its connections at activation."""

    accept_filter: ClassVar[FilterSpecs] = "httpready"
    accept_filter_options: ClassVar[Mapping[str, Any]] = {}

    def server_activate(self) -> None:
        super().server_activate()  # type: ignore[misc]
        install(self, self.accept_filter, **self.accept_filter_options)  # type: ignore[arg-type]
