"""The listen socket the ``listen``/``open_*_listener`` helpers bind, on the interfaces the call they stand in for uses.

``reactor.listenTCP(port, f)``, ``trio.open_tcp_listeners(port)`` and
``anyio.create_tcp_listener(local_port=port)`` listen on every interface when no
host is given; a stand-in that quietly listened on 127.0.0.1 would make a server
moved behind a filter unreachable from other machines. Each helper binds one socket:

* Twisted and trio: every IPv4 interface (``0.0.0.0``), IPv4 peers as plain ``a.b.c.d``
  (Twisted listens on IPv4 only; trio adds a second, IPv6-only socket, which one
  socket cannot be: pass ``"::"`` for IPv6 and IPv4);
* anyio: one dual-stack ``::`` socket where the machine has IPv6, as anyio does
  (IPv4 peers then read ``::ffff:a.b.c.d``), else ``0.0.0.0``.
"""

from __future__ import annotations

import socket

__all__ = ["bind_tcp"]


def bind_tcp(host: str | None, port: int, backlog: int, *, dual_stack: bool = False) -> socket.socket:
    """A listening TCP socket on ``host``: None or "" is every interface (IPv4 only, or IPv6 and IPv4
    with ``dual_stack`` where the machine has IPv6); ``"::"`` is IPv6 and IPv4."""
    name = (host or "").strip("[]")
    if not name and dual_stack and socket.has_dualstack_ipv6():
        name = "::"
    family = socket.AF_INET6 if ":" in name else socket.AF_INET
    dual = name == "::" and socket.has_dualstack_ipv6()
    return socket.create_server((name, port), family=family, backlog=backlog, dualstack_ipv6=dual)
