"""The parent of ``serve --workers N``: one status line summed over the workers, and one metrics endpoint.

The parent never accepts and starts no thread (:mod:`acceptfilter.workers`): it
reads the workers' stats files (:mod:`acceptfilter.statsfile`) in the idle time
of its supervising loop, prints one status line with their sum (a line per
worker too under ``-v``), and answers Prometheus scrapes with the same sum.
The workers print no status line of their own: N unlabelled lines overwrote
each other on a terminal and interleaved without one.
"""

from __future__ import annotations

import argparse
import socket
import time

from ...diag import KernelQueue
from ...exporter import MetricsServer
from ...statsfile import merge, read_port
from .status import show_status


class WorkersParent:
    """What :func:`acceptfilter.workers.fork_workers` runs in the parent between its checks on the workers."""

    def __init__(self, args: argparse.Namespace, sock: socket.socket, metrics: MetricsServer | None) -> None:
        self.status = bool(args.status)
        self.interval = float(args.status_interval)
        self.verbose = int(getattr(args, "verbose", 0) or 0)
        self.json_logs = args.log_format == "json"
        self.port = int(sock.getsockname()[1]) if sock.family in (socket.AF_INET, socket.AF_INET6) else None
        self.queue = KernelQueue(sock)
        self.metrics = metrics
        self._next = time.monotonic() + self.interval

    def idle(self, seconds: float) -> None:
        if self.metrics is not None:
            self.metrics.serve_for(seconds)
        else:
            time.sleep(seconds)
        if self.status and self.port is not None and time.monotonic() >= self._next:
            self._next = time.monotonic() + self.interval
            self.show()

    def show(self) -> None:
        engines = read_port(self.port)
        if not engines:
            return
        kernel = self.queue.read()
        total = merge([e.stats for e in engines])
        show_status(total, kernel, json_logs=self.json_logs, prefix=f"{len(engines)} worker{'s' if len(engines) != 1 else ''}: ",
                    workers=len(engines))
        if self.verbose:
            for index, engine in enumerate(engines):
                show_status(engine.stats, None, json_logs=self.json_logs, prefix=f"  worker pid {engine.pid}: ",
                            in_place=False, worker=index, pid=engine.pid)
