"""``acceptfilter serve``'s run: check, bind, fork workers, serve until a signal stops it (SIGHUP reloads)."""

from __future__ import annotations

import argparse
import logging
import signal
import socket
import sys
import threading
from collections.abc import Callable
from typing import Any

from ...errors import AcceptFilterError
from ...exporter import MetricsServer, metrics_server
from ...exporter import start as start_metrics
from ..console import JsonFormatter, console
from .listen import display, listen
from .parent import WorkersParent
from .plan import Plan, check
from .server import Serve
from .signals import Signals
from .status import status_log, status_loop

log = logging.getLogger("acceptfilter")


def run(args: argparse.Namespace, ready: threading.Event | None = None) -> int:
    plan = check(args)
    from ...activation import inherited_listener
    from ...workers import check_workers, fork_workers, take_early_hangup

    workers = check_workers(args.workers)
    sock = inherited_listener() or listen(args.bind, args.port, args.backlog)  # systemd's socket first
    metrics: MetricsServer | None = None
    if workers > 1:
        # One endpoint for all workers, in the parent: bound before the fork, so a port in use stops us now.
        if args.metrics_port is not None:
            try:
                metrics = _metrics_server(args, sock)
            except BaseException:
                sock.close()
                raise
            _line(f"Metrics on {metrics.url} (the sum over {workers} workers)", args.log_format == "json",
                  event="metrics", address=metrics.url)
        parent = WorkersParent(args, sock, metrics)
        # Before any thread exists: each worker filters and serves the shared socket (acceptfilter.workers).
        role = fork_workers(workers, idle=parent.idle)
        if not role.is_worker:
            console.clear_status()
            sock.close()
            if metrics is not None:
                metrics.server_close()
            return role.exit_code
        if metrics is not None:
            metrics.server_close()  # the parent's
        args.metrics_port = None  # the parent answers scrapes,
        args.status = False  # and prints the summed status line (a line per worker under -v)
    with Signals() as signals:
        if take_early_hangup():  # a worker's SIGHUP that came before Signals: reload once serving
            signals.post(signal.SIGHUP)
        return _run(args, plan, sock, signals, ready)


def _metrics_server(args: argparse.Namespace, sock: socket.socket,
                    own: Callable[[], dict[str, Any]] | None = None) -> MetricsServer:
    """The scrape endpoint: every engine on the port (their stats files) and the kernel's view of it;
    ``own`` stats for a UNIX socket, which has no port to find engines by."""
    host = "127.0.0.1" if args.bind.startswith("unix:") else args.bind
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        return metrics_server(host, args.metrics_port, int(sock.getsockname()[1]))
    if own is None:
        raise AcceptFilterError("--metrics-port with --workers needs a TCP --bind (the workers publish by port)")
    return metrics_server(host, args.metrics_port, own)


def _run(args: argparse.Namespace, plan: Plan, sock: socket.socket, signals: Signals,
         ready: threading.Event | None) -> int:
    serve = Serve(args, plan, sock)
    metrics: MetricsServer | None = None
    try:
        if args.metrics_port is not None:
            metrics = _metrics_server(args, serve.sock, lambda: serve.current.stats())
            start_metrics(metrics)
        # Before the engine accepts: the kernel view imports pyroute2 and opens a netlink socket, which an
        # early flood of held connections at a low fd limit would otherwise starve (EMFILE, a traceback).
        kernel_warnings(serve.sock, args.backlog)
        serve.start()
        json_lines = args.log_format == "json"
        for name, target in plan.forwards.items():
            chain = " -> ".join(plan.routes.get(name, []) if plan.routes else []) or "(rejected connections)"
            _line(f"route {name}: {chain} forwarded to {target}", json_lines, event="route", route=name,
                  target=str(target))
        _line(serve.banner(), json_lines, event="serving", address=display(serve.sock))
        if metrics is not None:
            _line(f"Metrics on {metrics.url}", json_lines, event="metrics", address=metrics.url)
        return run_until_signal(serve, args, signals, ready)
    finally:
        if metrics is not None:
            metrics.shutdown()
            metrics.server_close()
        serve.close()


def _line(text: str, json_line: bool = False, **fields: Any) -> None:
    """One whole line on stdout in one write, flushed; under ``--log-format json`` a JSON object
    (``message`` and ``fields``, shaped like the log records on stderr), so every line parses.

    ``print`` writes the text and its newline separately when stdout is
    unbuffered (``PYTHONUNBUFFERED``, common in containers), and the workers
    of ``--workers N`` share one stdout: their banners would interleave
    ("Serving ...Serving ...\\n\\n") and a reader waiting for a line per worker
    would wait forever. One ``write`` of a short line to a pipe is atomic.
    """
    if json_line:
        record = logging.makeLogRecord({"name": "acceptfilter.serve", "levelno": logging.INFO, "levelname": "INFO",
                                        "msg": text, "fields": {"type": "event", **fields}})
        text = JsonFormatter().format(record)
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def kernel_warnings(sock: socket.socket, backlog: int) -> None:
    if sock.family == socket.AF_UNIX:
        return  # sock_diag's TCP view has nothing to say about a UNIX socket
    from ... import diag

    try:
        for warning in diag.inspect(sock, requested_backlog=backlog).warnings:
            log.warning("%s", warning)
    except diag.DiagError as exc:
        log.warning("no kernel view of the listener: %s", exc)


def _say(message: str, **fields: Any) -> None:
    """A line for the operator (stopping, reloaded): bare text, or a JSON object with ``fields``."""
    status_log.info("%s", message, extra={"fields": {"type": "event", **fields}})


def run_until_signal(serve: Serve, args: argparse.Namespace, signals: Signals, ready: threading.Event | None) -> int:
    """Serve in a thread; the main thread handles SIGINT/SIGTERM (stop) and SIGHUP (reload)."""
    wake, pending = signals.wake, signals.pending

    relay_only = serve.plan.serve_name is None  # every route forwarded: no file server to run

    def serve_loop() -> None:
        try:
            serve.server.serve_forever(poll_interval=0.2)
        except Exception:
            log.exception("the server stopped")
            signals.post(signal.SIGTERM)

    def start_serving() -> threading.Thread:
        thread = threading.Thread(target=serve_loop, name="acceptfilter-serve", daemon=True)
        if not relay_only:
            thread.start()
        if args.status:
            threading.Thread(target=status_loop, args=(serve.current, args.status_interval),
                             name="acceptfilter-status", daemon=True).start()
        return thread

    start_serving()
    if ready is not None:
        ready.set()
    while True:
        wake.wait()
        wake.clear()
        while pending:
            signum = pending.pop(0)
            if signum == signal.SIGHUP:
                try:
                    message = serve.reload()
                except AcceptFilterError as exc:
                    log.error("reload failed, keeping the filters in place: %s", exc)
                else:
                    _say(message, event="reloaded")
                    start_serving()
                continue
            serve.current.stop.set()  # no status line after the last words
            console.clear_status()
            name = signal.Signals(signum).name
            _say(f"stopping ({name})", event="stopping", signal=name)
            if not relay_only:
                serve.server.shutdown()
            return 0
