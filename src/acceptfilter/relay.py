"""Relay a route's connections to a TCP backend (sslh-style protocol multiplexing on one port).

Used by ``acceptfilter serve --route ... --forward NAME=HOST:PORT``: the bytes the
filters peeked are still unread, so the backend sees the stream from byte 0.

* ``TCP_NODELAY`` on both sides: a relay that coalesces small writes adds
  Nagle + delayed-ACK stalls of ~40 ms to every small response (a TLS request
  took 48 ms through the relay against 4.8 ms direct before).
* The bytes never enter Python, and no Python runs per message: a relayed
  connection is one thread inside one C call (``acceptfilter._relay``,
  csrc/afrelay.c) that polls both sockets and moves each direction with
  ``splice(2)`` socket -> pipe -> socket, the GIL released for the whole connection.
  Without the C module (or with ``ACCEPTFILTER_RELAY_PUMP=splice``) each
  direction is a Python thread looping over ``os.splice``; ``=copy`` is the
  old recv/sendall loop. bench/relay.py measures the three side by side.
* ``send_proxy=1`` or ``2`` writes a PROXY protocol v1/v2 header first (like
  HAProxy's ``send-proxy``/``send-proxy-v2``), so the backend sees the real
  client address (the one ``accept()`` gave: a ``proxy`` filter's client if a
  balancer sent one) and the address it connected to.
* Every relayed connection is logged at INFO when it ends: route, client,
  backend, SNI and JA4 when a ``tlsready`` filter saw a ClientHello, bytes
  each way and duration.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from .listener import FilteredListener

__all__ = ["Forward", "forward", "parse_forward", "parse_target", "proxy_header"]

log = logging.getLogger("acceptfilter.relay")

_CHUNK = 1 << 16

try:
    from ._relay import ffi as _ffi
    from ._relay import lib as _lib
except ImportError:  # built without the C relay: pump from Python
    _lib = None


def _pump_kind() -> str:
    """``c`` (one GIL-free C call per connection), ``splice`` (os.splice threads) or ``copy``."""
    wanted = os.environ.get("ACCEPTFILTER_RELAY_PUMP", "").strip().lower()
    if wanted == "copy" or not hasattr(os, "splice"):
        return "copy"
    if wanted == "splice" or _lib is None:
        return "splice"
    return "c"


PUMP = _pump_kind()
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"


def parse_target(text: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[V6]:PORT``; ValueError with a clear message otherwise."""
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected HOST:PORT, not {text!r}")
    return host, int(port)


@dataclass(frozen=True)
class Forward:
    """Where a route's connections go, and whether a PROXY header precedes their bytes."""

    target: tuple[str, int]
    send_proxy: int | None = None  # None, 1 or 2
    connect_timeout: float = 10.0

    def __str__(self) -> str:
        proxy = f" with PROXY v{self.send_proxy}" if self.send_proxy else ""
        return f"{self.target[0]}:{self.target[1]}{proxy}"


def parse_forward(text: str) -> Forward:
    """``HOST:PORT[,proxy=v1|v2]`` (the part after ``NAME=`` in ``--forward``)."""
    target, *options = text.split(",")
    send_proxy: int | None = None
    for option in options:
        key, _, value = option.partition("=")
        if key.strip() != "proxy" or value.strip() not in ("v1", "v2", "1", "2"):
            raise ValueError(f"unknown forward option {option!r}: the one option is proxy=v1 or proxy=v2")
        send_proxy = int(value.strip()[-1])
    return Forward(parse_target(target), send_proxy)


# -- PROXY protocol, the sending side ----------------------------------------------------------
def _ip(address: Any) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    if not isinstance(address, tuple) or len(address) < 2:
        return None
    try:
        ip = ipaddress.ip_address(str(address[0]).split("%")[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def proxy_header(version: int, source: Any, destination: Any) -> bytes:
    """A PROXY v1 or v2 header for a TCP connection from ``source`` to ``destination`` (socket addresses).

    Both addresses are put in one family, as the protocol requires: IPv4 when
    both are IPv4 (IPv4-mapped IPv6 counts as IPv4), otherwise IPv6 (an IPv4
    address then travels as ``::ffff:a.b.c.d``). A source that is not an IP
    address (a UNIX socket) gives v1 ``UNKNOWN`` / v2 ``LOCAL``: the backend
    then uses the relay's own address, as the spec says.
    """
    src, dst = _ip(source), _ip(destination)
    if src is None or dst is None:
        if version == 1:
            return b"PROXY UNKNOWN\r\n"
        return V2_SIGNATURE + b"\x20\x00\x00\x00"
    sport, dport = int(source[1]), int(destination[1])
    if src.version != dst.version:
        src, dst = (ipaddress.IPv6Address(f"::ffff:{a}") if a.version == 4 else a for a in (src, dst))
    if version == 1:
        proto = "TCP4" if src.version == 4 else "TCP6"
        return f"PROXY {proto} {src} {dst} {sport} {dport}\r\n".encode("ascii")
    fam = 0x11 if src.version == 4 else 0x21
    body = src.packed + dst.packed + struct.pack("!HH", sport, dport)
    return V2_SIGNATURE + bytes([0x21, fam]) + struct.pack("!H", len(body)) + body


# -- pumping -------------------------------------------------------------------------------------
@dataclass
class _Tally:
    up: int = 0  # client -> backend
    down: int = 0  # backend -> client
    errors: list[str] = field(default_factory=list)


def _splice_pump(src: socket.socket, dst: socket.socket) -> int:
    """Move bytes src -> dst through a pipe with splice(2) until EOF; returns the count."""
    total = 0
    r, w = os.pipe2(os.O_CLOEXEC)
    try:
        s, d = src.fileno(), dst.fileno()
        while True:
            n = os.splice(s, w, _CHUNK, flags=os.SPLICE_F_MOVE)
            if n == 0:
                return total
            while n:
                m = os.splice(r, d, n, flags=os.SPLICE_F_MOVE)
                n -= m
                total += m
    finally:
        os.close(r)
        os.close(w)


def _copy_pump(src: socket.socket, dst: socket.socket) -> int:
    """The portable fallback (no splice): bytes through Python."""
    total = 0
    while data := src.recv(_CHUNK):
        dst.sendall(data)
        total += len(data)
    return total


def _pump(src: socket.socket, dst: socket.socket, tally: _Tally, up: bool) -> None:
    count = 0
    try:
        count = _splice_pump(src, dst) if PUMP == "splice" else _copy_pump(src, dst)
    except OSError as exc:
        tally.errors.append(f"{'up' if up else 'down'}: {exc.strerror or exc}")
    finally:
        if up:
            tally.up += count
        else:
            tally.down += count
        try:
            dst.shutdown(socket.SHUT_WR)  # pass the half-close on
        except OSError:
            pass


def _c_pump(client: socket.socket, backend: socket.socket, tally: _Tally) -> None:
    """Both directions in one C call without the GIL (csrc/afrelay.c); returns when both ended."""
    assert _lib is not None
    counts = _ffi.new("uint64_t[2]")
    rc = _lib.afr_relay(client.fileno(), backend.fileno(), counts, counts + 1)
    tally.up += int(counts[0])
    tally.down += int(counts[1])
    if rc < 0:
        tally.errors.append(os.strerror(-rc))


def _nodelay(sock: socket.socket) -> None:
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:
        pass  # not TCP (a UNIX socket): nothing to do


def relay(client: socket.socket, address: Any, info: Any, fwd: Forward, route: str = "") -> _Tally:
    """Relay one connection to ``fwd`` until both directions end; log it; return the byte counts."""
    started = time.monotonic()
    tally = _Tally()
    client.settimeout(None)
    _nodelay(client)
    try:
        backend = socket.create_connection(fwd.target, timeout=fwd.connect_timeout)
    except OSError as exc:
        log.warning("route %s: cannot reach backend %s:%d: %s; closing the client %s", route, fwd.target[0],
                    fwd.target[1], exc.strerror or exc, _fmt(address))
        client.close()
        tally.errors.append(f"connect: {exc}")
        return tally
    backend.settimeout(None)
    _nodelay(backend)
    try:
        if fwd.send_proxy:
            try:
                destination = client.getsockname()
            except OSError:
                destination = None
            backend.sendall(proxy_header(fwd.send_proxy, address, destination))
        if PUMP == "c":
            _c_pump(client, backend, tally)
        else:
            other = threading.Thread(target=_pump, args=(backend, client, tally, False), daemon=True,
                                     name=f"acceptfilter-relay-{route}")
            other.start()
            _pump(client, backend, tally, True)
            other.join()
    except OSError as exc:
        tally.errors.append(f"proxy header: {exc}")
    finally:
        client.close()
        backend.close()
    _log(route, address, fwd, info, tally, time.monotonic() - started)
    return tally


def _fmt(address: Any) -> str:
    if isinstance(address, tuple) and len(address) >= 2:
        return f"[{address[0]}]:{address[1]}" if ":" in str(address[0]) else f"{address[0]}:{address[1]}"
    return str(address or "?")


def _log(route: str, address: Any, fwd: Forward, info: Any, tally: _Tally, seconds: float) -> None:
    details = getattr(info, "info", {}) or {}
    extra = "".join(f" {key}={details[key]}" for key in ("sni", "ja4") if details.get(key))
    why = getattr(info, "reason", "")
    errors = f" ({'; '.join(tally.errors)})" if tally.errors else ""
    log.info("forwarded route=%s client=%s backend=%s:%d reason=%s%s up=%d down=%d seconds=%.3f%s", route,
             _fmt(address), fwd.target[0], fwd.target[1], why, extra, tally.up, tally.down, seconds, errors)


def _accept_loop(listener: FilteredListener, fwd: Forward) -> None:
    listener.settimeout(None)
    while True:
        try:
            client, address, info = listener.accept_with_info()
        except OSError:
            return  # the listener was closed
        threading.Thread(target=relay, args=(client, address, info, fwd, listener.route), daemon=True,
                         name=f"acceptfilter-relay-{listener.route}").start()


def forward(listener: FilteredListener, target: tuple[str, int] | Forward) -> threading.Thread:
    """Relay every connection surfaced by ``listener`` to ``target`` until the listener is closed."""
    fwd = target if isinstance(target, Forward) else Forward(target)
    thread = threading.Thread(target=_accept_loop, args=(listener, fwd), name=f"acceptfilter-forward-{listener.route}",
                              daemon=True)
    thread.start()
    return thread
