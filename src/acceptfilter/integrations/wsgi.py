"""What the filters learnt, for WSGI applications on servers that hide the socket.

gunicorn and werkzeug put the connection's socket into the environ
(``gunicorn.socket``, ``werkzeug.socket``), so :func:`acceptfilter.connection_info`
works on it directly. waitress and cheroot give the application only the peer
address (``REMOTE_ADDR``, ``REMOTE_PORT``); their integrations index surfaced
sockets by TCP peer, weakly, for as long as the server keeps the connection,
and :func:`environ_info` looks the connection up either way::

    from acceptfilter.integrations.wsgi import environ_info

    def app(environ, start_response):
        info = environ_info(environ)      # ConnectionInfo, or None
        ...

A server-side rewrite of ``REMOTE_ADDR`` (waitress's ``trusted_proxy``) hides
the TCP peer; put the ``proxy`` filter in front instead.
"""

from __future__ import annotations

import socket
from collections.abc import Mapping
from typing import Any

from ..engine import ConnectionInfo
from ..listener import connection_info, connection_info_by_peer

__all__ = ["environ_info"]

_SOCKET_KEYS = ("gunicorn.socket", "werkzeug.socket")


def environ_info(environ: Mapping[str, Any]) -> ConnectionInfo | None:
    """The ConnectionInfo of the connection serving this WSGI request, or None when unknown."""
    given = environ.get("acceptfilter")  # put there by the server (Django's runserver integration)
    if isinstance(given, ConnectionInfo):
        return given
    for key in _SOCKET_KEYS:
        sock = environ.get(key)
        if isinstance(sock, socket.socket):
            info = connection_info(sock)
            if info is not None:
                return info
    host, port = environ.get("REMOTE_ADDR"), environ.get("REMOTE_PORT")
    if not host or not port:
        return None
    try:
        return connection_info_by_peer(str(host), int(port))
    except ValueError:
        return None
