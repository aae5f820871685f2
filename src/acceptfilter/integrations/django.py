"""Django's ``runserver`` behind a filter.

``runserver`` serves with ``django.core.servers.basehttp.WSGIServer``, a
``socketserver`` server (threaded by default: one thread per connection, so
idle and slowloris clients cost a thread each), and its command class names
the server class in ``server_cls``. Override the command in one of your apps
(``yourapp/management/commands/runserver.py``, listed before
``django.contrib.staticfiles`` in ``INSTALLED_APPS``)::

    from django.contrib.staticfiles.management.commands.runserver import Command as Base
    from acceptfilter.integrations.django import FilteredWSGIServer

    class Command(Base):
        server_cls = FilteredWSGIServer

A view reads what the filters learnt with
:func:`acceptfilter.integrations.wsgi.environ_info` on ``request.META``
(wsgiref's environ has no socket and no ``REMOTE_PORT``, so the server puts
the info into the environ itself, under ``"acceptfilter"``).
Subclass to change ``accept_filter`` and ``accept_filter_options``.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterable
from typing import Any

from django.core.servers.basehttp import WSGIServer

from ..listener import connection_info
from .socketserver import FilterMixIn

__all__ = ["FilteredWSGIServer"]

_current = threading.local()


class FilteredWSGIServer(FilterMixIn, WSGIServer):  # type: ignore[misc]
    """Django's development WSGIServer behind httpready; ``environ["acceptfilter"]`` is the ConnectionInfo."""

    accept_filter = "httpready"

    def finish_request(self, request: Any, client_address: Any) -> None:
        # Runs in the thread that serves this connection, for the whole connection.
        _current.info = connection_info(request) if isinstance(request, socket.socket) else None
        try:
            super().finish_request(request, client_address)
        finally:
            _current.info = None

    def set_app(self, application: Callable[..., Iterable[bytes]]) -> None:
        def with_info(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
            info = getattr(_current, "info", None)
            if info is not None:
                environ["acceptfilter"] = info
            return application(environ, start_response)

        super().set_app(with_info)
