"""The engine: turns an I/O core's events into verdicts, policies and counters.

It owns no socket and no thread. A driver (a thread, or an asyncio loop) calls
:meth:`Engine.step` or :meth:`Engine.handle`; the engine runs the filter chains
on the peeked bytes and tells the core to release (surface) or close each
connection. Per-connection Python state exists only while a connection that
has sent bytes is still undecided: an idle held connection costs nothing here.

Every connection the core accepted ends in exactly one outcome::

    accepted == surfaced + rejected + closed_empty + failed + dropped + held
"""

from __future__ import annotations

import bisect
import logging
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, cast

from .events import DATA, EOF, ERROR, EVICT, FULL, KIND_NAMES, SHUTDOWN, TIMEOUT, Address, Event
from .filter import Checker, Decision, Filter, Verdict
from .iocore import IOCore
from .policy import Action, Policy, Route

__all__ = ["ConnectionInfo", "Engine", "Surfaced"]

log = logging.getLogger("acceptfilter")

#: Upper bounds (seconds) of the time-to-verdict histogram buckets.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

#: Seconds between two warnings about the same recurring problem (a filter's errors, fd exhaustion).
WARN_INTERVAL = 60.0
#: Seconds between two looks at the core's fd-exhaustion counter (keeps step() cheap).
_WATCH_INTERVAL = 1.0


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


@dataclass(frozen=True, slots=True)
class ConnectionInfo:
    """What the filters learnt about a surfaced connection.

    ``reason`` is ``"ready"`` when the filter chain accepted it, otherwise the
    policy that surfaced it: ``"timeout"``, ``"evicted"``, ``"filter_error"``
    or ``"shutdown"``. ``info`` merges the chain's metadata (method, host,
    SNI ...). ``held_for`` is the seconds from accept to surfacing.
    """

    route: str
    info: Mapping[str, Any]
    reason: str
    held_for: float
    consumed: int = 0
    peer: Address = None

    def __getitem__(self, key: str) -> Any:
        return self.info[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.info.get(key, default)


#: (fd, address, info): a connection waiting in a route's queue.
Surfaced = tuple[int, Address, ConnectionInfo]


class _Progress:
    """How far one route's chain got on one connection."""

    __slots__ = ("fd", "index", "info", "label", "offset", "passed", "sessions")

    def __init__(self, length: int, fd: int) -> None:
        self.fd = fd
        self.index = 0
        self.offset = 0
        self.info: dict[str, Any] = {}
        self.label: str | None = None
        self.passed = False  # some filter in the chain passed foreign bytes through
        self.sessions: list[Checker | None] = [None] * length


def _peer_of(fd: int) -> Address:
    """The peer address of a held connection, for filters that set ``needs_peer``.

    The cores report the address only at release; a wrapper that is detached
    again never closes (or dups) the fd. None when it cannot be known.
    """
    try:
        sock = socket.socket(fileno=fd)
    except OSError:
        return None
    try:
        return sock.getpeername()
    except OSError:
        return None
    finally:
        sock.detach()


class _FilterError(Exception):
    """A filter raised or broke its contract."""


@dataclass
class _Counters:
    surfaced: int = 0
    rejected: int = 0
    closed_empty: int = 0
    failed: int = 0
    dropped: int = 0
    timed_out: int = 0
    evicted: int = 0
    shutdown: int = 0
    detached: int = 0
    filter_errors: int = 0
    unclaimed: int = 0
    by_route: Counter[str] = field(default_factory=Counter)
    by_reason: Counter[str] = field(default_factory=Counter)
    errors_by_filter: Counter[str] = field(default_factory=Counter)
    latency: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1))
    latency_sum: float = 0.0


class _NoCore:
    """The core of an engine that only decides (:meth:`Engine.first_look`)."""

    def __getattr__(self, name: str) -> Any:
        raise RuntimeError(f"this engine only decides (Engine.first_look); it has no core for {name!r}")


class Engine:
    """Decides what happens to each held connection; see the module docstring."""

    def __init__(
        self,
        core: IOCore,
        routes: tuple[Route, ...],
        policy: Policy,
        sink: Callable[[str, list[Surfaced]], None],
        *,
        default_route: str | None = None,
    ) -> None:
        self.core = core
        self.routes = routes
        self.policy = policy
        self._sink = sink
        self._names = {r.name for r in routes}
        self._matching = tuple(r for r in routes if r.chain)
        #: Several routes (or a default): a filter's pass of foreign bytes
        #: (Decision.pass_through) is then no match; see _decide.
        self._routing = len(routes) > 1
        if default_route is not None and default_route not in self._names:
            raise ValueError(f"default route {default_route!r} is not one of the routes {sorted(self._names)}")
        self.default_route = default_route
        for action in (policy.on_timeout, policy.on_error):
            if action is not None and action.route is not None and action.route not in self._names:
                raise ValueError(f"policy names route {action.route!r}, which is not one of {sorted(self._names)}")
        #: One route with one filter that needs no peer address, no default
        #: route: a connection's first DATA event takes a short path (_first_data).
        only = routes[0] if len(routes) == 1 and default_route is None else None
        self._single: tuple[str, Filter] | None = None
        if only is not None and len(only.chain) == 1 and not only.chain[0].needs_peer:
            self._single = (only.name, only.chain[0])
        self._states: dict[int, list[_Progress | None]] = {}
        self._counters = _Counters()
        self._warn = _RateLimit(WARN_INTERVAL)
        self._fd_exhaustion = 0
        self._next_watch = 0.0
        self._on_error = policy.on_error or policy.on_timeout
        self._shutdown_action = Action("close")
        self._lock = threading.Lock()

    @classmethod
    def decider(cls, routes: tuple[Route, ...], policy: Policy, *, default_route: str | None = None) -> Engine:
        """An engine with no core, for :meth:`first_look` only (a worker's fast path)."""
        return cls(cast(IOCore, _NoCore()), routes, policy, lambda route, items: None, default_route=default_route)

    def first_look(self, fd: int, data: bytes) -> tuple[Verdict, str, int, dict[str, Any]] | None:
        """Decide on the bytes a connection sent before anyone held it.

        ``fd`` is the connected socket (for filters that need the peer).
        Returns ``(ACCEPT, route, consume, info)``, ``(REJECT, "", 0, {"reason": ...})``
        or None when the filters want more bytes or one of them raised: the
        connection then goes to whoever holds connections, which decides
        with the same filters and applies the policies.
        """
        if self._single is not None and len(data) < self._single[1].max_bytes:
            name, flt = self._single  # the short path, as in _first_data
            try:
                first = self._check(flt, self._guard(flt, flt.session), data, False)
            except _FilterError:
                return None
            if first.verdict is Verdict.WAIT:
                return None
            if first.verdict is Verdict.ACCEPT and first.route is None and 0 <= first.consume <= len(data):
                return Verdict.ACCEPT, name, first.consume, dict(first.info)
        try:
            route, decision, progress = self._decide(fd, data, False)
        except _FilterError:
            return None
        finally:
            self._states.pop(fd, None)
        if decision is None:
            return None
        if decision.verdict is Verdict.ACCEPT and route is not None and progress is not None:
            return Verdict.ACCEPT, route, progress.offset, dict(progress.info)
        if self.default_route is not None:
            return Verdict.ACCEPT, self.default_route, 0, {}
        return Verdict.REJECT, "", 0, {"reason": decision.reason}

    # -- driving ---------------------------------------------------------
    def step(self, timeout: float | None) -> int:
        """One poll of the core and everything that follows; returns the event count."""
        events = self.core.poll(timeout)
        if events:
            self.handle(events)
        now = time.monotonic()
        if now >= self._next_watch:
            self._next_watch = now + _WATCH_INTERVAL
            self.watch()
        return len(events)

    def watch(self) -> None:
        """Warn (rate-limited) when the core hit EMFILE/ENFILE since the last look."""
        seen = int(self.core.stats()["fd_exhaustion"])
        if seen > self._fd_exhaustion:
            new, self._fd_exhaustion = seen - self._fd_exhaustion, seen
            held_back = self._warn.allow("fd_exhaustion")
            if held_back is not None:
                log.warning("out of file descriptors (EMFILE/ENFILE) %d time(s) since the last look (%d in all); "
                            "accepting pauses and resumes, held connections are still served. "
                            "Raise the fd limit (ulimit -n) or lower max_held.", new, seen)

    def handle(self, events: list[Event]) -> None:
        with self._lock:  # stats() from other threads sees whole batches only
            self._handle(events)

    def _handle(self, events: list[Event]) -> None:
        out: dict[str, list[Surfaced]] = {}
        for fd, kind, err, data, age in events:
            try:
                self._one(fd, kind, err, data, age, out)
            except Exception:  # an engine bug must not leak the connection or stop the loop
                log.exception("acceptfilter: internal error handling %s event on fd %d; closing it", KIND_NAMES.get(kind), fd)
                self._states.pop(fd, None)
                self._close(fd, reset=False, outcome="failed")
        for route, items in out.items():
            self._sink(route, items)

    def detach_all(self) -> list[int]:
        """Stop accepting and give up every held connection undecided, for another holder to adopt.

        Returns the descriptors (blocking again, nothing consumed: the new
        holder's filters see every byte); they are the caller's to close.
        """
        self.core.stop_accepting()
        fds: list[int] = []
        with self._lock:
            while events := self.core.drain():
                for fd, *_ in events:
                    self._states.pop(fd, None)
                    try:
                        self.core.release(fd, 0)
                    except OSError:
                        self._close(fd, reset=False, outcome="failed")
                        continue
                    self._counters.detached += 1
                    fds.append(fd)
        return fds

    def shutdown(self, action: Action) -> None:
        """Stop accepting and resolve every held connection with ``action``."""
        self.core.stop_accepting()
        self._shutdown_action = action
        while events := self.core.drain():
            self.handle(events)

    # -- one event -------------------------------------------------------
    def _one(self, fd: int, kind: int, err: int, data: bytes, age: float, out: dict[str, list[Surfaced]]) -> None:
        if kind == ERROR:
            self._states.pop(fd, None)
            log.debug("fd %d failed while held (errno %d)", fd, err)
            self._close(fd, reset=False, outcome="failed")
            return
        if kind == EOF and not data:
            self._states.pop(fd, None)
            self._close(fd, reset=False, outcome="closed_empty")
            return
        final = kind != DATA
        try:
            if not final and self._single is not None and fd not in self._states and self._first_data(fd, data, age, out):
                return
            route, decision, progress = self._decide(fd, data, final)
        except _FilterError:
            states = self._states.pop(fd, None)
            self._apply(fd, self._on_error, "filter_error", states[0] if states else None, age, out)
            return
        if decision is None:
            return  # WAIT: keep holding
        self._states.pop(fd, None)
        if kind == TIMEOUT:
            self._counters.timed_out += 1
        elif kind == EVICT:
            self._counters.evicted += 1
        elif kind == SHUTDOWN:
            self._counters.shutdown += 1
        if decision.verdict is Verdict.ACCEPT and route is not None:
            assert progress is not None
            self._surface(fd, route, progress.offset, progress.info, "ready", age, out)
            return
        # Rejected by every route (or undecided at the end).
        if kind in (DATA, EOF, FULL):
            if self.default_route is not None:
                self._surface(fd, self.default_route, 0, {}, "default", age, out)
                return
            log.debug("fd %d rejected (%s) after %.3fs", fd, decision.reason or KIND_NAMES[kind], age)
            self._close(fd, reset=self.policy.on_reject.kind == "reset", outcome="rejected")
            return
        if kind == SHUTDOWN:
            action = self._shutdown_action
            reason = "shutdown"
        else:
            action = self.policy.on_timeout
            reason = "timeout" if kind == TIMEOUT else "evicted"
            log.debug("fd %d %s after %.3fs with %d bytes: %s", fd, reason, age, len(data), action)
        self._apply(fd, action, reason, progress, age, out)

    def _apply(
        self, fd: int, action: Action, reason: str, progress: _Progress | None, age: float, out: dict[str, list[Surfaced]]
    ) -> None:
        if action.kind == "surface":
            target = action.route or self.default_route or self.routes[0].name
            offset, info = (progress.offset, progress.info) if progress is not None else (0, {})
            self._surface(fd, target, offset, info, reason, age, out)
        else:
            self._close(fd, reset=action.kind == "reset", outcome="dropped")

    # -- deciding --------------------------------------------------------
    def _first_data(self, fd: int, data: bytes, age: float, out: dict[str, list[Surfaced]]) -> bool:
        """The short path for a connection's first DATA event on a one-filter listener.

        True when handled: surfaced (an ordinary ACCEPT), or held (WAIT below the
        cap) with its session kept. Anything else goes the general way with the
        session kept, so the filter sees the same bytes again (a re-peek, which
        the filter contract allows) and decides as it would have.
        """
        assert self._single is not None
        name, flt = self._single
        session = self._guard(flt, flt.session)
        decision = self._check(flt, session, data, False)
        verdict = decision.verdict
        if verdict is Verdict.ACCEPT and decision.route is None and 0 <= decision.consume <= len(data):
            self._surface(fd, name, decision.consume, decision.info, "ready", age, out)
            return True
        progress = _Progress(1, fd)
        progress.sessions[0] = session
        self._states[fd] = [progress]
        return verdict is Verdict.WAIT and len(data) < flt.max_bytes

    def _decide(self, fd: int, data: bytes, final: bool) -> tuple[str | None, Decision | None, _Progress | None]:
        """Run the routes in order; first match wins once every earlier route has rejected.

        When routing, a pass-through ACCEPT (a filter passing bytes that are
        not its protocol, :meth:`Decision.pass_through`) counts as a reject.

        Returns (route, decision, progress): decision None means WAIT. When
        every route rejects, the decision is a REJECT and the progress is that
        of the first route (for the partial info and consume of a timeout).
        """
        states = self._states.get(fd)
        if states is None:
            states = self._states[fd] = [None] * len(self._matching)
        waiting = False
        first: _Progress | None = None
        last_reject: Decision | None = None
        for i, route in enumerate(self._matching):
            progress = states[i]
            if progress is None:
                progress = states[i] = _Progress(len(route.chain), fd)
            elif progress.index < 0:
                continue  # this route rejected earlier
            if first is None:
                first = progress
            decision = self._run_chain(route, progress, data, final)
            if decision is None:
                waiting = True
                continue
            if decision.verdict is Verdict.ACCEPT and decision.passed and self._routing:
                # httpready/tlsready pass bytes that are not their protocol;
                # behind a router that pass must not steal another route's match.
                decision = Decision.reject(f"{route.name}: not its protocol (passed), no match")
            if decision.verdict is Verdict.ACCEPT:
                if waiting:
                    continue  # an earlier route may still match: wait for it
                return progress.label or route.name, decision, progress
            progress.index = -1
            last_reject = decision
        if waiting:
            return None, None, None
        if not self._matching:
            return None, Decision.reject("no route has filters"), None
        return None, last_reject or Decision.reject("every route rejected"), first

    def _run_chain(self, route: Route, progress: _Progress, data: bytes, final: bool) -> Decision | None:
        chain = route.chain
        while progress.index < len(chain):
            flt = chain[progress.index]
            part = data[progress.offset :] if progress.offset else data
            session = progress.sessions[progress.index]
            if session is None:
                if flt.needs_peer:
                    session = self._guard(flt, flt.peer_session, _peer_of(progress.fd))
                else:
                    session = self._guard(flt, flt.session)
                progress.sessions[progress.index] = session
            decision = self._check(flt, session, part, final)
            if decision.verdict is Verdict.WAIT:
                if final:
                    raise self._broken(flt, "returned WAIT although final=True")
                if len(part) >= flt.max_bytes:
                    decision = self._check(flt, session, part, True)
                    if decision.verdict is Verdict.WAIT:
                        raise self._broken(flt, f"returned WAIT with {len(part)} bytes >= max_bytes={flt.max_bytes}")
                else:
                    return None
            if decision.verdict is Verdict.REJECT:
                return decision
            if not 0 <= decision.consume <= len(part):
                raise self._broken(flt, f"asked to consume {decision.consume} of {len(part)} bytes")
            if decision.info:
                progress.info.update(decision.info)
            if decision.route is not None:
                if decision.route not in self._names:
                    raise self._broken(flt, f"routed to unknown route {decision.route!r}")
                progress.label = decision.route
            progress.offset += decision.consume
            progress.passed = progress.passed or decision.passed
            progress.index += 1
        if progress.passed:
            return Decision(Verdict.ACCEPT, progress.info, progress.offset, None, "passed through", True)
        return Decision.accept(progress.info, consume=progress.offset)

    def _check(self, flt: Filter, session: Checker, part: bytes, final: bool) -> Decision:
        decision = self._guard(flt, session.check, part, final)
        if isinstance(decision, Decision):
            return decision
        if isinstance(decision, Verdict):
            return Decision(decision)
        raise self._broken(flt, f"returned {decision!r}, expected a Decision")

    def _guard(self, flt: Filter, fn: Callable[..., Any], *args: Any) -> Any:
        try:
            return fn(*args)
        except Exception as exc:
            name = flt.name or type(flt).__name__
            self._count_error(name)
            held_back = self._warn.allow(name)
            if held_back is not None:
                log.warning("filter %r raised %s; the connection gets the on_error policy "
                            "(%d more errors from it since the last warning; at most one warning every %g s).",
                            name, type(exc).__name__, held_back, WARN_INTERVAL, exc_info=True)
            else:
                log.debug("filter %r raised %r", name, exc)
            raise _FilterError(name) from exc

    def _broken(self, flt: Filter, what: str) -> _FilterError:
        name = flt.name or type(flt).__name__
        self._count_error(name)
        held_back = self._warn.allow(name)
        if held_back is not None:
            log.warning("filter %r broke its contract: it %s; the connection gets the on_error policy "
                        "(%d more errors from it since the last warning)", name, what, held_back)
        else:
            log.debug("filter %r broke its contract: it %s", name, what)
        return _FilterError(name)

    def _count_error(self, name: str) -> None:
        self._counters.filter_errors += 1
        self._counters.errors_by_filter[name] += 1

    # -- acting ----------------------------------------------------------
    def _surface(
        self, fd: int, route: str, consume: int, info: Mapping[str, Any], reason: str, age: float, out: dict[str, list[Surfaced]]
    ) -> None:
        try:
            addr = self.core.release(fd, consume)
        except OSError as exc:
            log.debug("fd %d could not be surfaced (%s); closing it", fd, exc)
            self._close(fd, reset=False, outcome="failed")
            return
        c = self._counters
        c.surfaced += 1
        c.by_route[route] += 1
        c.by_reason[reason] += 1
        c.latency[bisect.bisect_left(LATENCY_BUCKETS, age)] += 1
        c.latency_sum += age
        out.setdefault(route, []).append((fd, addr, ConnectionInfo(route, dict(info), reason, age, consume, addr)))

    def _close(self, fd: int, *, reset: bool, outcome: str) -> None:
        try:
            self.core.close(fd, reset)
        except OSError as exc:
            log.debug("closing fd %d: %s", fd, exc)
        c = self._counters
        setattr(c, outcome, getattr(c, outcome) + 1)

    # -- reporting -------------------------------------------------------
    def note_unclaimed(self, count: int) -> None:
        """Surfaced connections the application never accepted (closed at shutdown)."""
        self._counters.unclaimed += count

    def stats(self) -> dict[str, Any]:
        """A snapshot of the counters (see the README, "Counters")."""
        with self._lock:
            return self._snapshot()

    def _snapshot(self) -> dict[str, Any]:
        c = self._counters
        core = self.core.stats()
        return {
            "accepted": core["accepted"],
            "held": core["held"],
            "surfaced": c.surfaced,
            "rejected": c.rejected,
            "closed_empty": c.closed_empty,
            "failed": c.failed,
            "dropped": c.dropped,
            "timed_out": c.timed_out,
            "evicted": c.evicted,
            "shutdown": c.shutdown,
            "detached": c.detached,
            "filter_errors": c.filter_errors,
            "unclaimed": c.unclaimed,
            "waiting_with_data": len(self._states),
            "surfaced_by_route": dict(c.by_route),
            "surfaced_by_reason": dict(c.by_reason),
            "filter_errors_by_filter": dict(c.errors_by_filter),
            "accept_errors": core["accept_errors"],
            "fd_exhaustion": core["fd_exhaustion"],
            "accept_paused": bool(core["paused"]),
            "peeks": core["peeks"],
            "bytes_peeked": core["bytes_peeked"],
            "buffered_bytes": core["buffered"],
            "time_to_surface": {
                "buckets": list(LATENCY_BUCKETS),
                "counts": list(c.latency),
                "sum": c.latency_sum,
                "count": sum(c.latency),
            },
        }
