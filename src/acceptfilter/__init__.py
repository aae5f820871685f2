"""acceptfilter: FreeBSD-style accept filters for any Linux server, in user space.

Hold each new connection in a cheap epoll set until it has sent something
worth waking the application for (any data, a complete HTTP request head, ...),
then hand it to the server's ``accept()`` with every byte still unread::

    import socket, acceptfilter

    sock = socket.create_server(("127.0.0.1", 8080))
    listener = acceptfilter.wrap(sock, "httpready", timeout=5)
    conn, addr = listener.accept()      # a complete request head is waiting

The documentation (docs/, a MkDocs site) covers servers, policies and writing your own filter.
"""

from __future__ import annotations

from .errors import AcceptFilterError, FilterLoadError, FilterSpecError, UnknownFilterError
from .filter import ACCEPT, DEFAULT_MAX_BYTES, REJECT, WAIT, Decision, Filter, Verdict
from .listener import ConnectionInfo, FilteredListener, connection_info, wrap
from .policy import Policy, Route
from .registry import available_filters, load_chain, load_filter, register_filter

__version__ = "0.1.0"

__all__ = [
    "ACCEPT",
    "DEFAULT_MAX_BYTES",
    "REJECT",
    "WAIT",
    "AcceptFilterError",
    "ConnectionInfo",
    "Decision",
    "Filter",
    "FilterLoadError",
    "FilterSpecError",
    "FilteredListener",
    "Policy",
    "Route",
    "UnknownFilterError",
    "Verdict",
    "available_filters",
    "connection_info",
    "load_chain",
    "load_filter",
    "register_filter",
    "wrap",
]
