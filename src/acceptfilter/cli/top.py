"""``acceptfilter top``: every listening port, its held connections and kernel queue, live.

One row per port: what the engines on it hold (idle / partial, the oldest),
what they surface, reject and time out per second, and the kernel's accept
queue and drops (:mod:`acceptfilter.portview`). On a terminal it is a curses
screen: a fixed header, as many rows as fit (80x24 and tmux included), redrawn
in place; keys sort (h held, p port, s surfaced/s, k kernel queue, d drops) and
quit (q). Not on a terminal (or with ``--count``), it prints one block per refresh.
"""

from __future__ import annotations

import argparse
import curses
import sys
import time
from dataclasses import dataclass
from typing import Any

from .. import diag
from ..errors import AcceptFilterError
from ..portview import PortView, held_split, port_views
from .args import port, positive_float, positive_int

#: key -> sort name (larger first, then ports with engines, then the port; "port": ascending).
SORTS: dict[str, str] = {"h": "held", "p": "port", "s": "surfaced/s", "k": "queue", "d": "drops"}
HELP = "q quit  sort: h held p port s surf/s k queue d drops"


def register(subparsers: Any) -> None:
    p: argparse.ArgumentParser = subparsers.add_parser(
        "top",
        help="live view of every listening port: held connections, rates, kernel queue",
        description="Every local TCP listening port (IPv4 and IPv6): the connections acceptfilter engines hold on "
                    "it (idle/partial), surfaced/rejected/timed out per second, the kernel's accept queue and "
                    "drops. A full-screen view on a terminal (q quits; h p s k d sort), one block per refresh otherwise.",
    )
    p.add_argument("--interval", "-i", type=positive_float, default=1.0, metavar="S", help="seconds between refreshes (default: 1)")
    p.add_argument("--count", "-n", type=positive_int, default=None, metavar="N",
                   help="stop after N refreshes, printing plain blocks (default: never)")
    p.add_argument("--port", "-p", type=port, action="append", default=None, metavar="PORT",
                   help="only this port (repeat for several; default: every listening port)")
    p.add_argument("--sort", choices=tuple(SORTS.values()), default="held", help="initial sort (default: held)")
    p.set_defaults(func=run)


@dataclass
class Row:
    """One port on the screen."""

    port: int
    address: str
    engines: int
    held: int
    idle: int | None  # None: the engine does not count idle and partial apart
    partial: int | None
    oldest: float
    surfaced_rate: float | None
    rejected_rate: float | None
    timed_out_rate: float | None
    queue: int
    backlog: int
    drops: int | None
    defer_accept: bool


class Sampler:
    """Reads every port and turns counters into per-second rates since the previous read."""

    def __init__(self, ports: list[int] | None = None) -> None:
        self.ports = ports
        self._last: dict[int, tuple[float, dict[str, Any]]] = {}

    def _views(self) -> list[PortView]:
        if not self.ports:
            return port_views()
        return [v for p in self.ports for v in port_views(p)]

    def sample(self) -> list[Row]:
        now = time.monotonic()
        rows = []
        for view in self._views():
            total = view.total
            idle, partial = held_split(total)
            previous = self._last.get(view.port)
            self._last[view.port] = (now, total)

            def rate(key: str, previous: tuple[float, dict[str, Any]] | None = previous,
                     total: dict[str, Any] = total, engines: int = len(view.engines)) -> float | None:
                if previous is None or not engines or now <= previous[0]:
                    return None
                return max(0.0, float(total.get(key, 0) - previous[1].get(key, 0)) / (now - previous[0]))

            address = ",".join(sorted({v.address for v in view.listeners} | {e.address for e in view.engines}))
            rows.append(Row(view.port, address, len(view.engines), int(total.get("held", 0)), idle, partial,
                            float(total.get("oldest_held_age", 0.0)), rate("surfaced"), rate("rejected"),
                            rate("timed_out"), view.accept_queue, view.backlog, view.drops, view.defer_accept))
        return rows


def _sort_key(sort: str) -> Any:
    def key(row: Row) -> tuple[Any, ...]:
        if sort == "port":
            return (row.port,)
        value: float = {"held": row.held, "surfaced/s": row.surfaced_rate or 0.0, "queue": row.queue,
                        "drops": row.drops or 0}[sort]
        return (-value, -row.engines, row.port)
    return key


def _num(value: float | None, width: int, digits: int = 0) -> str:
    if value is None:
        return f"{'-':>{width}}"
    return f"{value:>{width}.{digits}f}"


def render(rows: list[Row], counters: dict[str, int], *, sort: str = "held", width: int = 80,
           height: int | None = None, when: str | None = None) -> list[str]:
    """The screen as lines: a fixed header, then one row per port, as many as ``height`` allows."""
    wide = width >= 100
    held = sum(r.held for r in rows)
    split = [r for r in rows if r.idle is not None]
    idle, partial = sum(r.idle or 0 for r in split), sum(r.partial or 0 for r in split)
    engines = sum(r.engines for r in rows)
    header = [
        f"acceptfilter top  {when or time.strftime('%H:%M:%S')}  {len(rows)} ports, {engines} engines, "
        f"held {held}" + (f" (idle {idle}, partial {partial})" if split else ""),
        f"sort: {sort}  ListenOverflows {counters.get('listen_overflows', 0)}  "
        f"ListenDrops {counters.get('listen_drops', 0)}  TCPDeferAcceptDrop {counters.get('defer_accept_drops', 0)}",
        f"{'PORT':>6} {'ENG':>3} {'HELD':>5} {'IDLE':>5} {'PART':>5} {'OLDEST':>6} {'SURF/s':>7} {'REJ/s':>6} "
        f"{'TMO/s':>6} {'QUEUE':>5} {'BACKLOG':>7} {'DROPS':>6}" + ("  ADDRESS" if wide else ""),
    ]
    body = []
    for r in sorted(rows, key=_sort_key(sort)):
        drops = "?" if r.drops is None else f"{r.drops}{'*' if r.defer_accept else ''}"
        if r.engines:
            engine = (f"{r.held:>5} {_num(r.idle, 5)} {_num(r.partial, 5)} {_num(r.oldest, 6, 1)} {_num(r.surfaced_rate, 7, 1)} "
                      f"{_num(r.rejected_rate, 6, 1)} {_num(r.timed_out_rate, 6, 1)}")
        else:  # no acceptfilter engine on this port: nothing held that anyone can see
            engine = f"{'-':>5} {'-':>5} {'-':>5} {'-':>6} {'-':>7} {'-':>6} {'-':>6}"
        line = f"{r.port:>6} {r.engines:>3} {engine} {r.queue:>5} {r.backlog:>7} {drops:>6}"
        body.append(line + (f"  {r.address}" if wide else ""))
    footer = [HELP + ("  *: TCP_DEFER_ACCEPT drops" if any(r.defer_accept for r in rows) else "")]
    if height is not None:
        room = max(0, height - len(header) - len(footer))
        if len(body) > room:
            hidden = len(body) - room + 1
            body = [*body[:room - 1], f"  ... {hidden} more (narrow with --port)"] if room else []
    return [line[:width] for line in header + body + footer]


def _curses_loop(screen: Any, sampler: Sampler, interval: float, sort: str) -> None:
    curses.curs_set(0)
    screen.timeout(int(interval * 1000))
    rows = sampler.sample()
    while True:
        height, width = screen.getmaxyx()
        lines = render(rows, diag.listen_counters(), sort=sort, width=width - 1, height=height)
        screen.erase()
        for y, line in enumerate(lines[:height]):
            attr = curses.A_REVERSE if y == 2 else curses.A_NORMAL
            screen.addnstr(y, 0, line, width - 1, attr)
        screen.refresh()
        key = screen.getch()
        if key == -1 or key == curses.KEY_RESIZE:
            rows = sampler.sample() if key == -1 else rows
            continue
        char = chr(key) if 0 <= key < 256 else ""
        if char in ("q", "Q", "\x1b"):
            return
        if char in SORTS:
            sort = SORTS[char]


def run(args: argparse.Namespace) -> int:
    if args.interval <= 0:
        raise AcceptFilterError(f"--interval must be positive, not {args.interval}")
    if args.count is not None and args.count < 1:
        raise AcceptFilterError(f"--count must be at least 1, not {args.count}")
    sampler = Sampler(args.port)
    if args.count is None and sys.stdout.isatty() and sys.stdin.isatty():
        try:
            curses.wrapper(_curses_loop, sampler, args.interval, args.sort)
        except KeyboardInterrupt:
            pass
        except curses.error as exc:
            raise AcceptFilterError(f"cannot draw on this terminal ({exc}); try --count N for plain output") from None
        return 0
    shown = 0
    while True:
        lines = render(sampler.sample(), diag.listen_counters(), sort=args.sort, width=200)
        sys.stdout.write("\n".join(lines[:-1]) + "\n\n")
        sys.stdout.flush()
        shown += 1
        if args.count is not None and shown >= args.count:
            return 0
        time.sleep(args.interval)
