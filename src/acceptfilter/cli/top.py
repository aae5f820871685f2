"""``acceptfilter top``: a live view of every local listener's kernel queues."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from .. import diag
from ..errors import AcceptFilterError
from .args import positive_float, positive_int


def register(subparsers: Any) -> None:
    p: argparse.ArgumentParser = subparsers.add_parser(
        "top",
        help="live view of local listeners' kernel accept queues",
        description="Every local TCP listener (IPv4 and IPv6): accept queue, backlog, SYN_RECV, drops; "
                    "refreshed in place on a terminal, one block per interval otherwise.",
    )
    p.add_argument("--interval", "-i", type=positive_float, default=1.0, metavar="S", help="seconds between refreshes (default: 1)")
    p.add_argument("--count", "-n", type=positive_int, default=None, metavar="N", help="stop after N refreshes (default: never)")
    p.set_defaults(func=run)


def render(views: list[diag.ListenerView], counters: dict[str, int]) -> list[str]:
    lines = [f"{'LISTENER':<40} {'QUEUE':>7} {'BACKLOG':>8} {'SYN_RECV':>8} {'DROPS':>8}"]
    for v in sorted(views, key=lambda v: (-v.accept_queue, v.port)):
        where = f"[{v.address}]:{v.port}" if v.family == "ipv6" else f"{v.address}:{v.port}"
        drops = "?" if v.drops is None else str(v.drops)
        lines.append(f"{where:<40} {v.accept_queue:>7} {v.backlog:>8} {v.syn_recv:>8} {drops:>8}")
    lines.append(f"namespace: ListenOverflows {counters['listen_overflows']}  ListenDrops {counters['listen_drops']}")
    return lines


def run(args: argparse.Namespace) -> int:
    if args.interval <= 0:
        raise AcceptFilterError(f"--interval must be positive, not {args.interval}")
    if args.count is not None and args.count < 1:
        raise AcceptFilterError(f"--count must be at least 1, not {args.count}")
    tty = sys.stdout.isatty()
    shown = 0
    while True:
        lines = render(diag.listeners(), diag.listen_counters())
        if tty:
            sys.stdout.write("\x1b[H\x1b[2J" + "\n".join(lines) + "\n")  # home + clear: redraw in place
        else:
            sys.stdout.write(time.strftime("%H:%M:%S ") + "\n".join(lines) + "\n\n")
        sys.stdout.flush()
        shown += 1
        if args.count is not None and shown >= args.count:
            return 0
        time.sleep(args.interval)
