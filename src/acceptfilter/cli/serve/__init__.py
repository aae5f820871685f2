"""``acceptfilter serve``: a static file server (like ``python -m http.server``) behind a filter.

The serving loop runs in a thread; the main thread waits for signals, so SIGINT
(Ctrl-C) and SIGTERM stop it the same way (a word on stderr, held connections
closed, exit status 0), and SIGHUP reloads: installed filters are discovered
again (an upgraded plugin takes effect), every chain and route is rebuilt from
the same specs, and the connections held at that moment move to the new filters
undecided (:meth:`FilteredListener.detach_held` / :meth:`~FilteredListener.adopt`):
none is dropped. A reload that fails (a plugin that no longer imports) keeps the
old filters and says why.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from ...diag import KernelQueue
from ..args import (
    IDLE_TIMEOUT_HELP,
    MAX_HELD_HELP,
    ON_TIMEOUT_HELP,
    TIMEOUT_HELP,
    non_negative_float,
    non_negative_int,
    on_timeout,
    port,
    positive_float,
    positive_int,
)
from .main import run
from .status import status_line

__all__ = ["KernelQueue", "register", "run", "status_line"]


def register(subparsers: Any) -> None:
    p: argparse.ArgumentParser = subparsers.add_parser(
        "serve",
        help="serve files over HTTP through an accept filter",
        description="A static HTTP file server (like python -m http.server) whose workers only see ready connections. "
                    "SIGINT/SIGTERM stop it; SIGHUP reloads the filters and routes, keeping held connections.",
    )
    p.add_argument("--filter", "-f", action="append", metavar="SPEC",
                   help="filter spec; repeat for a chain (default: httpready)")
    p.add_argument("--bind", "-b", default="127.0.0.1", metavar="ADDR",
                   help="address to listen on (default: 127.0.0.1; '::' is IPv6 and IPv4; unix:PATH a UNIX socket)")
    p.add_argument("--port", "-p", type=port, default=8000, help="port (default: 8000; 0 picks a free one)")
    p.add_argument("--directory", "-d", default=os.getcwd(), help="directory to serve (default: the current one)")
    p.add_argument("--timeout", type=positive_float, default=None, help=TIMEOUT_HELP)
    p.add_argument("--idle-timeout", type=non_negative_float, default=None, metavar="S", help=IDLE_TIMEOUT_HELP)
    p.add_argument("--on-timeout", type=on_timeout, default=None, metavar="ACTION",
                   help=ON_TIMEOUT_HELP + "; with --route, by default what timed out half-sent gets --on-reject")
    p.add_argument("--max-held", type=positive_int, default=None, help=MAX_HELD_HELP)
    p.add_argument("--core", choices=("c", "python"), default="c", help="I/O core (default: c)")
    p.add_argument("--backlog", type=positive_int, default=1024, help="listen backlog (default: 1024)")
    p.add_argument("--defer-accept", type=non_negative_int, default=0, metavar="S",
                   help="TCP_DEFER_ACCEPT seconds as a kernel first stage (default: 0, off: the file server's "
                        "thread per connection gains nothing from it, idle clients would be invisible to the "
                        "status line and max held meanwhile, and server-first clients of a --default route "
                        "would wait that long first; see README)")
    p.add_argument("--route", action="append", metavar="NAME=SPEC[+SPEC...]", default=[],
                   help="route on this port (repeat; first match wins; '+' chains filters); "
                        "the file server serves --serve-route, the others need --forward")
    p.add_argument("--default", metavar="NAME", default=None,
                   help="route for silent (server-first: SMTP, MySQL, an SSH client that waits) clients that sent "
                        "nothing by the deadline")
    p.add_argument("--on-reject", metavar="ACTION", default="close",
                   help="with --route: what a connection every route rejected, or that timed out half-sent, gets: "
                        "close (default), reset or route:NAME")
    p.add_argument("--forward", action="append", metavar="NAME=HOST:PORT[,proxy=v1|v2]", default=[],
                   help="relay a route's connections to a TCP backend (sslh-style; HOST is resolved once, at start), "
                        "optionally after a PROXY protocol header; when every route is forwarded there is no file server")
    p.add_argument("--serve-route", metavar="NAME", default=None,
                   help="with --route: the route the file server answers (default: 'http' if there is one, else the "
                        "first route that is not forwarded)")
    p.add_argument("--status-interval", type=positive_float, default=2.0, metavar="S",
                   help="seconds between status lines (accepted = held + every outcome, timed out, evicted, "
                        "kernel queue; default: 2)")
    p.add_argument("--no-status", dest="status", action="store_false", help="no status line")
    p.add_argument("--metrics-port", type=port, default=None, metavar="N",
                   help="serve the Prometheus text format at http://BIND:N/metrics (needs prometheus_client)")
    p.add_argument("--log-format", choices=("text", "json"), default="text",
                   help="access, event and status lines as text (default) or one JSON object per line")
    p.add_argument("--workers", "-w", default="1", metavar="N",
                   help="worker processes on the one socket, each with its own filter (default: 1)")
    p.set_defaults(func=run)
