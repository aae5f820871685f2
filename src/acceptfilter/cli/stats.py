"""``acceptfilter stats PORT``: the kernel's view of a port merged with every engine filtering it.

The kernel's side (accept queue, backlog, SYN_RECV, drops, the somaxconn
truncation) comes from sock_diag; the engines' side (held idle/partial,
surfaced by route and by the fast path, rejected, timed out, evicted, aborted,
oldest held age) from the stats file each engine publishes
(:mod:`acceptfilter.statsfile`), whatever runs it: ``serve``, ``run``,
gunicorn's filter process, a ``wrap()`` in any program. Per process, and summed.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from .. import diag
from ..errors import AcceptFilterError
from ..portview import PortView, held_split, port_views
from .args import port, positive_int


def register(subparsers: Any) -> None:
    p: argparse.ArgumentParser = subparsers.add_parser(
        "stats",
        help="a port's kernel queues and every engine's held and surfaced connections",
        description="One-shot view of PORT: the kernel's TCP listener(s), IPv4 and IPv6, via sock_diag, and the "
                    "live counters of every acceptfilter engine on it (held, surfaced, rejected ...), per process "
                    "and summed.",
    )
    p.add_argument("port", type=port, metavar="PORT")
    p.add_argument("--host", default=None, help="only listeners bound to this address (default: any)")
    p.add_argument("--backlog", type=positive_int, default=None, metavar="N",
                   help="the backlog the server asked for: warns when somaxconn cut it")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(func=run)


def format_view(view: diag.ListenerView) -> str:
    where = f"[{view.address}]" if view.family == "ipv6" else view.address
    drops = "?" if view.drops is None else str(view.drops)
    return (f"{where}:{view.port}  accept queue {view.accept_queue}/{view.backlog}  "
            f"syn_recv {view.syn_recv}  drops {drops}")


def format_engine(stats: dict[str, Any]) -> str:
    """The engine side in one line: held (idle/partial), then every outcome and its causes."""
    idle, partial = held_split(stats)
    routes = ", ".join(f"{name} {n}" for name, n in sorted(stats.get("surfaced_by_route", {}).items()))
    surfaced = f"surfaced {stats.get('surfaced', 0)}"
    if routes:
        surfaced += f" ({routes}; by core {stats.get('surfaced_by_core', 0)}, at accept {stats.get('surfaced_at_accept', 0)})"
    split = "" if idle is None else f"idle {idle}, partial {partial}, "
    return (f"held {stats.get('held', 0)} ({split}oldest {stats.get('oldest_held_age', 0):.1f} s)  "
            f"queued {stats.get('queued', 0)}  {surfaced}  rejected {stats.get('rejected', 0)}  "
            f"timed out {stats.get('timed_out', 0)}  evicted {stats.get('evicted', 0)}  "
            f"aborted {stats.get('aborted', 0)}  closed empty {stats.get('closed_empty', 0)}  "
            f"failed {stats.get('failed', 0)}  accepted {stats.get('accepted', 0)}")


def _text(view: PortView) -> list[str]:
    lines = []
    for listener in view.listeners:
        lines.append(format_view(listener))
        lines += [f"  warning: {warning}" for warning in listener.warnings]
    if view.listeners and view.drops:
        lines.append(f"  drops: {view.drops_note}")
    if not view.engines:
        lines.append("  no acceptfilter engine publishes on this port (held connections, if any, are not shown)")
        return lines
    pids = ", ".join(str(e.pid) for e in view.engines)
    lines.append(f"  {len(view.engines)} engine(s) (pid {pids}): {format_engine(view.total)}")
    if len(view.engines) > 1:
        for engine in view.engines:
            lines.append(f"    pid {engine.pid} {engine.label}: {format_engine(engine.stats)}")
    return lines


def run(args: argparse.Namespace) -> int:
    if not 0 < args.port <= 65535:
        raise AcceptFilterError(f"PORT must be between 1 and 65535, not {args.port}")
    views = port_views(args.port, args.host, requested_backlog=args.backlog)
    counters = diag.listen_counters()
    if args.json:
        view = views[0] if views else PortView(args.port)
        print(json.dumps({
            "port": args.port,
            "listeners": [v.to_dict() for v in view.listeners],
            "somaxconn": diag.somaxconn(),
            "namespace": counters,
            "drops_note": view.drops_note,
            "engines": [e.to_dict() for e in view.engines],
            "total": view.total,
        }, indent=2))
        return 0 if views else 1
    if not views:
        # One line on stderr, like every other "there is nothing to show" of the command.
        print(f"acceptfilter: nothing is listening on port {args.port}" + (f" at {args.host}" if args.host else ""),
              file=sys.stderr)
        return 1
    for view in views:
        print("\n".join(_text(view)))
    print(f"namespace-wide: ListenOverflows {counters['listen_overflows']}  ListenDrops {counters['listen_drops']}  "
          f"TCPDeferAcceptDrop {counters['defer_accept_drops']}  (net.core.somaxconn {diag.somaxconn()})")
    return 0
