"""``acceptfilter metrics PORT``: the Prometheus text of every engine on a port, printed once or served.

For a program that wraps its own listener (``wrap()`` in any script) and has no
``--metrics-port``: its engine publishes a stats file (:mod:`acceptfilter.statsfile`),
and this reads it, like ``stats`` and ``top`` do. ``--serve [HOST:]PORT`` is a
small exporter (what ``serve``/``run --metrics-port`` run inside); without it the
text goes to stdout once (a node_exporter textfile, a quick look).
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from typing import Any

from .args import port


def register(subparsers: Any) -> None:
    p: argparse.ArgumentParser = subparsers.add_parser(
        "metrics",
        help="Prometheus metrics of every engine on a port (printed, or served with --serve)",
        description="The Prometheus text format for every acceptfilter engine on PORT (summed) and the kernel's "
                    "view of it: printed once, or served at http://HOST:PORT/metrics with --serve.",
    )
    p.add_argument("port", type=port, metavar="PORT", nargs="+")
    p.add_argument("--serve", default=None, metavar="[HOST:]PORT",
                   help="serve the metrics there until SIGINT/SIGTERM (host default: 127.0.0.1)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..errors import AcceptFilterError
    from ..exporter import metrics_server, parse_address
    from ..metrics import exposition

    ports = [int(p) for p in args.port]
    if any(not 0 < p <= 65535 for p in ports):
        raise AcceptFilterError("PORT must be between 1 and 65535")
    if args.serve is None:
        sys.stdout.write(exposition(ports).decode())
        return 0
    host, mport = parse_address(args.serve, "--serve")
    server = metrics_server(host, mport, ports, option="--serve")
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: stop.set())
    print(f"Metrics of port {', '.join(map(str, ports))} on {server.url}", flush=True)
    while not stop.is_set():
        server.serve_for(0.2)
    server.server_close()
    return 0
