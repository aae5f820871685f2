"""Relay a route's connections to a TCP backend (sslh-style protocol multiplexing on one port).

Used by ``acceptfilter serve --route ... --forward NAME=HOST:PORT``: the bytes the
filters peeked are still unread, so the backend sees the stream from byte 0.
Two threads per relayed connection: meant for a handful of side protocols
(SSH, TLS to another server) beside the main one, not for bulk traffic.
"""

from __future__ import annotations

import logging
import socket
import threading

from .listener import FilteredListener

__all__ = ["forward", "parse_target"]

log = logging.getLogger("acceptfilter")


def parse_target(text: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[V6]:PORT``; ValueError with a clear message otherwise."""
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected HOST:PORT, not {text!r}")
    return host, int(port)


def _pump(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(65536):
            dst.sendall(data)
    except OSError:
        pass
    finally:
        try:
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass


def _relay(client: socket.socket, target: tuple[str, int]) -> None:
    try:
        backend = socket.create_connection(target, timeout=10)
    except OSError as exc:
        log.warning("cannot reach backend %s:%d: %s; closing the client", target[0], target[1], exc)
        client.close()
        return
    backend.settimeout(None)
    other = threading.Thread(target=_pump, args=(backend, client), daemon=True)
    other.start()
    _pump(client, backend)
    other.join()
    client.close()
    backend.close()


def _accept_loop(listener: FilteredListener, target: tuple[str, int]) -> None:
    listener.settimeout(None)
    while True:
        try:
            client, _ = listener.accept()
        except OSError:
            return  # the listener was closed
        threading.Thread(target=_relay, args=(client, target), daemon=True).start()


def forward(listener: FilteredListener, target: tuple[str, int]) -> threading.Thread:
    """Relay every connection surfaced by ``listener`` to ``target`` until it is closed."""
    thread = threading.Thread(target=_accept_loop, args=(listener, target), name=f"acceptfilter-forward-{listener.route}", daemon=True)
    thread.start()
    return thread
