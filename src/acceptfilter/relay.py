"""Relay a route's connections to a TCP backend (sslh-style protocol multiplexing on one port).

Used by ``acceptfilter serve --route ... --forward NAME=HOST:PORT``: the bytes the
filters peeked are still unread, so the backend sees the stream from byte 0.

* ``TCP_NODELAY`` on both sides: a relay that coalesces small writes adds
  Nagle + delayed-ACK stalls of ~40 ms to every small response (a TLS request
  took 48 ms through the relay against 4.8 ms direct before).
* The bytes never enter Python, and no Python runs per message: every relayed
  connection of the process is handed to ONE event loop in C
  (``acceptfilter._relay``, csrc/afloop.c), a thread that spends its life in one
  GIL-free call: edge-triggered epoll over every relayed socket, several
  messages per wake-up, recv/send through one shared buffer (a per-direction
  buffer only while a peer is slow: backpressure), half-close passed on, an
  error on one side ending both. Its thread never takes the GIL: finished
  connections go through a queue to a second thread that logs them. A thread
  per connection (the pump before, ``ACCEPTFILTER_RELAY_PUMP=thread``: one C
  call per connection, poll + splice) cost a wake-up and a context switch per
  message, which two cores shared with the backend and its clients could not
  afford; bench/relay.py measures both.
* Per connection, Python does only what it must: the accept loop (one thread
  per forwarded route) takes the connection, starts a non-blocking connect to
  the backend and hands both fds to the loop, which finishes the connect
  (``connect_timeout``), sends the PROXY header and relays. No thread is
  started and nothing blocks per connection.
* Without the C module (or with ``ACCEPTFILTER_RELAY_PUMP=splice``) each
  direction is a Python thread looping over ``os.splice``; ``=copy`` is the
  first recv/sendall loop. ``=c-copy`` and ``=c-splice`` pick how the C loop
  moves bytes (recv/send or splice through a pipe); ``c`` is the measured better one.
* ``send_proxy=1`` or ``2`` writes a PROXY protocol v1/v2 header first (like
  HAProxy's ``send-proxy``/``send-proxy-v2``), so the backend sees the real
  client address (the one ``accept()`` gave: a ``proxy`` filter's client if a
  balancer sent one) and the address it connected to.
* Every relayed connection is logged at INFO when it ends: route, client,
  backend, SNI and JA4 when a ``tlsready`` filter saw a ClientHello, bytes
  each way and duration.
* The loop lives while something uses it (a ``forward()`` accept loop, a
  ``relay()`` call): when the last listener closes, the loop stops, closes
  every relayed connection (logged ``relay stopped``) and its thread ends.
"""

from __future__ import annotations

import errno
import ipaddress
import itertools
import logging
import os
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .listener import FilteredListener
from .pycore import oob_inline

__all__ = ["Forward", "RelayLoop", "forward", "loop_stats", "parse_forward", "parse_target", "proxy_header", "relay"]

log = logging.getLogger("acceptfilter.relay")

_CHUNK = 1 << 16

try:
    from ._relay import ffi as _ffi
    from ._relay import lib as _lib
except ImportError:  # built without the C relay: pump from Python
    _lib = None


#: What each ``ACCEPTFILTER_RELAY_PUMP`` value runs.
PUMPS = {
    "c": "one C event loop for every connection (the default; its byte mover: the measured better one)",
    "c-copy": "one C event loop, recv/send through a buffer",
    "c-splice": "one C event loop, splice(2) through a pipe per direction",
    "thread": "one C call per connection, in its own thread (poll + splice)",
    "splice": "os.splice from two Python threads per connection",
    "copy": "recv/sendall from two Python threads per connection",
}
#: The C loop's byte mover for ``c``: see bench/relay.py and the README.
DEFAULT_LOOP_MODE = "copy"


def _pump_kind() -> str:
    """The pump ``ACCEPTFILTER_RELAY_PUMP`` asks for, or the best one available."""
    wanted = os.environ.get("ACCEPTFILTER_RELAY_PUMP", "").strip().lower() or "c"
    if wanted not in PUMPS:
        log.warning("ACCEPTFILTER_RELAY_PUMP=%s is not one of %s: using c", wanted, ", ".join(PUMPS))
        wanted = "c"
    if wanted == "c":
        wanted = f"c-{DEFAULT_LOOP_MODE}"
    if not hasattr(os, "splice"):
        return "copy"
    if _lib is None and (wanted.startswith("c-") or wanted == "thread"):
        return "splice"
    return wanted


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
                # EOF, or a TCP urgent mark: splice stops there (returning 0 however much follows).
                # recv reads past it (the urgent byte inline: SO_OOBINLINE); b"" is a real EOF.
                data = src.recv(_CHUNK)
                if not data:
                    return total
                dst.sendall(data)
                total += len(data)
                continue
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


def _unreachable(route: str, fwd: Forward, address: Any, why: str) -> None:
    log.warning("route %s: cannot reach backend %s:%d: %s; closing the client %s", route, fwd.target[0],
                fwd.target[1], why, _fmt(address))


def _thread_relay(client: socket.socket, address: Any, info: Any, fwd: Forward, route: str) -> _Tally:
    """The pumps that are a thread per connection (``thread``, ``splice``, ``copy``)."""
    started = time.monotonic()
    tally = _Tally()
    client.settimeout(None)
    _nodelay(client)
    oob_inline(client)
    try:
        backend = socket.create_connection(fwd.target, timeout=fwd.connect_timeout)
    except OSError as exc:
        _unreachable(route, fwd, address, exc.strerror or str(exc))
        client.close()
        tally.errors.append(f"connect: {exc}")
        return tally
    backend.settimeout(None)
    _nodelay(backend)
    oob_inline(backend)
    try:
        if fwd.send_proxy:
            backend.sendall(_header_for(client, address, fwd))
        if PUMP == "thread":
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


def _header_for(client: socket.socket, address: Any, fwd: Forward) -> bytes:
    if not fwd.send_proxy:
        return b""
    try:
        destination = client.getsockname()
    except OSError:
        destination = None
    return proxy_header(fwd.send_proxy, address, destination)


# -- the C loop ------------------------------------------------------------------------------------
_WHY = {1: "connect", 2: "client", 3: "backend"}  # AFR_END_CONNECT, _CLIENT, _BACKEND


@dataclass
class _Job:
    """A connection the loop relays: what its log line needs, and who waits for its end."""

    route: str
    address: Any
    info: Any
    fwd: Forward
    started: float
    on_done: Callable[[_Tally], None] | None = None


def _connect_nonblocking(target: tuple[str, int]) -> tuple[socket.socket, bool]:
    """A socket connecting to ``target`` without waiting; True if the connect is still in progress.

    The first address getaddrinfo gives (``serve`` resolves its targets once,
    at start, so this is an IP address there and getaddrinfo does no lookup).
    """
    family, _, proto, _, address = socket.getaddrinfo(target[0], target[1], type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, socket.SOCK_STREAM, proto)
    sock.setblocking(False)
    err = sock.connect_ex(address)
    if err in (0, errno.EINPROGRESS):
        return sock, err != 0
    sock.close()
    raise OSError(err, os.strerror(err))


class RelayLoop:
    """One C event loop (csrc/afloop.c) relaying every connection handed to it, until :meth:`close`.

    Two threads: one runs ``afr_loop_run`` (the loop, one GIL-free call for
    its whole life), one waits in ``afr_loop_reap`` for finished connections
    and logs them, so the loop never waits for the GIL.
    """

    def __init__(self, mode: str = DEFAULT_LOOP_MODE) -> None:
        if _lib is None:
            raise RuntimeError("the C relay (acceptfilter._relay) is not built")
        loop = _lib.afr_loop_new(_lib.AFR_SPLICE if mode == "splice" else _lib.AFR_COPY)
        if loop == _ffi.NULL:
            raise OSError(_ffi.errno, os.strerror(_ffi.errno))
        self._loop = loop
        self.mode = mode
        self._jobs: dict[int, _Job] = {}
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._close_lock = threading.Lock()  # one close() at a time; the others wait for it
        self._closed = False
        self._runner = threading.Thread(target=self._run, name="acceptfilter-relay-loop", daemon=True)
        self._reaper = threading.Thread(target=self._reap, name="acceptfilter-relay-reaper", daemon=True)
        self._runner.start()
        self._reaper.start()

    def _run(self) -> None:
        rc = _lib.afr_loop_run(self._loop)
        if rc < 0:
            log.error("the relay loop failed: %s; its connections were closed", os.strerror(-rc))

    def _reap(self) -> None:
        out = _ffi.new("struct afr_done[]", 64)
        while (n := _lib.afr_loop_reap(self._loop, out, 64, -1)) >= 0:
            for i in range(n):
                with self._lock:
                    job = self._jobs.pop(int(out[i].id), None)
                if job is not None:
                    try:
                        self._ended(job, out[i])
                    except Exception:  # a broken handler or callback must not stop the reaping
                        log.exception("relay: reporting the end of a connection failed")

    @staticmethod
    def _ended(job: _Job, done: Any) -> None:
        tally = _Tally(int(done.up), int(done.down))
        why, err = int(done.why), int(done.err)
        if why == _lib.AFR_END_CONNECT:
            _unreachable(job.route, job.fwd, job.address, os.strerror(err))
            tally.errors.append(f"connect: {os.strerror(err)}")
        else:
            if why == _lib.AFR_END_STOPPED:
                tally.errors.append("relay stopped")
            elif why != _lib.AFR_END_OK:
                tally.errors.append(f"{_WHY.get(why, '?')}: {os.strerror(err)}")
            _log(job.route, job.address, job.fwd, job.info, tally, time.monotonic() - job.started)
        if job.on_done is not None:
            job.on_done(tally)

    def relay(self, client: socket.socket, address: Any, info: Any, fwd: Forward, route: str = "",
              on_done: Callable[[_Tally], None] | None = None) -> None:
        """Start relaying ``client`` to ``fwd`` and return; the loop owns (and closes) the socket from now on.

        ``on_done`` is called with the byte counts when the connection ended
        (in the reaper thread: keep it short).
        """
        if self._closed:
            raise RuntimeError("the relay loop is closed")
        job = _Job(route, address, info, fwd, time.monotonic(), on_done)
        try:
            head = _header_for(client, address, fwd)
            backend, connecting = _connect_nonblocking(fwd.target)
        except OSError as exc:
            client.close()
            _unreachable(route, fwd, address, exc.strerror or str(exc))
            if on_done is not None:
                on_done(_Tally(errors=[f"connect: {exc}"]))
            return
        with self._lock:  # held across the add: close() frees the C loop under it
            if self._closed:
                backend.close()
                raise RuntimeError("the relay loop is closed")
            ident = next(self._ids)
            self._jobs[ident] = job
            cfd, bfd = client.detach(), backend.detach()
            rc = _lib.afr_loop_add(self._loop, cfd, bfd, int(connecting), head, len(head),
                                   min(max(1, int(fwd.connect_timeout * 1000)), 2**31 - 1), ident)
            if rc < 0:
                self._jobs.pop(ident, None)
        if rc < 0:  # the loop is stopping: the fds are still ours
            os.close(cfd)
            os.close(bfd)
            tally = _Tally(errors=[f"relay: {os.strerror(-rc)}"])
            _log(route, address, fwd, info, tally, time.monotonic() - job.started)
            if on_done is not None:
                on_done(tally)

    def stats(self) -> dict[str, int]:
        """Connections live (of which connecting), bytes buffered for slow peers, pipes open."""
        out = _ffi.new("uint64_t[4]")
        with self._lock:
            if self._closed:
                return {"live": 0, "connecting": 0, "buffered": 0, "pipes": 0}
            _lib.afr_loop_stats(self._loop, out)
        return {"live": int(out[0]), "connecting": int(out[1]), "buffered": int(out[2]), "pipes": int(out[3])}

    def close(self) -> None:
        """Stop the loop: every connection is closed and logged; both threads end. Idempotent.

        :meth:`relay` raises RuntimeError afterwards (the caller keeps its socket).
        """
        with self._close_lock:
            with self._lock:
                if self._closed:
                    return
            _lib.afr_loop_stop(self._loop)  # from now on afr_loop_add refuses
            self._runner.join()
            self._reaper.join()
            with self._lock:
                self._closed = True
                _lib.afr_loop_free(self._loop)


_shared_lock = threading.Lock()
_shared: RelayLoop | None = None
_shared_users = 0


def _acquire() -> RelayLoop:
    """The process's relay loop, started on first use; pair with :func:`_release`."""
    global _shared, _shared_users
    with _shared_lock:
        if _shared is None:
            _shared = RelayLoop(PUMP.removeprefix("c-"))
        _shared_users += 1
        return _shared


def _release(loop: RelayLoop) -> None:
    """The last user gone: stop the loop (its connections are closed) and wait for its threads."""
    global _shared, _shared_users
    with _shared_lock:
        _shared_users -= 1
        if _shared_users > 0:
            return
        _shared = None
        loop.close()  # under the lock: a new user waits for a fresh loop, never gets this one


def loop_stats() -> dict[str, int] | None:
    """The shared relay loop's :meth:`RelayLoop.stats`, or None when none runs."""
    with _shared_lock:
        loop = _shared
    return loop.stats() if loop is not None else None


def relay(client: socket.socket, address: Any, info: Any, fwd: Forward, route: str = "") -> _Tally:
    """Relay one connection to ``fwd`` until both directions end; log it; return the byte counts."""
    if not PUMP.startswith("c-"):
        return _thread_relay(client, address, info, fwd, route)
    result: list[_Tally] = []
    ended = threading.Event()

    def done(tally: _Tally) -> None:
        result.append(tally)
        ended.set()

    loop = _acquire()
    try:
        loop.relay(client, address, info, fwd, route, done)
        ended.wait()
    finally:
        _release(loop)
    return result[0]


def _fmt(address: Any) -> str:
    if isinstance(address, tuple) and len(address) >= 2:
        return f"[{address[0]}]:{address[1]}" if ":" in str(address[0]) else f"{address[0]}:{address[1]}"
    return str(address or "?")


#: How a peer that is done may end a connection: TLS peers often close right after close_notify, and the
#: other side's last bytes then meet a reset. After both sides spoke, that is the normal end of a session.
_CLOSING = (os.strerror(errno.ECONNRESET), os.strerror(errno.EPIPE))


def _log(route: str, address: Any, fwd: Forward, info: Any, tally: _Tally, seconds: float) -> None:
    details = getattr(info, "info", {}) or {}
    extra = "".join(f" {key}={details[key]}" for key in ("sni", "ja4") if details.get(key))
    why = getattr(info, "reason", "")
    if tally.up and tally.down and tally.errors and all(e.endswith(_CLOSING) for e in tally.errors):
        errors = " closed=reset"  # not an error: a session that ended (psql over TLS does this every time)
    else:
        errors = f" ({'; '.join(tally.errors)})" if tally.errors else ""
    log.info("forwarded route=%s client=%s backend=%s:%d reason=%s%s up=%d down=%d seconds=%.3f%s", route,
             _fmt(address), fwd.target[0], fwd.target[1], why, extra, tally.up, tally.down, seconds, errors)


def _accept_loop(listener: FilteredListener, fwd: Forward, loop: RelayLoop | None) -> None:
    try:
        listener.settimeout(None)
        while True:
            try:
                client, address, info = listener.accept_with_info()
            except OSError:
                return  # the listener was closed
            if loop is not None:
                loop.relay(client, address, info, fwd, listener.route)
            else:
                threading.Thread(target=_thread_relay, args=(client, address, info, fwd, listener.route),
                                 daemon=True, name=f"acceptfilter-relay-{listener.route}").start()
    finally:
        if loop is not None:
            _release(loop)


def forward(listener: FilteredListener, target: tuple[str, int] | Forward) -> threading.Thread:
    """Relay every connection surfaced by ``listener`` to ``target`` until the listener is closed.

    Returns the accept thread: once the listener is closed it ends, and when
    it was the relay loop's last user, the loop's connections are closed and
    its threads have ended by the time it does (join it to know).
    """
    fwd = target if isinstance(target, Forward) else Forward(target)
    # Taken here, not in the thread: on serve's reload the new listeners' forwards hold the
    # loop before the old listeners close, so relayed connections in flight live on.
    loop = _acquire() if PUMP.startswith("c-") else None
    thread = threading.Thread(target=_accept_loop, args=(listener, fwd, loop),
                              name=f"acceptfilter-forward-{listener.route}", daemon=True)
    try:
        thread.start()
    except BaseException:
        if loop is not None:
            _release(loop)
        raise
    return thread
