"""One listening port as an operator sees it: the kernel's queues merged with every engine on it.

``acceptfilter stats``, ``top`` and the metrics exporter all read ports through
:func:`port_views`: the kernel's side from :mod:`.diag` (accept queue, backlog,
SYN_RECV, drops, the somaxconn truncation) and the engines' side from their
stats files (:mod:`.statsfile`): held, surfaced, rejected ... per process and
summed.

About ``drops``: the listener's ``sk_drops`` counts every handshake the kernel
dropped on the way to the accept queue. Under ``TCP_DEFER_ACCEPT`` the kernel
drops the bare ACK of each deferred handshake and counts it there too (and in
the namespace's ``TCPDeferAcceptDrop``), so a normal request behind gunicorn's
default adds one. Real accept-queue overflows are ``ListenOverflows``. Each view
says which it is: :attr:`PortView.drops_note`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from . import diag
from .statsfile import EngineFile, merge, read_port

__all__ = ["PortView", "held_split", "port_views"]


def held_split(stats: dict[str, Any]) -> tuple[int | None, int | None]:
    """(idle, partial) held connections, where the engine counts them apart (None: it does not).

    Partial connections a compiled matcher is still reading stay in the core, so
    the engine's ``waiting_with_data`` alone would call them idle: no guess is shown.
    """
    if "held_idle" not in stats and "held_partial" not in stats:
        return None, None
    held = int(stats.get("held", 0))
    partial = int(stats.get("held_partial", held - int(stats.get("held_idle", 0))))
    idle = int(stats.get("held_idle", held - partial))
    return max(0, idle), max(0, partial)


@dataclass
class PortView:
    """A port: its kernel listeners, the engines publishing on it, and their sum."""

    port: int
    listeners: list[diag.ListenerView] = field(default_factory=list)
    engines: list[EngineFile] = field(default_factory=list)

    @property
    def total(self) -> dict[str, Any]:
        """Every engine's counters summed (ages: the oldest)."""
        return merge([e.stats for e in self.engines])

    @property
    def accept_queue(self) -> int:
        return sum(v.accept_queue for v in self.listeners)

    @property
    def backlog(self) -> int:
        return max((v.backlog for v in self.listeners), default=0)

    @property
    def drops(self) -> int | None:
        known = [v.drops for v in self.listeners if v.drops is not None]
        return sum(known) if known else None

    @property
    def defer_accept(self) -> bool:
        return any(e.stats.get("defer_accept") for e in self.engines)

    @property
    def drops_note(self) -> str:
        if self.defer_accept:
            return ("TCP_DEFER_ACCEPT is on: the kernel counts each deferred handshake as a drop; "
                    "real accept-queue overflows are ListenOverflows")
        return "handshakes the kernel dropped before the accept queue (overflows, or deferred under TCP_DEFER_ACCEPT)"

    def to_dict(self) -> dict[str, Any]:
        return {
            "port": self.port,
            "kernel": {
                "listeners": [v.to_dict() for v in self.listeners],
                "accept_queue": self.accept_queue,
                "backlog": self.backlog,
                "drops": self.drops,
                "drops_note": self.drops_note,
            },
            "engines": [e.to_dict() for e in self.engines],
            "total": self.total,
        }


def port_views(port: int | None = None, host: str | None = None, *,
               requested_backlog: int | None = None) -> list[PortView]:
    """The port (or every listening port, and every port an engine publishes on), sorted by port."""
    views: dict[int, PortView] = {}
    for listener in diag.listeners(port, host, requested_backlog=requested_backlog):
        views.setdefault(listener.port, PortView(listener.port)).listeners.append(listener)
    for engine in read_port(port):
        if host is not None and engine.port not in views:
            continue  # --host: only ports with a listener at that address
        views.setdefault(engine.port, PortView(engine.port)).engines.append(engine)
    return [views[p] for p in sorted(views)]
