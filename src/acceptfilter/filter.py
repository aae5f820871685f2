"""The sans-IO filter contract: bytes in, a decision out.

A filter never touches a socket or a clock. The engine hands it the bytes a
connection has sent so far (peeked, not read) and a ``final`` flag, and the
filter answers with a :class:`Decision`. This is what makes filters trivially
testable and fuzzable (see :mod:`acceptfilter.testing`).

The contract every filter must keep:

* ``final=True`` (EOF, deadline, byte cap reached) means no more bytes will
  come: the filter must answer ACCEPT or REJECT, never WAIT.
* Deterministic and chunking-independent: the same bytes give the same
  decision however TCP split them, and once a filter has decided on a prefix
  it decides the same on every extension of that prefix.
* Total: it never raises, whatever the bytes.
* It never WAITs for more than ``max_bytes`` bytes.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

if TYPE_CHECKING:
    from .matcher import Program

__all__ = [
    "ACCEPT",
    "DEFAULT_MAX_BYTES",
    "REJECT",
    "WAIT",
    "Checker",
    "Decision",
    "Filter",
    "Verdict",
]

#: The default byte cap: what Envoy, HAProxy and nginx use for their
#: inspectors, and enough for a post-quantum TLS ClientHello.
DEFAULT_MAX_BYTES = 16384

_EMPTY_INFO: Mapping[str, Any] = MappingProxyType({})


class Verdict(enum.Enum):
    """What a filter thinks of the bytes it has seen."""

    WAIT = "wait"
    """Not enough bytes yet; ask again when more arrive."""
    ACCEPT = "accept"
    """Worth waking the application for: surface the connection."""
    REJECT = "reject"
    """Not worth serving (or, with ``final=True``: not complete enough)."""


@dataclass(frozen=True, slots=True)
class Decision:
    """A verdict plus what the engine needs to act on an ACCEPT.

    ``info`` is a small mapping the application can read (method, host, SNI,
    the real client address from a PROXY header ...). ``consume`` is how many
    leading bytes the engine strips before the application sees the stream
    (only the PROXY protocol should need it). ``route`` labels the connection
    for routing. ``reason`` says why, for logs and counters. ``passed`` marks
    a pass-through: bytes that are not the filter's protocol (see
    :meth:`pass_through`).
    """

    verdict: Verdict
    info: Mapping[str, Any] = field(default_factory=lambda: _EMPTY_INFO)
    consume: int = 0
    route: str | None = None
    reason: str = ""
    passed: bool = False

    @classmethod
    def accept(
        cls,
        info: Mapping[str, Any] | None = None,
        *,
        consume: int = 0,
        route: str | None = None,
        reason: str = "",
    ) -> Decision:
        """An ACCEPT decision carrying optional metadata."""
        return cls(
            Verdict.ACCEPT,
            MappingProxyType(dict(info)) if info else _EMPTY_INFO,
            consume,
            route,
            reason,
        )

    @classmethod
    def pass_through(cls, info: Mapping[str, Any] | None = None, *, reason: str = "") -> Decision:
        """ACCEPT bytes that are not this filter's protocol (FreeBSD's pass-through).

        Alone on a listener it surfaces the connection; behind a router it is
        *no match*, so it never steals a connection another route would match.
        """
        return cls(Verdict.ACCEPT, MappingProxyType(dict(info)) if info else _EMPTY_INFO, 0, None, reason, True)

    @classmethod
    def reject(cls, reason: str = "") -> Decision:
        """A REJECT decision; ``reason`` ends up in debug logs."""
        return cls(Verdict.REJECT, reason=reason)

    @property
    def decided(self) -> bool:
        """True for ACCEPT and REJECT."""
        return self.verdict is not Verdict.WAIT

    @property
    def accepted(self) -> bool:
        return self.verdict is Verdict.ACCEPT

    @property
    def rejected(self) -> bool:
        return self.verdict is Verdict.REJECT


WAIT = Decision(Verdict.WAIT)
"""The shared "need more bytes" decision."""
ACCEPT = Decision(Verdict.ACCEPT)
"""A plain ACCEPT with no metadata."""
REJECT = Decision(Verdict.REJECT)
"""A plain REJECT."""


class Checker(Protocol):
    """Anything with a ``check(data, final)`` method: a filter or a session."""

    def check(self, data: bytes, final: bool) -> Decision: ...


class Filter:
    """Base class of every filter.

    A filter is configuration: it is built once per listener from its spec
    (``"httpready:method_only=1"``) and is shared by all connections. Override
    :meth:`check`. A filter that parses incrementally (to avoid rescanning a
    growing prefix) overrides :meth:`session` to return a fresh per-connection
    object with its own ``check``; the engine calls ``session()`` once per
    connection, on its first bytes.

    Subclasses take their arguments as keyword-only ``__init__`` parameters
    with type annotations (``int``, ``float``, ``bool``, ``str``,
    ``tuple[str, ...]``); the registry converts spec strings to those types.
    Every filter also accepts ``max_bytes`` and ``timeout``.
    """

    #: The registered (entry-point) name. Set by the registry if left empty.
    name: ClassVar[str] = ""
    #: True for filters whose decision depends on who connected (PROXY
    #: protocol: trusted balancers). The engine then looks the peer address up
    #: (``getpeername``) and calls :meth:`peer_session` instead of :meth:`session`.
    needs_peer: ClassVar[bool] = False
    #: Example inputs of this filter's protocol (complete, partial, malformed).
    #: ``check_filter`` and ``acceptfilter fuzz`` add them, their mutations and
    #: cap-sized versions of them to the built-in inputs: the built-ins are
    #: HTTP, TLS, DNS and PROXY, so without examples a filter for another
    #: protocol (RESP, memcached ...) is only ever fed foreign bytes.
    examples: ClassVar[tuple[bytes, ...]] = ()
    #: What a connection this filter was still waiting on is answered at its deadline,
    #: before it is closed (``on_timeout="close"``), when it had begun a request: an
    #: HTTP filter declares ``408 Request Timeout`` here, as nginx, Apache and HAProxy
    #: answer a slow request head. None (the default): closed with a FIN alone. The
    #: I/O cores never look at it: the engine writes it.
    timeout_reply: ClassVar[bytes | None] = None
    #: True for a filter that accepts a client that has said nothing by the deadline (``silent``:
    #: server-first protocols). A listener with one keeps the deadline for idle connections
    #: instead of the long idle limit: those clients wait for the server to speak first.
    accepts_silence: ClassVar[bool] = False

    def __init__(self, *, max_bytes: int = DEFAULT_MAX_BYTES, timeout: float | None = None) -> None:
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be at least 1, not {max_bytes}")
        if timeout is not None and not timeout > 0:
            raise ValueError(f"timeout must be a positive number of seconds, not {timeout}")
        #: The most bytes this filter will ever WAIT for.
        self.max_bytes = max_bytes
        #: The deadline this filter asks for (seconds), or None for the listener's.
        self.timeout = timeout

    def check(self, data: bytes, final: bool) -> Decision:
        """Decide on the bytes seen so far. Must not raise; must not WAIT if final."""
        raise NotImplementedError(f"{type(self).__name__} must implement check(data, final)")

    def session(self) -> Checker:
        """A checker for one connection. Stateless filters are their own session."""
        return self

    def peer_session(self, peer: Any) -> Checker:
        """A checker for one connection from ``peer`` (socket address, or None if unknown).

        Only called when :attr:`needs_peer` is true; the peer is still data
        handed in, so the filter stays sans-IO.
        """
        return self.session()

    def matcher(self) -> Program | None:
        """The compiled readiness matcher for this filter's arguments, or None (the default).

        A matcher (:mod:`acceptfilter.matcher`) lets the core surface a connection without
        running Python, but only where it is *certain*: whenever it certifies a prefix,
        :meth:`check` on the same bytes (``final=False``) must ACCEPT with the same
        ``consume``. ``check_filter`` and ``acceptfilter fuzz`` prove that (the ``matcher``
        invariant). Return None where the arguments make a matcher unsound or pointless;
        the filter then works exactly as without one. Called once per filter, not per
        connection.
        """
        return None

    def peer_matcher(self, peer: Any) -> Program | None:
        """The matcher for connections from ``peer``, for filters that set :attr:`needs_peer`.

        Defaults to :meth:`matcher`; a filter whose verdict depends on the peer (PROXY:
        trusted balancers only) returns None for peers its check would reject.
        """
        return self.matcher()

    @classmethod
    def describe(cls) -> str:
        """One line for ``acceptfilter list``: the first line of the class docstring."""
        doc = (cls.__doc__ or "").strip()
        return doc.splitlines()[0] if doc else ""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name or '?'} max_bytes={self.max_bytes}>"
