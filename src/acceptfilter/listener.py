"""FilteredListener: the socket-like object servers ``accept()`` from.

It quacks like a listening ``socket.socket``: ``accept()`` returns an exact
``socket.socket`` (every byte the client sent still unread) and the peer
address; ``fileno()`` is an eventfd in semaphore mode holding one token per
queued connection, so level-triggered selectors neither miss nor spin;
blocking, non-blocking and timeout modes behave like a socket's; ``close()``
is idempotent. What the filters learnt reaches the application through
:func:`connection_info` or :meth:`FilteredListener.accept_with_info`, without
changing the socket type.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import threading
import time
import weakref
from collections.abc import Iterable, Iterator, Mapping
from types import MappingProxyType, TracebackType
from typing import Any, Literal, Protocol

from .decision import Decider
from .drivers.thread import ThreadDriver
from .engine import ConnectionInfo, Engine, Surfaced
from .errors import FilterSpecError
from .filter import Filter
from .iocore import Address, CoreName, IOCore, make_core
from .policy import DEFAULT_ON_TIMEOUT, Action, Policy, Route, default_max_held, parse_action
from .readyqueue import ReadyQueue, make_queue
from .registry import load_chain

__all__ = ["ConnectionInfo", "FilteredListener", "Router", "connection_info", "route", "wrap"]

log = logging.getLogger("acceptfilter")

FilterSpecs = str | Filter | Iterable[str | Filter]
DriverName = Literal["thread", "asyncio", "none"]


class Driver(Protocol):
    """Whatever runs the engine; the hub stops it before freeing the core."""

    def stop(self) -> None: ...

#: What the filters learnt, by a weak reference to the surfaced socket. A plain dict whose
#: entry removes itself (the reference's callback is the dict's own ``pop``) does what a
#: WeakKeyDictionary does without running Python per connection: no lock, no Python frame
#: to store, none when the socket goes away. Every operation on it is one atomic dict call.
#: A value is the ConnectionInfo, or the arguments to build it (see remember_certified).
_info_by_socket: dict[weakref.ref[socket.socket], ConnectionInfo | tuple[Any, ...]] = {}
_forget = _info_by_socket.pop
_info_lock = threading.Lock()  # for _socket_by_peer, a WeakValueDictionary
#: The info of a ConnectionInfo that parses its raw bytes on first use (ignored by it).
_UNPARSED: Mapping[str, Any] = MappingProxyType({})


def connection_info(sock: socket.socket) -> ConnectionInfo | None:
    """What the filters learnt about a socket returned by a FilteredListener, or None."""
    try:
        key = weakref.ref(sock)
    except TypeError:  # not a socket (nothing weakly referable was ever remembered)
        return None
    info = _info_by_socket.get(key)
    if isinstance(info, tuple):
        # Certified by a matcher and not asked about until now. Two threads asking at once
        # would build two equal ConnectionInfos; either is right.
        info = _info_by_socket[key] = ConnectionInfo(*info)  # an equal key: the entry keeps its callback
    return info


def _remember(sock: socket.socket, info: ConnectionInfo) -> None:
    """Keep ``info`` for as long as ``sock`` lives. Once per socket, which the caller has just built:
    a second call would leave two callbacks for one entry."""
    _info_by_socket[weakref.ref(sock, _forget)] = info


def remember_certified(sock: socket.socket, route: str, raw: bytes | None, consume: int, peer: Address,
                       decider: Decider) -> None:
    """:func:`_remember` for a connection a compiled matcher certified at its first look, without
    building its :class:`ConnectionInfo` until :func:`connection_info` asks (an application that
    never asks, most of them, pays for a tuple). Once per socket, as for :func:`_remember`."""
    _info_by_socket[weakref.ref(sock, _forget)] = (route, _UNPARSED, "ready", 0.0, consume, peer, raw, decider)


#: Surfaced sockets by their TCP peer (host, port), for servers that tell the
#: application only the peer address (ASGI's ``scope["client"]``). Weak: an
#: entry lives as long as the server keeps the socket object (its transport).
_socket_by_peer: weakref.WeakValueDictionary[tuple[str, int], socket.socket] = weakref.WeakValueDictionary()


def connection_info_by_peer(host: str, port: int) -> ConnectionInfo | None:
    """What the filters learnt about the open connection from TCP peer ``(host, port)``.

    Only for listeners whose peers are indexed (the uvicorn and Hypercorn
    integrations turn it on); None when unknown or already closed.
    """
    with _info_lock:
        sock = _socket_by_peer.get((host, int(port)))
    return None if sock is None else connection_info(sock)


def _index_peer(sock: socket.socket, addr: Address) -> None:
    if isinstance(addr, tuple) and len(addr) >= 2:
        with _info_lock:
            _socket_by_peer[(str(addr[0]), int(addr[1]))] = sock


def _client_address(info: ConnectionInfo) -> Address:
    """The real client a PROXY header named, or None. Metadata a matcher certified is left
    unparsed unless a header was consumed (only a header-reading filter consumes)."""
    if not info.parsed and not info.consumed:
        return None
    return info.info.get("client_address")


def _closed_error() -> OSError:
    return OSError(errno.EBADF, os.strerror(errno.EBADF))


class _Hub:
    """One listen socket, its I/O core, engine, driver and per-route queues."""

    def __init__(
        self,
        sock: socket.socket,
        routes: tuple[Route, ...],
        policy: Policy,
        *,
        default_route: str | None,
        core: CoreName | str,
        driver: DriverName | str,
        defer_accept: int | None,
    ) -> None:
        if sock.type != socket.SOCK_STREAM:
            raise ValueError(f"acceptfilter wraps stream sockets, not {sock.type!r}")
        try:
            accepting = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
        except OSError as exc:
            raise ValueError(f"cannot wrap this socket: {exc}") from None
        if not accepting:
            raise ValueError("the socket is not listening: call bind() and listen() (or socket.create_server) first")
        if driver not in ("thread", "asyncio", "none"):
            raise ValueError(f"driver must be 'thread', 'asyncio' or 'none', not {driver!r}")
        self.sock = sock
        self.timeout = sock.gettimeout()
        self.queues: dict[str, ReadyQueue] = {r.name: make_queue(core) for r in routes}
        self.max_held = policy.max_held or default_max_held()
        self.deadline = policy.deadline(routes)
        io_core: IOCore = make_core(
            core,
            sock,
            max_bytes=max(1, max(r.max_bytes for r in routes)),
            timeout=self.deadline,
            max_held=self.max_held,
        )
        try:
            self.engine = Engine(io_core, routes, policy, self._sink, default_route=default_route)
        except Exception:
            io_core.free()
            raise
        self._lock = threading.Lock()
        self._open = set(self.queues)
        self.closed = False
        #: Remember surfaced sockets by TCP peer (see connection_info_by_peer).
        self.index_peers = False
        self.driver: Driver | None = None
        #: Set when accept() may step the engine in the calling thread: a thread
        #: driver and one route (with several, one route's acceptor must not sit
        #: in a wait while another route's connection is queued).
        self.inline: ThreadDriver | None = None
        #: A compiled readiness matcher runs in the core: a thread blocked in accept() takes
        #: connections it certifies at accept straight from the core (ThreadDriver.accept_inline).
        try:
            self.fast = self.engine.use_matcher()
            if self.fast:
                # What the matcher certifies goes straight into the route's queue, by the core.
                self.engine.use_ready_queue(self.queues[routes[0].name])
        except Exception:
            self.engine.free()
            raise
        #: The inline driver when accept() may take certified connections straight from the core.
        self.fast_inline: ThreadDriver | None = None
        tcp = sock.family in (socket.AF_INET, socket.AF_INET6)
        self.defer_accept = int(defer_accept or 0)
        if self.defer_accept:
            try:
                if not tcp:
                    raise OSError(errno.EOPNOTSUPP, "TCP_DEFER_ACCEPT is for TCP listeners")
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, self.defer_accept)
            except OSError as exc:
                self.engine.free()
                raise ValueError(f"cannot set defer_accept={self.defer_accept}: {exc.strerror or exc}") from None
        if driver == "thread":
            thread_driver = ThreadDriver(self.engine)
            thread_driver.start()
            self.driver = thread_driver
            if len(self.queues) == 1:
                self.inline = thread_driver
                if self.fast:
                    self.fast_inline = thread_driver
        elif driver == "asyncio":
            from .drivers.asyncio import AsyncioDriver

            try:
                self.driver = AsyncioDriver(self.engine)  # needs a running loop
            except Exception:
                self.engine.free()
                raise
        from .publish import publish

        #: This engine's live counters for `acceptfilter stats PORT`, top and the metrics exporter.
        loop = getattr(self.driver, "loop", None)  # an asyncio driver's loop refreshes it: no thread
        self.publication = publish(sock, self.published_stats, loop)

    def published_stats(self) -> dict[str, Any]:
        """What the stats file carries: the engine's counters and the hub's gauges."""
        out = self.engine.stats()
        out["queued"] = sum(len(q) for q in self.queues.values())
        out["max_held"] = self.max_held
        out["deadline"] = self.deadline
        out["engines"] = 1
        out["defer_accept"] = self.defer_accept
        return out

    def attach_driver(self, driver: Driver) -> None:
        """Adopt a driver started elsewhere, so :meth:`close` stops it first.

        A thread driver of this engine gets what one built here gets: accept() steps
        inline, and takes what the matcher certifies at accept (the fast path), so a
        listener built with ``driver="none"`` to adopt connections first (a reload)
        loses nothing once it has its thread.
        """
        with self._lock:
            if self.closed or self.driver is not None:
                raise ValueError("this listener is closed or already has a driver")
            self.driver = driver
            loop = getattr(driver, "loop", None)
            if loop is not None and self.publication is not None:
                self.publication.move_to(loop)  # no thread for an engine its loop drives
            if isinstance(driver, ThreadDriver) and driver.engine is self.engine and len(self.queues) == 1:
                self.inline = driver
                if self.fast:
                    self.fast_inline = driver

    def _sink(self, route: str, items: list[Surfaced]) -> None:
        lost = self.queues[route].put_many(items)
        if lost:
            self.engine.note_unclaimed(lost)

    def close_route(self, name: str) -> None:
        with self._lock:
            self._open.discard(name)
            last = not self._open
        if last:
            self.close()
        else:
            # The engine may be queueing into it right now: the queue's lock
            # orders the two, and its eventfd stays open until close().
            self.engine.note_unclaimed(self.queues[name].close())

    def release_held(self, action: Action) -> None:
        """Stop accepting and resolve every held connection with ``action`` now."""
        with self._lock:
            if self.closed:
                return
            driver, self.driver = self.driver, None
        if driver is not None:
            driver.stop()
        self.engine.shutdown(action)

    def detach_held(self) -> list[int]:
        with self._lock:
            if self.closed:
                return []
            driver, self.driver = self.driver, None
        if driver is not None:
            driver.stop()
        return self.engine.detach_all()

    def adopt(self, fd: int) -> None:
        with self._lock:
            if self.closed:
                raise _closed_error()
            if isinstance(self.driver, ThreadDriver):
                raise ValueError("adopt() needs the thread that runs the engine: use driver='none' or 'asyncio'")
            self.engine.adopt(fd)
        self.engine.wake()

    def close(self) -> None:
        with self._lock:
            if self.closed:
                return
            self.closed = True
        if self.publication is not None:
            self.publication.close()
        if self.driver is not None:
            self.driver.stop()
        try:
            self.engine.shutdown(Action("close"))
        finally:
            for queue in self.queues.values():
                self.engine.note_unclaimed(queue.close())
            self.engine.free()  # before the queues: the core may put into one until then
            for queue in self.queues.values():
                queue.free()
            self.sock.close()


class FilteredListener:
    """A listening-socket look-alike that only ever yields connections worth serving."""

    def __init__(self, hub: _Hub, route: str) -> None:
        self._hub = hub
        self._route = route
        self._queue = hub.queues[route]
        self._timeout: float | None = hub.timeout
        self._closed = False
        self.family = hub.sock.family
        self.type = hub.sock.type
        self.proto = hub.sock.proto

    # -- accepting -------------------------------------------------------
    def _take(self) -> Surfaced:
        if self._closed:
            raise _closed_error()
        timeout = self._timeout
        queue = self._queue
        if timeout == 0:
            return queue.get_nowait()
        deadline = None if timeout is None else time.monotonic() + timeout
        fast = self._hub.fast_inline
        if fast is not None and not queue:
            got = fast.try_accept(timeout)  # the fast path: one C call, no filter, nothing queued
            if got is not None:
                return got
        while True:
            if queue:
                try:
                    return queue.get_nowait()
                except BlockingIOError:  # the entry is there, its token about to be
                    pass
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise TimeoutError("timed out")
            inline = self._hub.inline
            if inline is not None:
                if self._hub.fast:
                    took = inline.accept_inline(remaining, self._queue.__len__)
                    if took is not True and took is not False:
                        return took  # certified at accept: no filter ran, nothing was queued
                    if took:
                        continue
                elif inline.step_inline(remaining, self._queue.__len__):
                    continue  # the step may have surfaced a connection (or timed out)
            self._queue.wait(remaining)

    def accept_fd(self) -> tuple[int, Address, ConnectionInfo]:
        """Like :meth:`accept_with_info` but a bare descriptor (yours to close), for handing it on.

        Saves building a socket object for a process that only passes the
        connection along (the gunicorn filter process does, per connection).
        """
        fd, addr, info = self._take()
        proxied = _client_address(info)
        return fd, (addr if proxied is None else proxied), info

    def accept_with_info(self) -> tuple[socket.socket, Address, ConnectionInfo]:
        """Like :meth:`accept`, plus what the filters learnt (route, info, reason)."""
        fd, addr, info = self._take()
        try:
            sock = socket.socket(self.family, self.type, self.proto, fileno=fd)
        except OSError:
            os.close(fd)
            raise
        # socket.accept() calls setblocking(True) here when the listener has a timeout; these
        # descriptors are blocking already (accepted without SOCK_NONBLOCK, adopted ones made
        # blocking again by the core), so the socket object, built with the default timeout
        # None, is right without that system call.
        _remember(sock, info)
        if self._hub.index_peers:
            _index_peer(sock, addr)
        # A PROXY protocol header names the real client: it wins over the
        # balancer's address, which stays in ``info.peer``.
        proxied = _client_address(info)
        if proxied is not None:
            addr = proxied
        return sock, addr, info

    def accept(self) -> tuple[socket.socket, Address]:
        """Wait for (or, non-blocking, take) the next ready connection."""
        sock, addr, _ = self.accept_with_info()
        return sock, addr

    # -- socket look-alike -----------------------------------------------
    def fileno(self) -> int:
        """Readable while a connection is queued (an eventfd, one token per connection)."""
        return -1 if self._closed else self._queue.fileno()

    def setblocking(self, flag: bool) -> None:
        self._timeout = None if flag else 0.0

    def getblocking(self) -> bool:
        return self._timeout != 0.0

    def settimeout(self, value: float | None) -> None:
        if value is not None and value < 0:
            raise ValueError("Timeout value out of range")
        self._timeout = value

    def gettimeout(self) -> float | None:
        return self._timeout

    def getsockname(self) -> Any:
        if self._closed:
            raise _closed_error()
        return self._hub.sock.getsockname()

    def getpeername(self) -> Any:
        raise OSError(errno.ENOTCONN, os.strerror(errno.ENOTCONN))

    def getsockopt(self, *args: Any) -> Any:
        return self._hub.sock.getsockopt(*args)

    def setsockopt(self, *args: Any) -> None:
        self._hub.sock.setsockopt(*args)

    def listen(self, backlog: int | None = None) -> None:
        """A no-op: the wrapped socket is already listening."""

    def close(self) -> None:
        """Stop accepting and close queued connections; the last route closes everything. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._hub.close_route(self._route)

    def __enter__(self) -> FilteredListener:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    # -- acceptfilter's own ---------------------------------------------
    def adopt(self, fd: int) -> None:
        """Hold a connection accepted elsewhere (say, handed over by another process).

        The engine owns ``fd`` from then on and filters it like one it
        accepted itself; its deadline starts now. Call it from the thread
        that runs the engine (``driver="none"`` or ``"asyncio"``). Raises
        OSError, leaving ``fd`` yours, if it is not a connected socket.
        """
        self._hub.adopt(fd)

    def release_held(self, held: str = "surface") -> None:
        """Stop filtering: take no new connections and resolve every held one now.

        ``held="surface"`` queues them for :meth:`accept` (``reason`` is
        ``"shutdown"``), as a hand-over before a restart does; ``"close"`` and
        ``"reset"`` end them. Already-queued connections stay queued;
        :meth:`close` afterwards closes whatever nobody accepted.
        """
        self._hub.release_held(parse_action(held, "held"))

    def detach_held(self) -> list[int]:
        """Stop filtering and give up every held connection undecided: their fds, yours.

        For a hand-over to another holder (:meth:`adopt` there) that filters
        them afresh: nothing was consumed. Counted as ``detached``.
        """
        return self._hub.detach_held()

    @property
    def route(self) -> str:
        return self._route

    @property
    def engine(self) -> Engine:
        """The engine (for drivers that run it themselves, and for tests)."""
        return self._hub.engine

    def attach_driver(self, driver: Driver) -> None:
        """For ``driver="none"`` listeners: who runs the engine; ``close()`` stops it."""
        self._hub.attach_driver(driver)

    @property
    def deadline(self) -> float:
        """Seconds a partial connection may be held, from its first byte, before ``on_timeout`` applies."""
        return self._hub.deadline

    @property
    def idle_timeout(self) -> float | None:
        """Seconds a connection that has sent nothing may be held (None: no limit)."""
        return self._hub.engine.idle_timeout

    @property
    def max_held(self) -> int:
        return self._hub.max_held

    @property
    def queued(self) -> int:
        """Connections ready and waiting for ``accept()``."""
        return len(self._queue)

    @property
    def closed(self) -> bool:
        return self._closed

    def stats(self) -> dict[str, Any]:
        """Counters and gauges: see the README, "Counters"."""
        out = self._hub.engine.stats()
        out["queued"] = len(self._queue)
        return out

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"fd={self.fileno()}"
        try:
            where = self._hub.sock.getsockname()
        except OSError:
            where = "?"
        return f"<FilteredListener route={self._route!r} {state} laddr={where!r}>"


class Router(Mapping[str, FilteredListener]):
    """Several routes on one port: ``router["http"].accept()``; first match wins."""

    def __init__(self, hub: _Hub) -> None:
        self._hub = hub
        self._listeners = {name: FilteredListener(hub, name) for name in hub.queues}

    def __getitem__(self, name: str) -> FilteredListener:
        try:
            return self._listeners[name]
        except KeyError:
            raise KeyError(f"no route named {name!r}; routes: {', '.join(self._listeners)}") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._listeners)

    def __len__(self) -> int:
        return len(self._listeners)

    def stats(self) -> dict[str, Any]:
        return self._hub.engine.stats()

    def close(self) -> None:
        for listener in self._listeners.values():
            listener.close()

    def __enter__(self) -> Router:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


def wrap(
    sock: socket.socket,
    filter: FilterSpecs = "httpready",
    *,
    timeout: float | None = None,
    on_timeout: str | Action = DEFAULT_ON_TIMEOUT,
    max_held: int | None = None,
    on_reject: str | Action = "close",
    on_error: str | Action | None = None,
    core: CoreName | str = "c",
    driver: DriverName | str = "thread",
    defer_accept: int | None = None,
    idle_timeout: float | None = None,
) -> FilteredListener:
    """Put a filter (or a chain of filters) in front of a listening socket.

    The returned listener owns ``sock``. ``filter`` is a spec string
    (``"httpready"``, ``"dataready:min_bytes=4"``), a :class:`Filter`, or a
    list of them forming a chain. See :class:`Policy` for the keyword
    arguments; ``core`` picks the I/O core (``"c"`` or ``"python"``);
    ``driver="thread"`` runs the engine in a background thread, ``"asyncio"``
    on the running event loop with no thread (call ``wrap`` inside the loop),
    ``"none"``: you call ``listener.engine.step()`` yourself;
    ``defer_accept`` sets ``TCP_DEFER_ACCEPT`` seconds as a kernel first stage: the
    kernel queues a connection only once it has sent data, so what ``accept()`` finds is
    usually complete and taken by the fast path (an idle client waits in the kernel for
    about that long, is then surfaced with no data, never dropped, and the deadline
    starts; ``stats()`` does not see it meanwhile: ``diag`` shows it as ``syn_recv``);
    ``idle_timeout`` the seconds a connection that has sent nothing is held (None: the
    default, 620; 0: no limit), while ``timeout`` is the deadline of one that has begun.
    """
    policy = Policy.build(timeout=timeout, on_timeout=on_timeout, max_held=max_held, on_reject=on_reject,
                          on_error=on_error, idle_timeout=idle_timeout)
    chain = load_chain(filter)
    hub = _Hub(sock, (Route("default", chain),), policy, default_route=None, core=core, driver=driver, defer_accept=defer_accept)
    return FilteredListener(hub, "default")


def route(
    sock: socket.socket,
    routes: Mapping[str, FilterSpecs],
    *,
    default: str | None = None,
    timeout: float | None = None,
    on_timeout: str | Action | None = None,
    max_held: int | None = None,
    on_reject: str | Action = "close",
    on_error: str | Action | None = None,
    core: CoreName | str = "c",
    driver: DriverName | str = "thread",
    defer_accept: int | None = None,
    idle_timeout: float | None = None,
) -> Router:
    """Several routes on one listening socket, each surfacing into its own listener.

    ``routes`` maps a name to a filter chain, in priority order (first match
    wins). ``default`` names the route that gets connections every route
    rejected and, unless ``on_timeout`` says otherwise, those whose deadline
    passed (silent, server-first clients such as SSH or SMTP); it may be a
    name not in ``routes`` (a route with no filters).
    """
    if not routes:
        raise FilterSpecError("route() needs at least one route")
    built = [Route(name, load_chain(specs)) for name, specs in routes.items()]
    if default is not None and default not in routes:
        built.append(Route(default, ()))
    if on_timeout is None:
        on_timeout = Action("surface", default) if default else Action(DEFAULT_ON_TIMEOUT)
    policy = Policy.build(timeout=timeout, on_timeout=on_timeout, max_held=max_held, on_reject=on_reject,
                          on_error=on_error, idle_timeout=idle_timeout)
    hub = _Hub(sock, tuple(built), policy, default_route=default, core=core, driver=driver, defer_accept=defer_accept)
    return Router(hub)
