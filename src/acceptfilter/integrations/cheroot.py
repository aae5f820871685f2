"""cheroot (CherryPy's server) behind a filter: its worker threads only get ready connections.

cheroot hands each accepted connection to a fixed pool of worker threads
(10 by default), and a worker reads the request itself: an idle or
slowloris connection pins a worker until cheroot's ``timeout``. cheroot
selects on its listen socket's ``fileno()`` and calls ``accept()`` on it, so
a listener in its place is all it takes. :class:`FilterMixIn` wraps the
socket as soon as cheroot has bound and listened on it (in ``bind()``, before
``prepare()`` builds the connection manager)::

    from cheroot import wsgi
    from acceptfilter.integrations.cheroot import FilterMixIn

    class Server(FilterMixIn, wsgi.Server):
        accept_filter = "httpready"
        accept_filter_options = {"timeout": 10}

    Server(("0.0.0.0", 8080), app).safe_start()

or ``Server = acceptfilter.integrations.cheroot.Server`` (httpready, default
policy). cheroot's own systemd activation (``LISTEN_PID`` set) skips ``bind()``
and is not filtered; use ``acceptfilter serve``'s activation or bind yourself.
The application reads what the filters learnt with
:func:`acceptfilter.integrations.wsgi.environ_info`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import cheroot.wsgi

from ..listener import FilteredListener, FilterSpecs, wrap
from .asgi import index_peers

__all__ = ["FilterMixIn", "Server"]


class FilterMixIn:
    """Mix in before ``cheroot.wsgi.Server`` (or ``cheroot.server.HTTPServer``) to filter its TCP socket."""

    accept_filter: ClassVar[FilterSpecs] = "httpready"
    accept_filter_options: ClassVar[Mapping[str, Any]] = {}
    listener: FilteredListener | None = None

    def bind(self, family: int, type: int, proto: int = 0) -> Any:
        sock = super().bind(family, type, proto)  # type: ignore[misc]
        if isinstance(self.bind_addr, str | bytes):  # type: ignore[attr-defined]
            return sock  # a UNIX socket: nothing to filter
        sock.listen(self.request_queue_size)  # type: ignore[attr-defined]  # the engine accepts from now on
        listener = wrap(sock, self.accept_filter, **self.accept_filter_options)
        index_peers(listener)
        self.listener = listener
        self.socket = listener
        return listener


class Server(FilterMixIn, cheroot.wsgi.Server):
    """``cheroot.wsgi.Server`` behind httpready (subclass to change the filter or its options)."""
