"""``acceptfilter serve``: a static file server (like ``python -m http.server``) behind a filter."""

from __future__ import annotations

import argparse
import errno
import functools
import http.server
import os
import socket
import sys
import threading
from typing import Any

from ..errors import AcceptFilterError
from ..integrations.socketserver import install
from ..listener import route
from ..policy import DEFAULT_TIMEOUT
from ..relay import forward, parse_target


def register(subparsers: Any) -> None:
    p: argparse.ArgumentParser = subparsers.add_parser(
        "serve",
        help="serve files over HTTP through an accept filter",
        description="A static HTTP file server (like python -m http.server) whose workers only see ready connections.",
    )
    p.add_argument("--filter", "-f", action="append", metavar="SPEC",
                   help="filter spec; repeat for a chain (default: httpready)")
    p.add_argument("--bind", "-b", default="127.0.0.1", metavar="ADDR", help="address to listen on (default: 127.0.0.1)")
    p.add_argument("--port", "-p", type=int, default=8000, help="port (default: 8000; 0 picks a free one)")
    p.add_argument("--directory", "-d", default=os.getcwd(), help="directory to serve (default: the current one)")
    p.add_argument("--timeout", type=float, default=None,
                   help=f"seconds a connection may be held (default: {DEFAULT_TIMEOUT:g}, or the filter's timeout=)")
    p.add_argument("--on-timeout", default="surface", metavar="ACTION", help="surface (default), close or reset")
    p.add_argument("--max-held", type=int, default=None, help="bound on held connections (default: the listen backlog)")
    p.add_argument("--core", choices=("c", "python"), default="c", help="I/O core (default: c)")
    p.add_argument("--backlog", type=int, default=1024, help="listen backlog (default: 1024)")
    p.add_argument("--route", action="append", metavar="NAME=SPEC[+SPEC...]", default=[],
                   help="route on this port (repeat; first match wins; '+' chains filters); "
                        "the file server serves --serve-route, the others need --forward")
    p.add_argument("--default", metavar="NAME", default=None,
                   help="route for connections every route rejects and for silent clients after the deadline")
    p.add_argument("--forward", action="append", metavar="NAME=HOST:PORT", default=[],
                   help="relay a route's connections to a TCP backend (sslh-style)")
    p.add_argument("--serve-route", metavar="NAME", default=None,
                   help="the route the file server answers (default: 'http' if there is one, else the first)")
    p.add_argument("--status-interval", type=float, default=2.0, metavar="S",
                   help="seconds between status lines (held / surfaced / timed out / kernel queue; default: 2)")
    p.add_argument("--no-status", dest="status", action="store_false", help="no status line")
    p.add_argument("--workers", "-w", default="1", metavar="N",
                   help="worker processes on the one socket, each with its own filter (default: 1)")
    p.set_defaults(func=run)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    """SimpleHTTPRequestHandler that also logs why the connection was surfaced."""

    def log_message(self, format: str, *args: Any) -> None:
        from ..listener import connection_info

        info = connection_info(self.request)
        why = f" [{info.reason}, held {info.held_for * 1000:.1f} ms]" if info else ""
        sys.stderr.write(f"{self.address_string()} - - [{self.log_date_time_string()}] {format % args}{why}\n")


def status_line(stats: dict[str, Any], view: Any) -> str:
    """One line an operator can read at a glance: what is held, what got through, what the kernel queues."""
    kernel = "?" if view is None else f"{view.accept_queue}/{view.backlog}"
    drops = "" if view is None or not view.drops else f"  kernel drops {view.drops}"
    return (f"held {stats['held']}  surfaced {stats['surfaced']}  timed out {stats['timed_out']}  "
            f"rejected {stats['rejected']}  kernel queue {kernel}{drops}")


def _status_loop(listener: Any, sock: socket.socket, interval: float, stop: threading.Event) -> None:
    """Refresh the status line in place on a terminal; print plain lines when stderr is a file or pipe."""
    from .. import diag

    tty = sys.stderr.isatty()
    while not stop.wait(interval):
        try:
            view: Any = diag.inspect(sock)
        except (diag.DiagError, OSError):
            view = None
        try:
            line = status_line(listener.stats(), view)
        except Exception:  # the server is shutting down under us
            return
        if tty:
            sys.stderr.write(f"\r\x1b[K{line}")
        else:
            sys.stderr.write(f"status: {line}\n")
        sys.stderr.flush()


def _listen(host: str, port: int, backlog: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family, backlog=backlog, reuse_port=False)
    except OSError as exc:
        where = f"[{host}]:{port}" if family == socket.AF_INET6 else f"{host}:{port}"
        if exc.errno == errno.EADDRINUSE:
            raise AcceptFilterError(f"cannot listen on {where}: the port is already in use; stop the other server or pick another --port") from None
        if exc.errno in (errno.EACCES, errno.EPERM):
            raise AcceptFilterError(f"cannot listen on {where}: permission denied (ports below 1024 need privileges)") from None
        raise AcceptFilterError(f"cannot listen on {where}: {exc.strerror or exc}") from None


def run(args: argparse.Namespace, ready: threading.Event | None = None) -> int:
    if not os.path.isdir(args.directory):
        raise AcceptFilterError(f"--directory {args.directory!r} is not a directory")
    if not 0 <= args.port <= 65535:
        raise AcceptFilterError(f"--port must be between 0 and 65535, not {args.port}")
    from ..workers import check_workers, fork_workers

    workers = check_workers(getattr(args, "workers", 1))
    if args.status and not args.status_interval > 0:
        raise AcceptFilterError(f"--status-interval must be positive, not {args.status_interval}")
    specs = args.filter or ["httpready"]
    from ..registry import load_chain

    plan = _route_plan(args) if args.route else None
    for chain in ([specs] if plan is None else plan[0].values()):
        load_chain(chain)  # report a bad spec before binding anything
    from ..activation import inherited_listener

    sock = inherited_listener() or _listen(args.bind, args.port, args.backlog)  # systemd's socket first
    if workers > 1:
        role = fork_workers(workers)  # each worker filters and serves the shared socket (see acceptfilter.workers)
        if not role.is_worker:
            sock.close()
            return role.exit_code
    handler = functools.partial(_QuietHandler, directory=args.directory)
    server = http.server.ThreadingHTTPServer(sock.getsockname()[:2], handler, bind_and_activate=False)
    server.socket.close()
    server.socket = sock
    server.server_name = socket.getfqdn(sock.getsockname()[0])
    server.server_port = sock.getsockname()[1]
    server.daemon_threads = True
    router = None
    if plan is None:
        listener = install(server, specs, timeout=args.timeout, on_timeout=args.on_timeout,
                           max_held=args.max_held, core=args.core)
        through = " -> ".join(specs)
    else:
        routes, forwards, serve_name = plan
        router = route(sock, routes, default=args.default, timeout=args.timeout,
                       on_timeout=None if args.on_timeout == "surface" else args.on_timeout,
                       max_held=args.max_held, core=args.core)
        listener = router[serve_name]
        server.socket = listener  # type: ignore[assignment]
        for name, target in forwards.items():
            forward(router[name], target)
            print(f"route {name}: {' -> '.join(routes.get(name, ['(default)']))} forwarded to {target[0]}:{target[1]}", flush=True)
        through = f"route {serve_name} ({' -> '.join(routes.get(serve_name, ['(default)']))})"
    host, port = sock.getsockname()[:2]
    url_host = f"[{host}]" if ":" in host else host
    print(f"Serving {args.directory} on http://{url_host}:{port}/ through {through} "
          f"(deadline {listener.deadline:g} s, on timeout: {args.on_timeout}, "
          f"max held {listener.max_held}, {args.core} core). Ctrl-C stops.", flush=True)
    from .. import diag

    try:
        for warning in diag.inspect(sock, requested_backlog=args.backlog).warnings:
            print(f"warning: {warning}", file=sys.stderr)
    except diag.DiagError as exc:
        print(f"warning: no kernel view of the listener: {exc}", file=sys.stderr)
    stop = threading.Event()
    if args.status:
        threading.Thread(target=_status_loop, args=(listener, sock, args.status_interval, stop),
                         name="acceptfilter-status", daemon=True).start()
    if ready is not None:
        ready.set()
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("\nstopping", file=sys.stderr)
    finally:
        stop.set()
        server.server_close()
        if router is not None:
            router.close()
    return 0


def _route_plan(args: argparse.Namespace) -> tuple[dict[str, list[str]], dict[str, tuple[str, int]], str]:
    """Check --route/--forward/--default/--serve-route together, before anything is bound."""
    routes: dict[str, list[str]] = {}
    for text in args.route:
        name, sep, spec = text.partition("=")
        name = name.strip()
        if not sep or not name or not spec.strip():
            raise AcceptFilterError(f"--route takes NAME=SPEC[+SPEC...], not {text!r}")
        if name in routes:
            raise AcceptFilterError(f"route {name!r} is given twice")
        routes[name] = [part.strip() for part in spec.split("+")]
    if args.filter:
        raise AcceptFilterError("use either --filter (one chain) or --route (several), not both")
    forwards: dict[str, tuple[str, int]] = {}
    for text in args.forward:
        name, sep, target = text.partition("=")
        try:
            forwards[name.strip()] = parse_target(target)
        except ValueError as exc:
            raise AcceptFilterError(f"--forward {text!r}: {exc}") from None
    names = set(routes) | ({args.default} if args.default else set())
    serve_name = args.serve_route or ("http" if "http" in routes else next(iter(routes)))
    if serve_name not in names:
        raise AcceptFilterError(f"--serve-route {serve_name!r} is not one of the routes: {', '.join(sorted(names))}")
    unknown = sorted(set(forwards) - names)
    if unknown:
        raise AcceptFilterError(f"--forward names route {unknown[0]!r}, which is not one of: {', '.join(sorted(names))}")
    stranded = sorted(names - set(forwards) - {serve_name})
    if stranded:
        raise AcceptFilterError(f"route {stranded[0]!r} has nowhere to go: add --forward {stranded[0]}=HOST:PORT")
    if serve_name in forwards:
        raise AcceptFilterError(f"route {serve_name!r} is served by the file server; it cannot also be forwarded")
    return routes, forwards, serve_name
