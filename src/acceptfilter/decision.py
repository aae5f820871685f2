"""One connection's way through the routes and their filter chains.

This is the only code that calls filters. It is pure: bytes (and the peer
address taken at accept) in, an :class:`Outcome` out; no socket, no clock, no
counter. The engine (for held connections) and a gunicorn worker's first look
(for bytes already there at accept) both decide through it, so there is one
copy of the rules:

* Routes are tried in order; the first one whose chain accepts wins, but only
  once every earlier route has decided (rejected). A route that rejected is
  never asked again.
* In a chain every filter must accept; each sees the bytes after the earlier
  filters' ``consume``.
* Behind a router (several routes, or a default), a filter's pass of foreign
  bytes (:meth:`Decision.pass_through`) is no match.
* Every decision is validated before anything is done to the connection:
  a :class:`Decision` (or a bare :class:`Verdict`), ``info`` a mapping,
  ``consume`` an int within the bytes seen, ``route`` a known route, no WAIT
  when ``final`` or at ``max_bytes``. A filter that raises or breaks the
  contract fails the connection (:attr:`Phase.FAILED`), never the caller.

Per-connection state (:class:`Progress`) has one explicit :class:`Phase`;
:meth:`Decider.feed` is the only transition, from WAITING to one terminal
phase, asserted.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any, NamedTuple

from .events import Address
from .filter import Checker, Decision, Filter, Verdict
from .policy import Route

__all__ = ["Decider", "Outcome", "Phase", "Progress"]


class Phase(enum.Enum):
    """Where one connection stands in the decision."""

    WAITING = "waiting"
    """Some route still waits for more bytes."""
    ACCEPTED = "accepted"
    """A route matched: :attr:`Outcome.route`, ``consume``, ``info``."""
    REJECTED = "rejected"
    """Every route rejected (or could not accept with what arrived)."""
    FAILED = "failed"
    """A filter raised or broke its contract (:attr:`Outcome.filter` names it)."""


class Outcome(NamedTuple):
    """A terminal phase and what acting on it needs (a tuple: built once per connection, cheaply).

    For REJECTED and FAILED, ``consume`` and ``info`` are what the first route
    had learnt so far: a policy that surfaces the connection anyway (timeout,
    ``on_error=surface``) passes them on.
    """

    phase: Phase
    route: str | None = None
    consume: int = 0
    info: Mapping[str, Any] = MappingProxyType({})
    reason: str = ""
    filter: str = ""


#: Called once per filter failure: (filter name, what it did, the exception if it raised).
ErrorReport = Callable[[str, str, BaseException | None], None]


#: What _chain returns while its chain waits for more bytes.
_WAITING = Decision(Verdict.WAIT)


class _Chain:
    """How far one route's chain got on one connection."""

    __slots__ = ("index", "info", "label", "offset", "passed", "rejected", "sessions")

    def __init__(self, length: int) -> None:
        self.index = 0
        self.offset = 0
        self.info: dict[str, Any] = {}
        self.label: str | None = None
        self.passed = False  # some filter in the chain passed foreign bytes through
        self.rejected = False
        self.sessions: list[Checker | None] = [None] * length


class Progress:
    """One connection's decision state (created by :meth:`Decider.start`)."""

    __slots__ = ("chains", "peer", "phase")

    def __init__(self, routes: int, peer: Address) -> None:
        self.phase = Phase.WAITING
        self.peer = peer
        self.chains: list[_Chain | None] = [None] * routes


class _Broken(Exception):
    """A filter raised or broke its contract; already reported."""

    def __init__(self, name: str, what: str) -> None:
        super().__init__(what)
        self.name = name
        self.what = what


def _name(flt: Filter) -> str:
    return flt.name or type(flt).__name__


class Decider:
    """The decision rules of one listener (its routes and default); see the module docstring."""

    def __init__(
        self,
        routes: tuple[Route, ...],
        *,
        default_route: str | None = None,
        on_error: ErrorReport | None = None,
    ) -> None:
        names = [r.name for r in routes]
        if len(set(names)) != len(names):
            raise ValueError(f"route names must be unique, not {names}")
        self._names = frozenset(names)
        if default_route is not None and default_route not in self._names:
            raise ValueError(f"default route {default_route!r} is not one of the routes {sorted(self._names)}")
        self.routes = routes
        self.default_route = default_route
        self.matching = tuple(r for r in routes if r.chain)
        #: Several routes (or a default): a pass-through is then no match.
        self.routing = len(routes) > 1
        #: Some filter needs the peer address (the PROXY protocol's trusted sources).
        self.needs_peer = any(f.needs_peer for r in self.matching for f in r.chain)
        self._report = on_error or (lambda name, what, exc: None)

    def has_route(self, name: str) -> bool:
        return name in self._names

    # -- the transitions -------------------------------------------------
    def start(self, peer: Address = None) -> Progress:
        """A fresh WAITING state for one connection from ``peer`` (needed only if :attr:`needs_peer`)."""
        return Progress(len(self.matching), peer)

    def feed(self, progress: Progress, data: bytes, final: bool) -> Outcome | None:
        """Run the routes on everything the connection has sent so far.

        ``data`` is the whole peeked prefix (it only ever grows); ``final``
        says no more bytes will come. Returns None while WAITING, else the
        terminal outcome (after which ``progress`` must not be fed again).
        """
        assert progress.phase is Phase.WAITING, f"fed a connection already {progress.phase.value}"
        try:
            outcome = self._routes(progress, data, final)
        except _Broken as exc:
            first = progress.chains[0] if progress.chains else None
            outcome = Outcome(Phase.FAILED, None, first.offset if first else 0, dict(first.info) if first else {},
                              f"filter {exc.name!r} {exc.what}", exc.name)
        if outcome is not None:
            progress.phase = outcome.phase
        return outcome

    def look(self, data: bytes, peer: Address = None) -> Outcome | None:
        """Decide on bytes that were there before anyone held the connection (a first look).

        None when the filters want more bytes; no state is kept.
        """
        return self.feed(self.start(peer), data, False)

    def timeout_reply(self, progress: Progress | None) -> bytes | None:
        """What a partial connection is answered at its deadline: the reply of the first
        route (in priority order) that was still waiting on it, if that route has one."""
        for i, route in enumerate(self.matching):
            chain = None if progress is None else progress.chains[i]
            if chain is None or not chain.rejected:
                return route.timeout_reply
        return None

    def serves_silence(self) -> bool:
        """True if a client that sends nothing is served here (server-first: SMTP, an SSH
        client that waits for the banner): a default route, or a route whose first filter
        declares :attr:`~acceptfilter.Filter.accepts_silence` (``silent``)."""
        return self.default_route is not None or any(r.chain[0].accepts_silence for r in self.matching)

    # -- the rules -------------------------------------------------------
    def _routes(self, progress: Progress, data: bytes, final: bool) -> Outcome | None:
        waiting = False
        first: _Chain | None = None
        last_reason = ""
        for i, route in enumerate(self.matching):
            chain = progress.chains[i]
            if chain is None:
                chain = progress.chains[i] = _Chain(len(route.chain))
            elif chain.rejected:
                continue
            if first is None:
                first = chain
            rejected = self._chain(route, chain, progress.peer, data, final)
            if rejected is _WAITING:
                waiting = True
                continue
            if rejected is None and chain.passed and self.routing:
                # httpready/tlsready pass bytes that are not their protocol;
                # behind a router that pass must not steal another route's match.
                rejected = Decision.reject(f"{route.name}: not its protocol (passed), no match")
            if rejected is None:
                if waiting:
                    continue  # an earlier route may still match: wait for it
                return Outcome(Phase.ACCEPTED, chain.label or route.name, chain.offset, chain.info)
            chain.rejected = True
            last_reason = rejected.reason or f"{route.name}: rejected"
        if waiting:
            return None
        if not self.matching:
            return Outcome(Phase.REJECTED, reason="no route has filters")
        assert first is not None
        return Outcome(Phase.REJECTED, None, first.offset, dict(first.info), last_reason or "every route rejected")

    def _chain(self, route: Route, chain: _Chain, peer: Address, data: bytes, final: bool) -> Decision | None:
        """Advance one route's chain: :data:`_WAITING`, None when every filter accepted, or the REJECT."""
        filters = route.chain
        while chain.index < len(filters):
            flt = filters[chain.index]
            part = data[chain.offset :] if chain.offset else data
            session = chain.sessions[chain.index]
            if session is None:
                session = self._call(flt, flt.peer_session, peer) if flt.needs_peer else self._call(flt, flt.session)
                chain.sessions[chain.index] = session
            decision = self._check(flt, session, part, final)
            if decision.verdict is Verdict.WAIT:
                if final:
                    raise self._broken(flt, "returned WAIT although final=True")
                if len(part) < flt.max_bytes:
                    return _WAITING
                decision = self._check(flt, session, part, True)  # at its cap: it must decide now
                if decision.verdict is Verdict.WAIT:
                    raise self._broken(flt, f"returned WAIT with {len(part)} bytes >= max_bytes={flt.max_bytes}")
            if decision.verdict is Verdict.REJECT:
                return decision
            if decision.route is not None:
                chain.label = decision.route
            if decision.info:
                try:
                    chain.info.update(decision.info)
                except Exception as exc:  # a Mapping that fails to iterate is the filter's bug
                    raise self._broken(flt, f"returned info that cannot be read ({type(exc).__name__})") from exc
            chain.offset += decision.consume
            chain.passed = chain.passed or decision.passed
            chain.index += 1
        return None

    def _check(self, flt: Filter, session: Checker, part: bytes, final: bool) -> Decision:
        """One validated call of a filter's check: what the engine may act on, or _Broken."""
        decision = self._call(flt, session.check, part, final)
        if isinstance(decision, Verdict):
            decision = Decision(decision)
        if not isinstance(decision, Decision):
            raise self._broken(flt, f"returned {decision!r}, expected a Decision")
        if decision.verdict is not Verdict.ACCEPT:
            return decision
        if not isinstance(decision.info, Mapping):
            raise self._broken(flt, f"returned info={decision.info!r}, expected a mapping")
        consume = decision.consume
        if type(consume) is not int or not 0 <= consume <= len(part):
            raise self._broken(flt, f"asked to consume {consume!r} of {len(part)} bytes")
        if decision.route is not None and decision.route not in self._names:
            raise self._broken(flt, f"routed to unknown route {decision.route!r}")
        return decision

    def _call(self, flt: Filter, fn: Callable[..., Any], *args: Any) -> Any:
        try:
            return fn(*args)
        except Exception as exc:
            name = _name(flt)
            self._report(name, f"raised {type(exc).__name__}: {exc}", exc)
            raise _Broken(name, f"raised {type(exc).__name__}") from exc

    def _broken(self, flt: Filter, what: str) -> _Broken:
        name = _name(flt)
        self._report(name, what, None)
        return _Broken(name, what)
