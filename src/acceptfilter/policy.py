"""Policies: what happens to a connection the filters did not (or could not) decide.

Every one is explicit and counted, and nothing is dropped silently (the
Apache-behind-a-load-balancer failure: pre-opened idle connections vanished and
users got blank pages). Idle and partial are different: an idle connection
(nothing sent) is held until it sends, leaves or reaches the long idle limit;
a partial one (a request begun) has the header deadline, then a 408 on HTTP
routes and a FIN. See docs/explanation/policies.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .errors import FilterSpecError
from .filter import Filter

__all__ = ["DEFAULT_IDLE_TIMEOUT", "DEFAULT_ON_TIMEOUT", "DEFAULT_TIMEOUT", "MAX_TIMEOUT", "WORKER_ON_TIMEOUT", "Action", "Policy", "Route",
           "default_max_held", "parse_action"]

#: Seconds a connection that has begun its request (a partial one) may be held
#: before the timeout policy applies, counted from its first byte: the header deadline.
DEFAULT_TIMEOUT = 5.0
#: Seconds a connection that has sent nothing (an idle one) may be held. Longer
#: than every common balancer keeps an idle back-end connection (AWS ALB 60 s by
#: default, Azure 4 min, Google a fixed 600 s, whose guide asks back-ends to keep
#: theirs longer): a pre-opened pool connection must never meet a closed socket.
#: An idle connection costs a held slot (~140 bytes) and no worker.
DEFAULT_IDLE_TIMEOUT = 620.0
#: What ``max_held`` leaves to the application by default: a quarter of the fd
#: limit, at least this many descriptors (files it opens, connections it serves).
MIN_FD_HEADROOM = 64
#: The bound when the fd limit is unlimited.
MAX_HELD_CAP = 1_000_000
#: The longest deadline a core keeps (about 35 years, the C core's AF_MAX_TIMEOUT_MS):
#: longer ones are clamped, so deadline arithmetic can never overflow.
MAX_TIMEOUT = float(1 << 40) / 1000

#: The ``on_timeout`` default everywhere (``wrap()``, every integration, ``serve``, ``run``):
#: at its deadline a *partial* request is answered ``408 Request Timeout`` on an HTTP
#: route and closed (FIN), as nginx, Apache and HAProxy do; other routes get the FIN
#: alone. Surfacing it instead hands the application exactly what the filter exists
#: to keep away: with 4 gunicorn sync workers and 1,000 idle clients surfaced at the
#: deadline, 303 of 3,500 legit requests were served. An *idle* connection (nothing
#: sent: a balancer's pre-opened one) is not timed out at that deadline at all: it is
#: held up to :data:`DEFAULT_IDLE_TIMEOUT` and served when it sends. ``surface`` stays
#: available (the application then applies its own timeouts).
DEFAULT_ON_TIMEOUT = "close"
#: The former name, from when only worker-per-connection servers closed at the deadline.
WORKER_ON_TIMEOUT = DEFAULT_ON_TIMEOUT

_ACTIONS = ("surface", "close", "reset")


def default_max_held(soft_limit: int | None = None) -> int:
    """The default bound on held connections: what the process can afford.

    The fd soft limit (``RLIMIT_NOFILE``) less headroom for the application (a
    quarter of it, at least :data:`MIN_FD_HEADROOM`): held connections can then
    never take the descriptors the application needs to serve the ones it has
    (at ``ulimit -n 1024`` a bound taken from the listen backlog let held
    connections take every fd, and the file server answered 404 for a file
    that exists). Several listeners in one process each get this bound.
    """
    if soft_limit is None:
        import resource

        soft_limit, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft_limit == -1 or soft_limit >= MAX_HELD_CAP * 4 // 3:  # RLIM_INFINITY is -1
        return MAX_HELD_CAP
    return max(1, soft_limit - max(MIN_FD_HEADROOM, soft_limit // 4))


@dataclass(frozen=True, slots=True)
class Action:
    """``surface`` (optionally into a named route), ``close`` or ``reset`` (close with RST)."""

    kind: str
    route: str | None = None

    def __str__(self) -> str:
        return f"route:{self.route}" if self.route else self.kind


def parse_action(text: str | Action, what: str) -> Action:
    """Parse ``surface``, ``close``, ``reset`` or ``route:NAME``."""
    if isinstance(text, Action):
        return text
    value = str(text).strip()
    if value in _ACTIONS:
        return Action(value)
    if value.startswith("route:") and value[6:].strip():
        return Action("surface", value[6:].strip())
    raise FilterSpecError(f"{what} must be one of surface, close, reset or route:NAME, not {text!r}")


@dataclass(frozen=True)
class Policy:
    """The listener-wide rules; see the README, "Policies".

    * ``timeout``: seconds a *partial* connection (one that has sent a first
      byte) may be held, from that byte: the header deadline (None: the filters'
      ``timeout`` if any asks for one, else :data:`DEFAULT_TIMEOUT`). Never infinite.
    * ``idle_timeout``: seconds an *idle* connection (nothing sent) may be held
      (default :data:`DEFAULT_IDLE_TIMEOUT`, 0: no limit). On a listener where a
      silent client is served (server-first: a ``default`` route, ``on_timeout``
      naming a route, or a filter such as ``silent`` that accepts silence) it is
      the deadline instead: those clients wait for the server to speak.
    * ``on_timeout``: what a connection gets when its deadline passes and the
      filters' final check does not accept it: ``close`` answers a partial
      request on an HTTP route (a route whose filter has a ``timeout_reply``)
      with ``408 Request Timeout`` first. Also applies to evicted partial
      connections; an evicted idle one is closed (FIN).
    * ``max_held``: bound on held connections (None: :func:`default_max_held`,
      the fd limit less headroom). When full, the oldest idle connection of the
      source address holding the most idle ones is evicted; only when none is
      idle, the oldest partial one.
    * ``on_reject``: ``close`` (FIN) or ``reset`` (RST) for rejected connections.
    * ``on_error``: what a connection gets when a filter raises (None: ``on_timeout``).
    """

    timeout: float | None = None
    on_timeout: Action = field(default_factory=lambda: Action(DEFAULT_ON_TIMEOUT))
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT
    max_held: int | None = None
    on_reject: Action = field(default_factory=lambda: Action("close"))
    on_error: Action | None = None

    def __post_init__(self) -> None:
        if self.timeout is not None and not (self.timeout > 0 and math.isfinite(self.timeout)):
            raise FilterSpecError(f"timeout must be a positive, finite number of seconds, not {self.timeout!r}")
        if not (self.idle_timeout >= 0 and math.isfinite(self.idle_timeout)):
            raise FilterSpecError(f"idle_timeout must be 0 (no limit) or a positive, finite number of seconds, "
                                  f"not {self.idle_timeout!r}")
        if self.max_held is not None and self.max_held < 1:
            raise FilterSpecError(f"max_held must be at least 1, not {self.max_held!r}")
        if self.on_reject.kind not in ("close", "reset"):
            raise FilterSpecError(f"on_reject must be close or reset, not {self.on_reject}")

    @classmethod
    def build(
        cls,
        *,
        timeout: float | None = None,
        on_timeout: str | Action = DEFAULT_ON_TIMEOUT,
        max_held: int | None = None,
        on_reject: str | Action = "close",
        on_error: str | Action | None = None,
        idle_timeout: float | None = None,
    ) -> Policy:
        """A Policy from plain strings (the CLI's and ``wrap()``'s spelling); ``idle_timeout`` None: the default."""
        return cls(
            timeout=timeout,
            idle_timeout=DEFAULT_IDLE_TIMEOUT if idle_timeout is None else float(idle_timeout),
            on_timeout=parse_action(on_timeout, "on_timeout"),
            max_held=max_held,
            on_reject=parse_action(on_reject, "on_reject"),
            on_error=None if on_error is None else parse_action(on_error, "on_error"),
        )

    def deadline(self, routes: tuple[Route, ...]) -> float:
        """The one place deadline semantics live: seconds a connection may be held.

        The listener's ``timeout`` if set; else the longest ``timeout`` a filter
        asks for (a chain must give its slowest filter the time it needs); else
        :data:`DEFAULT_TIMEOUT`. Never infinite, clamped to :data:`MAX_TIMEOUT`.
        Deadlines are uniform per listener (so partial connections form one FIFO
        that is also the deadline order), counted from a connection's first byte.
        """
        if self.timeout is not None:
            seconds = self.timeout
        else:
            asked = [f.timeout for r in routes for f in r.chain if f.timeout is not None]
            seconds = max(asked) if asked else DEFAULT_TIMEOUT
        return min(seconds, MAX_TIMEOUT)


    def idle_deadline(self, routes: tuple[Route, ...], *, server_first: bool) -> float | None:
        """Seconds an idle connection may be held, None for no limit.

        ``server_first``: a silent client is served on this listener (it waits for
        the server to speak), so it surfaces at :meth:`deadline`, as before.
        """
        if server_first or self.on_timeout.route is not None:
            return self.deadline(routes)
        return min(self.idle_timeout, MAX_TIMEOUT) if self.idle_timeout > 0 else None


@dataclass(frozen=True)
class Route:
    """A named filter chain. Several routes on one listener: first match wins.

    A route with an empty chain matches nothing by itself: it is a target for
    the fallback (``default=``) or for ``on_timeout="route:NAME"``.
    """

    name: str
    chain: tuple[Filter, ...]

    def __post_init__(self) -> None:
        if not self.name or not self.name.replace("-", "_").replace(".", "_").isidentifier():
            raise FilterSpecError(f"route name {self.name!r} must be a simple identifier")

    @property
    def max_bytes(self) -> int:
        """Bytes the core must be able to peek: each filter sees what the previous one left."""
        return sum(f.max_bytes for f in self.chain)

    @property
    def timeout_reply(self) -> bytes | None:
        """What a partial connection of this route is answered at its deadline before the
        close (an HTTP route: ``408 Request Timeout``): the first its filters declare."""
        for flt in self.chain:
            if flt.timeout_reply is not None:
                return flt.timeout_reply
        return None
