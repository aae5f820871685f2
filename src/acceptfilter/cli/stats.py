"""``acceptfilter stats PORT``: a one-shot kernel view of the listener(s) on a port."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from .. import diag
from ..errors import AcceptFilterError
from .args import port, positive_int


def register(subparsers: Any) -> None:
    p: argparse.ArgumentParser = subparsers.add_parser(
        "stats",
        help="kernel view of a listening port (accept queue, backlog, SYN_RECV, drops)",
        description="One-shot kernel view of the TCP listener(s) on PORT, IPv4 and IPv6, via sock_diag.",
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


def run(args: argparse.Namespace) -> int:
    if not 0 < args.port <= 65535:
        raise AcceptFilterError(f"PORT must be between 1 and 65535, not {args.port}")
    views = diag.listeners(args.port, args.host, requested_backlog=args.backlog)
    counters = diag.listen_counters()
    if args.json:
        print(json.dumps({
            "port": args.port,
            "listeners": [v.to_dict() for v in views],
            "somaxconn": diag.somaxconn(),
            "namespace": counters,
        }, indent=2))
        return 0 if views else 1
    if not views:
        # One line on stderr, like every other "there is nothing to show" of the command.
        print(f"acceptfilter: nothing is listening on port {args.port}" + (f" at {args.host}" if args.host else ""),
              file=sys.stderr)
        return 1
    for view in views:
        print(format_view(view))
        for warning in view.warnings:
            print(f"  warning: {warning}")
    print(f"namespace-wide: ListenOverflows {counters['listen_overflows']}  ListenDrops {counters['listen_drops']}  "
          f"(net.core.somaxconn {diag.somaxconn()})")
    return 0
