"""The engine: turns an I/O core's events into outcomes, policies and counters.

It is the only owner of its I/O core: drivers (a thread, an asyncio loop, the
gunicorn filter process) go through the engine for everything they need
(:meth:`Engine.fileno`, :meth:`Engine.next_timeout`, :meth:`Engine.wake`,
:meth:`Engine.adopt`, :meth:`Engine.stop_accepting`), and one thread at a time
steps it. Deciding is :class:`~acceptfilter.decision.Decider`'s job; the engine
acts on its outcomes.

A connection's lifecycle, with the state of each side::

    accepted ─▶ held (core: in its FIFO, waiting for bytes; engine: a Progress
                      once it has sent some and is still undecided)
             ─▶ decided (core: reported final, out of the FIFO and epoll;
                         engine: ACCEPTED / REJECTED / FAILED, or a policy)
             ─▶ released to a route's queue, or closed, or detached
             ─▶ surfaced to the application, or closed unclaimed at shutdown

Every connection the core accepted ends in exactly one terminal outcome, and
at every moment a reader can observe (:meth:`Engine.stats`)::

    accepted == surfaced + rejected + closed_empty + aborted + failed + dropped + detached + held

``aborted`` is the peer's doing: it reset the connection (HAProxy's health
checks send a PROXY header, then an RST), or closed it in the middle of a
request, before a decision. ``failed`` is a filter error or a fault on this
side (an errno not in :data:`~acceptfilter.events.PEER_ERRNOS`): what to alert on.
"""

from __future__ import annotations

import bisect
import logging
import os
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from .decision import Decider, Outcome, Phase, Progress
from .events import DATA, EOF, ERROR, EVICT, FULL, KIND_NAMES, PEER_ERRNOS, READY, SHUTDOWN, TIMEOUT, Address, Event
from .iocore import IOCore
from .policy import Action, Policy, Route

__all__ = ["OUTCOMES", "ConnectionInfo", "Engine", "Surfaced", "unaccounted"]

log = logging.getLogger("acceptfilter")


class _Peer:
    """A held connection's peer in a debug line: looked up (a system call) only if the line is logged."""

    __slots__ = ("fd",)

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __str__(self) -> str:
        try:
            sock = socket.socket(fileno=self.fd)
        except OSError as exc:
            return f"? ({exc.strerror})"
        try:
            peer = sock.getpeername()
            if isinstance(peer, tuple) and len(peer) >= 2:  # host:port, [v6]:port, as the relay's lines write it
                return f"[{peer[0]}]:{peer[1]}" if ":" in str(peer[0]) else f"{peer[0]}:{peer[1]}"
            return str(peer or "unix")
        except OSError as exc:
            return f"? ({exc.strerror})"
        finally:
            sock.detach()  # the engine's descriptor: never closed here

#: Upper bounds (seconds) of the time-to-verdict histogram buckets.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

#: Seconds between two warnings about the same recurring problem (a filter's errors, fd exhaustion).
WARN_INTERVAL = 60.0
#: Seconds between two looks at the core's fd-exhaustion counter (keeps step() cheap).
_WATCH_INTERVAL = 1.0

#: The terminal outcomes; their sum plus ``held`` is ``accepted``.
OUTCOMES = ("surfaced", "rejected", "closed_empty", "aborted", "failed", "dropped", "detached")


#: One INFO line per connection that never reached the application (rejected, timed out, evicted), beside the
#: relay's "forwarded" lines: off unless enabled (``acceptfilter serve --forward`` enables it).
outcome_log = logging.getLogger("acceptfilter.outcome")


def _tell(what: str, fd: int, reason: str, age: float, data: bytes, then: object) -> None:
    if outcome_log.isEnabledFor(logging.INFO):
        outcome_log.info("%s client=%s reason=%s bytes=%d seconds=%.3f then=%s", what, _Peer(fd), reason, len(data),
                         age, then)


def unaccounted(stats: Mapping[str, Any]) -> int:
    """``accepted`` less every terminal outcome and ``held``: 0 whenever the accounting holds."""
    return int(stats["accepted"]) - sum(int(stats[name]) for name in OUTCOMES) - int(stats["held"])


class _RateLimit:
    """Lets one warning per key through every ``interval`` seconds and counts what it held back."""

    __slots__ = ("_interval", "_last", "_suppressed")

    def __init__(self, interval: float) -> None:
        self._interval = interval
        self._last: dict[str, float] = {}
        self._suppressed: Counter[str] = Counter()

    def allow(self, key: str) -> int | None:
        """None: stay quiet; otherwise the number of occurrences held back since the last warning."""
        now = time.monotonic()
        last = self._last.get(key)
        if last is not None and now - last < self._interval:
            self._suppressed[key] += 1
            return None
        self._last[key] = now
        return self._suppressed.pop(key, 0)


class ConnectionInfo(Mapping[str, Any]):
    """What the filters learnt about a surfaced connection.

    A read-only mapping of the chain's metadata (``info["method"]``,
    ``dict(info)``, ``"sni" in info``), plus attributes: ``reason`` is
    ``"ready"`` when the filter chain accepted it, otherwise the policy that
    surfaced it (``"timeout"``, ``"evicted"``, ``"filter_error"``,
    ``"default"`` or ``"shutdown"``); ``route`` the route it surfaced into;
    ``held_for`` the seconds from accept to surfacing; ``consumed`` the bytes
    read off before the application (a PROXY header); ``peer`` the TCP peer.

    The metadata of a connection a compiled matcher certified is parsed on
    first use, from a bounded copy of the bytes it had sent when it surfaced
    (:meth:`lazy`): an application that never asks pays nothing for it.
    ``reason``, ``route``, ``held_for``, ``consumed`` and ``peer`` are always exact.
    """

    __slots__ = ("_decider", "_info", "_raw", "consumed", "held_for", "peer", "reason", "route")

    def __init__(self, route: str, info: Mapping[str, Any], reason: str, held_for: float, consumed: int = 0,
                 peer: Address = None, raw: bytes | None = None, decider: Decider | None = None) -> None:
        self.route = route
        self.reason = reason
        self.held_for = held_for
        self.consumed = consumed
        self.peer = peer
        # With raw and decider: parsed on first use (see lazy()); info is then ignored.
        self._info: Mapping[str, Any] | None = info if decider is None else None
        self._raw = b"" if raw is None else raw
        self._decider = decider

    @classmethod
    def lazy(cls, route: str, raw: bytes, decider: Decider, reason: str, held_for: float, consumed: int,
             peer: Address) -> ConnectionInfo:
        """Metadata parsed when first read: the filters run again on ``raw`` (what the matcher certified)."""
        return cls(route, _EMPTY, reason, held_for, consumed, peer, raw, decider)

    @property
    def info(self) -> Mapping[str, Any]:
        """The chain's metadata (parsed now if it was certified by a matcher)."""
        if self._info is None:
            assert self._decider is not None
            outcome = self._decider.look(self._raw, self.peer)
            # The matcher is proven against the check (the fuzz contract): it accepts.
            self._info = outcome.info if outcome is not None and outcome.phase is Phase.ACCEPTED else _EMPTY
            self._raw, self._decider = b"", None
        return self._info

    @property
    def parsed(self) -> bool:
        """False while the metadata of a matcher-certified connection has not been needed yet."""
        return self._info is not None

    def __getitem__(self, key: str) -> Any:
        return self.info[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.info)

    def __len__(self) -> int:
        return len(self.info)

    def _key(self) -> tuple[Any, ...]:
        return (self.route, dict(self.info), self.reason, self.held_for, self.consumed, self.peer)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, ConnectionInfo):
            return self._key() == other._key()
        return super().__eq__(other)

    __hash__ = None  # type: ignore[assignment]

    def __reduce__(self) -> tuple[Any, ...]:
        return (ConnectionInfo, (self.route, dict(self.info), self.reason, self.held_for, self.consumed, self.peer))

    def __repr__(self) -> str:
        info = dict(self.info) if self.parsed else "<not parsed yet>"
        return (f"ConnectionInfo(route={self.route!r}, info={info}, reason={self.reason!r}, "
                f"held_for={self.held_for!r}, consumed={self.consumed!r}, peer={self.peer!r})")


_EMPTY: Mapping[str, Any] = MappingProxyType({})


#: (fd, address, info): a connection waiting in a route's queue.
Surfaced = tuple[int, Address, ConnectionInfo]


@dataclass
class _Counters:
    surfaced: int = 0
    rejected: int = 0
    closed_empty: int = 0
    aborted: int = 0
    failed: int = 0
    dropped: int = 0
    detached: int = 0
    timed_out: int = 0
    #: Of those, idle ones (nothing sent) at the idle limit (or a server-first deadline).
    timed_out_idle: int = 0
    #: Partial connections answered with their route's timeout reply (HTTP: 408) before the close.
    timeout_replies: int = 0
    evicted: int = 0
    #: Evictions by the state of the connection that made room (idle ones go first).
    evicted_idle: int = 0
    evicted_partial: int = 0
    shutdown: int = 0
    filter_errors: int = 0
    unclaimed: int = 0
    by_route: Counter[str] = field(default_factory=Counter)
    by_reason: Counter[str] = field(default_factory=Counter)
    errors_by_filter: Counter[str] = field(default_factory=Counter)
    latency: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1))
    latency_sum: float = 0.0


_CAUSE = {TIMEOUT: "timed_out", EVICT: "evicted", SHUTDOWN: "shutdown"}


class Engine:
    """Acts on each held connection's outcome; see the module docstring."""

    def __init__(
        self,
        core: IOCore,
        routes: tuple[Route, ...],
        policy: Policy,
        sink: Callable[[str, list[Surfaced]], None],
        *,
        default_route: str | None = None,
    ) -> None:
        self.decider = Decider(routes, default_route=default_route, on_error=self._filter_failed)
        for action in (policy.on_timeout, policy.on_error):
            if action is not None and action.route is not None and not self.decider.has_route(action.route):
                raise ValueError(f"policy names route {action.route!r}, which is not one of "
                                 f"{sorted(r.name for r in routes)}")
        self._core = core
        self.routes = routes
        self.policy = policy
        self.default_route = default_route
        self._sink = sink
        self._needs_peer = self.decider.needs_peer
        #: Held connections that have sent bytes and are still undecided.
        self._waiting: dict[int, Progress] = {}
        self._counters = _Counters()
        self._warn = _RateLimit(WARN_INTERVAL)
        self._fd_exhaustion = 0
        self._next_watch = 0.0
        self._on_error = policy.on_error or policy.on_timeout
        #: A silent client is served here (server-first): idle ones surface at the deadline.
        self.server_first = self.decider.serves_silence()
        #: Seconds an idle connection may be held (None: no limit); the core keeps it.
        self.idle_timeout = policy.idle_deadline(routes, server_first=self.server_first)
        core.set_idle_timeout(self.idle_timeout)
        #: The route a compiled matcher's READY connections surface into (set_matcher).
        self._fast_route: str | None = None
        self._shutdown_action = Action("close")
        #: Held while a batch is handled and while stats() reads: readers see whole batches.
        #: Reentrant: a sink may report unclaimed connections from inside a batch.
        self._lock = threading.RLock()
        core.snapshot()
        self._freed = False

    # -- what drivers need (the engine is the core's only owner) ----------
    def fileno(self) -> int:
        """Readable when :meth:`step` has work (for event loops and selectors)."""
        return self._core.fileno()

    def next_timeout(self) -> float | None:
        """Seconds until the next deadline (0 if due), or None if there is none."""
        return self._core.next_timeout()

    def wake(self) -> None:
        """Make a concurrent (or the next) :meth:`step` return promptly. Any thread, any time:
        the core serialises wake-ups with :meth:`free`, after which a wake is a no-op."""
        self._core.wake()

    def stop_accepting(self) -> None:
        """Take no new connections from the listen socket; held ones are still served."""
        self._core.stop_accepting()

    def adopt(self, fd: int) -> None:
        """Hold a connection accepted elsewhere; from the thread that steps the engine.

        Raises OSError (``fd`` still the caller's) if it is not a connected socket.
        """
        with self._lock:
            self._core.adopt(fd)
            self._core.snapshot()

    def use_matcher(self) -> bool:
        """Give the core the listener's compiled readiness matcher, if it can have one.

        Only for one route whose chain is one filter that needs no peer and
        declares a matcher: a connection the matcher certifies is then surfaced
        without running the filter (its metadata is parsed lazily). True if set.
        """
        if len(self.routes) != 1 or self.default_route is not None or len(self.routes[0].chain) != 1:
            return False
        flt = self.routes[0].chain[0]
        if flt.needs_peer:
            return False
        try:
            program = flt.matcher()
        except Exception:  # a third-party declaration that fails: the filter still works without it
            log.warning("filter %r: could not build its matcher; running without it", flt.name, exc_info=True)
            return False
        if program is None:
            return False
        with self._lock:
            self._core.set_matcher(program)
        self._fast_route = self.routes[0].name
        return True

    def use_ready_queue(self, queue: Any) -> None:
        """After :meth:`use_matcher`: the core puts what its matcher certifies into ``queue``
        (the matcher route's ready queue) itself, with no event and no Python; the queue
        builds their (lazy) info with :meth:`ready_info` when ``accept()`` takes them."""
        assert self._fast_route is not None, "use_matcher() first"
        queue.make_info = self.ready_info
        with self._lock:
            self._core.set_ready_queue(queue, LATENCY_BUCKETS)

    def ready_info(self, raw: bytes, consume: int, held_for: float, addr: Address) -> ConnectionInfo:
        """The info of a connection the core's matcher certified: parsed from ``raw`` on first use."""
        return ConnectionInfo(self._fast_route or "", _EMPTY, "ready", held_for, consume, addr, raw, self.decider)

    def accept_ready(self, timeout: float | None) -> Surfaced | None:
        """A step for a thread blocked in ``accept()``: the first connection the core's matcher
        certifies (at accept, or while this call waits) comes back released, with no event
        and no filter run, counted by the core (None: none was, and whatever else happened
        was handled like :meth:`step`)."""
        events, ready = self._core.accept_ready(timeout)
        if events:  # without: the core published its counters as the poll ended
            self.handle(events)
        if ready is None:
            return None
        fd, addr, raw, consume, held_for = ready
        return fd, addr, self.ready_info(raw, consume, held_for, addr)

    def set_clock(self, now: float | None) -> None:
        """Tests: the core keeps deadlines on this clock (seconds); None: the real one again.

        Makes deadlines deterministic, e.g. for the differential test of the two cores.
        """
        self._core.set_clock(now)

    def free(self) -> None:
        """Close whatever the core still owns (after :meth:`shutdown`). Idempotent."""
        with self._lock:
            if not self._freed:
                self._freed = True
                self._core.snapshot()
                self._core.free()

    # -- driving ---------------------------------------------------------
    def step(self, timeout: float | None) -> int:
        """One poll of the core and everything that follows; returns the event count."""
        events = self._core.poll(timeout)
        self.handle(events)
        now = time.monotonic()
        if now >= self._next_watch:
            self._next_watch = now + _WATCH_INTERVAL
            self.watch()
        return len(events)

    def handle(self, events: list[Event]) -> None:
        """Act on a batch of events (what :meth:`step` does after polling)."""
        if not events:
            return  # the core published its counters as the poll ended: nothing changed since
        with self._lock:
            try:
                self._handle(events)
            finally:
                self._core.snapshot()

    def watch(self) -> None:
        """Warn (rate-limited) when the core hit EMFILE/ENFILE since the last look."""
        with self._lock:
            seen = int(self._core.saved_stats()["fd_exhaustion"])
        if seen > self._fd_exhaustion:
            new, self._fd_exhaustion = seen - self._fd_exhaustion, seen
            held_back = self._warn.allow("fd_exhaustion")
            if held_back is not None:
                log.warning("out of file descriptors (EMFILE/ENFILE) %d time(s) since the last look (%d in all); "
                            "accepting pauses and resumes, held connections are still served. "
                            "Raise the fd limit (ulimit -n) or lower max_held.", new, seen)

    def _handle(self, events: list[Event]) -> None:
        out: dict[str, list[Surfaced]] = {}
        try:
            for fd, kind, err, data, age in events:
                try:
                    self._one(fd, kind, err, data, age, out)
                except Exception:  # an engine bug must not leak the connection or stop the loop
                    log.exception("acceptfilter: internal error handling %s event on fd %d; closing it",
                                  KIND_NAMES.get(kind), fd)
                    self._waiting.pop(fd, None)
                    self._close(fd, reset=False, outcome="failed")
        finally:
            # Even when interrupted (KeyboardInterrupt in an inline step): whatever
            # was released reaches its queue. Final events not handled yet are
            # reported again by the core's next poll.
            self._deliver(out)

    def _deliver(self, out: dict[str, list[Surfaced]]) -> None:
        for route, items in out.items():
            try:
                self._sink(route, items)
            except Exception:
                log.exception("acceptfilter: could not queue %d connection(s) for route %r; closing them",
                              len(items), route)
                self._counters.unclaimed += _close_all(items)

    def detach_all(self) -> list[int]:
        """Stop accepting and give up every held connection undecided, for another holder to adopt.

        Returns the descriptors (blocking again, nothing consumed: the new
        holder's filters see every byte); they are the caller's to close.
        """
        self._core.stop_accepting()
        fds: list[int] = []
        with self._lock:
            try:
                while events := self._core.drain():
                    for fd, *_ in events:
                        self._waiting.pop(fd, None)
                        try:
                            self._core.release(fd, 0)
                        except OSError as exc:
                            self._close(fd, reset=False, outcome=_ended(exc.errno))
                            continue
                        self._counters.detached += 1
                        fds.append(fd)
            finally:
                self._core.snapshot()
        return fds

    def shutdown(self, action: Action) -> None:
        """Stop accepting and resolve every held connection with ``action``."""
        self._core.stop_accepting()
        self._shutdown_action = action
        while events := self._core.drain():
            self.handle(events)

    # -- one event -------------------------------------------------------
    def _one(self, fd: int, kind: int, err: int, data: bytes, age: float, out: dict[str, list[Surfaced]]) -> None:
        if kind == ERROR:
            self._waiting.pop(fd, None)
            ended = _ended(err)
            log.debug("fd %d from %s %s while held after %.3fs with %d bytes (%s)", fd, _Peer(fd), ended, age,
                      len(data), os.strerror(err))
            self._close(fd, reset=False, outcome=ended)
            return
        if kind == EOF and not data:
            self._waiting.pop(fd, None)
            self._close(fd, reset=False, outcome="closed_empty")
            return
        if kind == READY:  # certified by the compiled matcher: the filter need not run
            self._waiting.pop(fd, None)
            self._surface(fd, self._fast_route or self.routes[0].name, err, _EMPTY, "ready", age, out, raw=data)
            return
        final = kind != DATA
        progress = self._waiting.get(fd)
        # At the deadline of a partial request: the reply of the route that was waiting on it.
        reply = self.decider.timeout_reply(progress) if kind == TIMEOUT and data else None
        if progress is None:
            progress = self.decider.start(self._core.peer(fd) if self._needs_peer else None)
        if kind == EOF:
            # The peer half-closed: a client may do that right after its request, so the
            # bytes get a final check. First as they are: bytes the filters reject anyway
            # are "rejected"; a request the peer left unfinished is "aborted".
            outcome = self.decider.feed(progress, data, False)
            if outcome is None:
                outcome = self.decider.feed(progress, data, True)
                if outcome is not None and outcome.phase is Phase.REJECTED and self.default_route is None:
                    self._waiting.pop(fd, None)
                    log.debug("fd %d from %s aborted after %.3fs: closed with an unfinished request (%d bytes: %s)",
                              fd, _Peer(fd), age, len(data), outcome.reason)
                    self._close(fd, reset=False, outcome="aborted")
                    return
        else:
            outcome = self.decider.feed(progress, data, final)
        if outcome is None:
            assert not final, "the decider waited on a final event"
            self._waiting[fd] = progress
            return
        self._waiting.pop(fd, None)
        self._act(fd, kind, outcome, data, age, out, reply)

    def _act(self, fd: int, kind: int, outcome: Outcome, data: bytes, age: float, out: dict[str, list[Surfaced]],
             reply: bytes | None = None) -> None:
        if outcome.phase is Phase.FAILED:
            self._apply(fd, self._on_error, "filter_error", outcome, age, out)
            return
        cause = _CAUSE.get(kind)
        if cause is not None:
            c = self._counters
            setattr(c, cause, getattr(c, cause) + 1)
            if kind == TIMEOUT and not data:
                c.timed_out_idle += 1
            elif kind == EVICT:
                self._evicted(idle=not data)
        if outcome.phase is Phase.ACCEPTED:
            assert outcome.route is not None
            self._surface(fd, outcome.route, outcome.consume, outcome.info, "ready", age, out)
            return
        # Rejected by every route (or undecided at the end).
        if kind in (DATA, EOF, FULL):
            if self.default_route is not None:
                self._surface(fd, self.default_route, 0, {}, "default", age, out)
                return
            log.debug("fd %d from %s rejected (%s) after %.3fs", fd, _Peer(fd), outcome.reason or KIND_NAMES[kind],
                      age)
            _tell("rejected", fd, outcome.reason or KIND_NAMES[kind], age, data, self.policy.on_reject)
            self._close(fd, reset=self.policy.on_reject.kind == "reset", outcome="rejected")
            return
        if kind == SHUTDOWN:
            self._apply(fd, self._shutdown_action, "shutdown", outcome, age, out)
            return
        reason = "timeout" if kind == TIMEOUT else "evicted"
        # An evicted idle connection makes room: closed (FIN), never handed to the application.
        action = Action("close") if kind == EVICT and not data and not self.server_first else self.policy.on_timeout
        log.debug("fd %d from %s %s after %.3fs with %d bytes: %s", fd, _Peer(fd), reason, age, len(data), action)
        _tell("timed out" if kind == TIMEOUT else "evicted", fd, reason, age, data, action)
        self._apply(fd, action, reason, outcome, age, out, reply)

    def _apply(self, fd: int, action: Action, reason: str, outcome: Outcome, age: float,
               out: dict[str, list[Surfaced]], reply: bytes | None = None) -> None:
        if action.kind == "surface":
            target = action.route or self.default_route or self.routes[0].name
            self._surface(fd, target, outcome.consume, outcome.info, reason, age, out)
            return
        if reply is not None and action.kind == "close" and _send_reply(fd, reply):
            self._counters.timeout_replies += 1
        self._close(fd, reset=action.kind == "reset", outcome="dropped")

    def _evicted(self, *, idle: bool) -> None:
        """Count an eviction by the state of its connection; say so, at most once a WARN_INTERVAL."""
        c = self._counters
        if idle:
            c.evicted_idle += 1
        else:
            c.evicted_partial += 1
        if self._warn.allow("evicted") is not None:
            log.warning("held connections reached max_held: evicting to make room, idle ones first (the oldest "
                        "of the source address holding the most), then partial ones; %d idle and %d partial "
                        "evicted so far (at most one line every %g s). Raise the fd limit (ulimit -n) or max_held "
                        "if these are not an attack.", c.evicted_idle, c.evicted_partial, WARN_INTERVAL)

    # -- filter failures -------------------------------------------------
    def _filter_failed(self, name: str, what: str, exc: BaseException | None) -> None:
        c = self._counters
        c.filter_errors += 1
        c.errors_by_filter[name] += 1
        held_back = self._warn.allow(name)
        if held_back is not None:
            log.warning("filter %r %s; the connection gets the on_error policy "
                        "(%d more errors from it since the last warning; at most one warning every %g s).",
                        name, what if exc else f"broke its contract: it {what}", held_back, WARN_INTERVAL,
                        exc_info=exc)
        else:
            log.debug("filter %r %s", name, what)

    # -- acting ----------------------------------------------------------
    def _surface(self, fd: int, route: str, consume: int, info: Mapping[str, Any], reason: str, age: float,
                 out: dict[str, list[Surfaced]], raw: bytes | None = None) -> None:
        try:
            addr = self._core.release(fd, consume)
        except OSError as exc:
            log.debug("fd %d could not be surfaced (%s); closing it", fd, exc)
            self._close(fd, reset=False, outcome=_ended(exc.errno))
            return
        # Built from validated plain values (the decider copied info into a dict): cannot fail.
        if raw is None:
            conn_info = ConnectionInfo(route, info, reason, age, consume, addr)
        else:
            conn_info = ConnectionInfo.lazy(route, raw, self.decider, reason, age, consume, addr)
        entry = (fd, addr, conn_info)
        c = self._counters
        c.surfaced += 1
        c.by_route[route] += 1
        c.by_reason[reason] += 1
        c.latency[bisect.bisect_left(LATENCY_BUCKETS, age)] += 1
        c.latency_sum += age
        out.setdefault(route, []).append(entry)

    def _close(self, fd: int, *, reset: bool, outcome: str) -> None:
        try:
            self._core.close(fd, reset)
        except OSError as exc:
            log.debug("closing fd %d: %s", fd, exc)
        c = self._counters
        setattr(c, outcome, getattr(c, outcome) + 1)

    # -- reporting -------------------------------------------------------
    def note_unclaimed(self, count: int) -> None:
        """Surfaced connections the application never accepted (closed at shutdown)."""
        with self._lock:
            self._counters.unclaimed += count

    def stats(self) -> dict[str, Any]:
        """A consistent snapshot of the counters (see the README, "Counters"), from any thread."""
        with self._lock:
            return self._snapshot()

    def _snapshot(self) -> dict[str, Any]:
        c = self._counters
        core = self._core.saved_stats()
        # Counted by the core alone, surfaced as ready into the matcher's route with no Python:
        # connections handed straight to accept() (af_accept; "fast" if at accept) and those
        # it put into the ready queue itself.
        by_core = int(core.get("surfaced", 0))
        by_route, by_reason, latency = Counter(c.by_route), Counter(c.by_reason), list(c.latency)
        latency_sum = c.latency_sum
        if by_core:
            by_route[self._fast_route or self.routes[0].name] += by_core
            by_reason["ready"] += by_core
            for i, n in enumerate(core.get("surfaced_hist", ())[:len(latency)]):
                latency[i] += n
            latency_sum += float(core.get("surfaced_age", 0.0))
        held_idle = int(core.get("held_idle", 0))
        return {
            "accepted": core["accepted"],
            "held": core["held"],
            "held_idle": held_idle,
            "held_partial": int(core["held"]) - held_idle,
            **{name: getattr(c, name) for name in OUTCOMES},
            "surfaced": c.surfaced + by_core,
            "surfaced_at_accept": int(core.get("fast", 0)),
            "surfaced_by_core": by_core,
            "timed_out": c.timed_out,
            "timed_out_idle": c.timed_out_idle,
            "timeout_replies": c.timeout_replies,
            "evicted": c.evicted,
            "evicted_idle": c.evicted_idle,
            "evicted_partial": c.evicted_partial,
            "shutdown": c.shutdown,
            "filter_errors": c.filter_errors,
            "unclaimed": c.unclaimed + int(core.get("surfaced_lost", 0)),
            "waiting_with_data": len(self._waiting),
            "surfaced_by_route": dict(by_route),
            "surfaced_by_reason": dict(by_reason),
            "filter_errors_by_filter": dict(c.errors_by_filter),
            "accept_errors": core["accept_errors"],
            "fd_exhaustion": core["fd_exhaustion"],
            "accept_paused": bool(core["paused"]),
            "peeks": core["peeks"],
            "bytes_peeked": core["bytes_peeked"],
            # The core's clock is time.monotonic()'s (CLOCK_MONOTONIC); held ones are in accept order.
            "oldest_held_age": max(0.0, time.monotonic() - oldest) if (oldest := core.get("oldest_accepted")) is not None else 0.0,
            "buffered_bytes": core["buffered"],
            "time_to_surface": {
                "buckets": list(LATENCY_BUCKETS),
                "counts": latency,
                "sum": latency_sum,
                "count": sum(latency),
            },
        }


def _ended(err: int | None) -> str:
    """The outcome of a held connection that ended with ``err``: the peer's doing, or ours."""
    return "aborted" if err in PEER_ERRNOS else "failed"


def _send_reply(fd: int, reply: bytes) -> bool:
    """Write ``reply`` to a held connection without blocking, then our FIN after it (the
    core's close reads what the client sent, so the close itself adds no RST). Best effort:
    False when the client cannot take it (it left, or its window is shut)."""
    try:
        sock = socket.socket(fileno=fd)
    except OSError:
        return False
    try:
        sent = sock.send(reply, socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL)
        sock.shutdown(socket.SHUT_WR)
        return sent == len(reply)
    except OSError:
        return False
    finally:
        sock.detach()  # the core's descriptor: it closes it


def _close_all(items: list[Surfaced]) -> int:
    for fd, _, _ in items:
        try:
            os.close(fd)
        except OSError:
            pass
    return len(items)
