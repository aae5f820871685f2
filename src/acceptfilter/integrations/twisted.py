"""Twisted: ready connections handed over with ``reactor.adoptStreamConnection``.

Twisted's ``listenTCP`` accepts in its own ``tcp.Port``; instead, a reader on
the listener's eventfd accepts ready connections and adopts them (Twisted
dups the fd, so ours is closed right after). The engine runs on the
background thread, or on the asyncio loop with no thread when the reactor is
Twisted's ``AsyncioSelectorReactor``::

    port = listen(reactor, 8000, Site(root), filter="httpready")

Protocols get the filter's info with :func:`transport_info` (from
``dataReceived`` on: adoption calls ``connectionMade`` before it is recorded).
"""

from __future__ import annotations

import socket
import weakref
from typing import Any

from twisted.internet.interfaces import IReadDescriptor
from twisted.python.failure import Failure
from zope.interface import implementer

from ..engine import ConnectionInfo
from ..listener import FilteredListener, FilterSpecs, wrap
from ._tcp import bind_tcp
from .asyncio import attach

__all__ = ["FilteredPort", "listen", "listen_socket", "transport_info", "transport_info_by_peer"]

_infos: weakref.WeakKeyDictionary[Any, ConnectionInfo] = weakref.WeakKeyDictionary()
#: Adopted transports by TCP peer, for servers that tell the application only the
#: peer address (Daphne's ASGI ``scope["client"]``); weak: gone with the connection.
_by_peer: weakref.WeakValueDictionary[tuple[str, int], Any] = weakref.WeakValueDictionary()


def transport_info(transport: Any) -> ConnectionInfo | None:
    """What the filters learnt about the connection behind ``transport``."""
    return _infos.get(transport)


def transport_info_by_peer(host: str, port: int) -> ConnectionInfo | None:
    """What the filters learnt about the open connection from TCP peer ``(host, port)``, or None."""
    transport = _by_peer.get((host, int(port)))
    return None if transport is None else _infos.get(transport)


@implementer(IReadDescriptor)
class FilteredPort:
    """Reads the listener's readiness fd and adopts each ready connection into ``factory``."""

    def __init__(self, reactor: Any, listener: FilteredListener, factory: Any) -> None:
        listener.setblocking(False)
        self.reactor = reactor
        self.listener = listener
        self.factory = factory
        self._fd = listener.fileno()
        self._listening = True
        factory.doStart()
        reactor.addReader(self)

    def fileno(self) -> int:
        return self._fd

    def logPrefix(self) -> str:
        return "acceptfilter"

    def doRead(self) -> None:
        while True:
            try:
                sock, _, info = self.listener.accept_with_info()
            except (BlockingIOError, OSError):
                return
            with sock:
                transport = self.reactor.adoptStreamConnection(sock.fileno(), sock.family, self.factory)
            if transport is not None:
                _infos[transport] = info
                peer = getattr(transport, "client", None)  # tcp.Server's (host, port)
                if isinstance(peer, tuple) and len(peer) >= 2:
                    _by_peer[(str(peer[0]), int(peer[1]))] = transport

    def connectionLost(self, reason: Failure) -> None:
        self.stopListening()

    def getHost(self) -> Any:
        return self.listener.getsockname()

    def stopListening(self) -> None:
        """Stop adopting and close the listener (held connections resolved by policy). Idempotent."""
        if not self._listening:
            return
        self._listening = False
        self.reactor.removeReader(self)
        self.listener.close()
        self.factory.doStop()


def listen(
    reactor: Any,
    port: int,
    factory: Any,
    *,
    interface: str = "",
    filter: FilterSpecs = "httpready",
    backlog: int = 1024,
    **options: Any,
) -> FilteredPort:
    """Like ``reactor.listenTCP(port, factory, interface=...)`` behind ``filter``.

    ``interface`` defaults to every IPv4 interface, as ``listenTCP``'s does (``"::"``: IPv6 and IPv4).
    """
    return listen_socket(reactor, bind_tcp(interface, port, backlog), factory,
                         filter=filter, **options)


def listen_socket(reactor: Any, sock: socket.socket, factory: Any, *, filter: FilterSpecs = "httpready",
                  **options: Any) -> FilteredPort:
    """Serve ``factory`` on a listening socket you made (or inherited) behind ``filter``; owns ``sock``."""
    loop = getattr(reactor, "_asyncioEventloop", None)  # Twisted's AsyncioSelectorReactor
    try:
        listener = wrap(sock, filter, driver="none" if loop is not None else "thread", **options)
    except Exception:
        sock.close()
        raise
    if loop is not None:
        attach(listener, loop)
    return FilteredPort(reactor, listener, factory)
