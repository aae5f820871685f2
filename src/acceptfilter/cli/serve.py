"""``acceptfilter serve``: a static file server (like ``python -m http.server``) behind a filter."""

from __future__ import annotations

import argparse
import errno
import functools
import http.server
import logging
import os
import socket
import struct
import sys
import threading
from typing import Any

from ..errors import AcceptFilterError
from ..integrations.socketserver import install
from ..listener import route
from ..policy import DEFAULT_TIMEOUT, WORKER_ON_TIMEOUT, parse_action
from ..relay import Forward, forward, parse_forward


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
    p.add_argument("--on-timeout", default=None, metavar="ACTION",
                   help="close (default: the file server gives each connection a thread that a surfaced idle "
                        "client would pin), surface, reset or route:NAME")
    p.add_argument("--max-held", type=int, default=None, help="bound on held connections (default: the listen backlog)")
    p.add_argument("--core", choices=("c", "python"), default="c", help="I/O core (default: c)")
    p.add_argument("--backlog", type=int, default=1024, help="listen backlog (default: 1024)")
    p.add_argument("--route", action="append", metavar="NAME=SPEC[+SPEC...]", default=[],
                   help="route on this port (repeat; first match wins; '+' chains filters); "
                        "the file server serves --serve-route, the others need --forward")
    p.add_argument("--default", metavar="NAME", default=None,
                   help="route for silent (server-first: SSH, SMTP, MySQL) clients that sent nothing by the deadline")
    p.add_argument("--on-reject", metavar="ACTION", default="close",
                   help="what gets a connection every route rejected, or that sent a part of something and timed "
                        "out: close (default), reset or route:NAME")
    p.add_argument("--forward", action="append", metavar="NAME=HOST:PORT[,proxy=v1|v2]", default=[],
                   help="relay a route's connections to a TCP backend (sslh-style), optionally with a PROXY "
                        "protocol header first; when every route is forwarded there is no file server")
    p.add_argument("--serve-route", metavar="NAME", default=None,
                   help="the route the file server answers (default: 'http' if there is one, else the first "
                        "route that is not forwarded)")
    p.add_argument("--status-interval", type=float, default=2.0, metavar="S",
                   help="seconds between status lines (accepted = held + every outcome, timed out, evicted, kernel queue; default: 2)")
    p.add_argument("--no-status", dest="status", action="store_false", help="no status line")
    p.set_defaults(func=run)


class _Server(http.server.ThreadingHTTPServer):
    """ThreadingHTTPServer that reports a client gone mid-answer in one line, not a traceback.

    Under a flood, clients that reset or stop reading made the stock server
    print a BrokenPipeError/ConnectionResetError traceback per connection.
    """

    def handle_error(self, request: Any, client_address: Any) -> None:
        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, TimeoutError)):
            sys.stderr.write(f"{client_address[0] if client_address else '?'} - - client went away: "
                             f"{type(exc).__name__}\n")
            return
        super().handle_error(request, client_address)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    """SimpleHTTPRequestHandler that also logs why the connection was surfaced.

    A path with a NUL byte (``GET /\\x00/``) made the stock handler raise
    ``ValueError: embedded null byte`` from ``os.stat`` (a traceback, and no
    answer for the client); it gets a 400 here.
    """

    def send_head(self) -> Any:
        if "\x00" in self.path or "%00" in self.path.lower():
            self.send_error(400, "NUL byte in the path")
            return None
        try:
            return super().send_head()
        except ValueError:  # another path os.stat cannot take
            self.send_error(400, "bad path")
            return None

    def log_message(self, format: str, *args: Any) -> None:
        from ..listener import connection_info

        info = connection_info(self.request)
        why = f" [{info.reason}, held {info.held_for * 1000:.1f} ms]" if info else ""
        sys.stderr.write(f"{self.address_string()} - - [{self.log_date_time_string()}] {format % args}{why}\n")


class KernelQueue:
    """The listen socket's accept queue and backlog, from ``getsockopt(TCP_INFO)``.

    On a listening socket ``tcpi_unacked`` is the accept-queue length and
    ``tcpi_sacked`` the backlog. One syscall on a socket we already have: the
    status line used to build a pyroute2 netlink socket (and an asyncio loop)
    per refresh, which failed every time at EMFILE, the moment it matters.
    """

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def read(self) -> tuple[int, int] | None:
        try:
            raw = self.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
        except OSError:
            return None
        if len(raw) < 32:
            return None
        unacked, sacked = struct.unpack_from("=II", raw, 24)
        return unacked, sacked


def status_line(stats: dict[str, Any], queue: tuple[int, int] | None) -> str:
    """One line an operator can read at a glance, with every outcome of the invariant.

    ``accepted == surfaced + rejected + closed_empty + failed + dropped + held``:
    each term is on the line, so the sum can be checked by eye; then the
    causes (timed out, evicted) and the kernel's accept queue / backlog.
    """
    kernel = "?" if queue is None else f"{queue[0]}/{queue[1]}"
    return (f"accepted {stats['accepted']} = held {stats['held']} + surfaced {stats['surfaced']} "
            f"+ rejected {stats['rejected']} + closed empty {stats['closed_empty']} + failed {stats['failed']} "
            f"+ dropped {stats['dropped']}  timed out {stats['timed_out']}  evicted {stats['evicted']}  "
            f"kernel queue {kernel}")


def _status_loop(listener: Any, sock: socket.socket, interval: float, stop: threading.Event) -> None:
    """Refresh the status line in place on a terminal; print plain lines when stderr is a file or pipe."""
    tty = sys.stderr.isatty()
    queue = KernelQueue(sock)
    while not stop.wait(interval):
        try:
            line = status_line(listener.stats(), queue.read())
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
    if args.status and not args.status_interval > 0:
        raise AcceptFilterError(f"--status-interval must be positive, not {args.status_interval}")
    specs = args.filter or ["httpready"]
    from ..registry import load_chain

    plan = _route_plan(args) if (args.route or args.default or args.forward) else None
    if plan is None and args.on_reject not in ("close", "reset"):
        raise AcceptFilterError(f"--on-reject {args.on_reject!r} names a route: it needs --route (or --default)")
    for chain in ([specs] if plan is None else plan[0].values()):
        load_chain(chain)  # report a bad spec before binding anything
    sock = _listen(args.bind, args.port, args.backlog)
    handler = functools.partial(_QuietHandler, directory=args.directory)
    server = _Server(sock.getsockname()[:2], handler, bind_and_activate=False)
    server.socket.close()
    server.socket = sock
    server.server_name = socket.getfqdn(sock.getsockname()[0])
    server.server_port = sock.getsockname()[1]
    server.daemon_threads = True
    router = None
    on_timeout = args.on_timeout or WORKER_ON_TIMEOUT
    if plan is None:
        listener = install(server, specs, timeout=args.timeout, on_timeout=on_timeout,
                           max_held=args.max_held, core=args.core, on_reject=args.on_reject)
        through = " -> ".join(specs)
    else:
        routes, forwards, serve_name, policy = plan
        on_timeout = policy["on_timeout"]
        router = route(sock, routes, timeout=args.timeout, max_held=args.max_held, core=args.core, **policy)
        listener = router[serve_name or next(iter(routes))]
        if forwards:
            logging.getLogger("acceptfilter.relay").setLevel(logging.INFO)  # one line per relayed connection
        for name, fwd in forwards.items():
            forward(router[name], fwd)
            print(f"route {name}: {' -> '.join(routes.get(name, [])) or '(rejected connections)'} forwarded to {fwd}",
                  flush=True)
        if serve_name is not None:
            server.socket = router[serve_name]  # type: ignore[assignment]
            through = f"route {serve_name} ({' -> '.join(routes.get(serve_name, [])) or 'rejected connections'})"
        else:
            through = ""
    host, port = sock.getsockname()[:2]
    url_host = f"[{host}]" if ":" in host else host
    policy_text = (f"deadline {listener.deadline:g} s, on timeout: {on_timeout}, "
                   f"max held {listener.max_held}, {args.core} core")
    if plan is not None and plan[2] is None:
        print(f"Relaying on {url_host}:{port} (no file server: every route is forwarded; on reject: "
              f"{args.on_reject}; {policy_text}). Ctrl-C stops.", flush=True)
    else:
        print(f"Serving {args.directory} on http://{url_host}:{port}/ through {through} ({policy_text}). "
              "Ctrl-C stops.", flush=True)
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
        if plan is not None and plan[2] is None:
            while not stop.wait(3600):
                pass  # the relays run in their own threads; Ctrl-C ends this wait
        else:
            server.serve_forever()
    except KeyboardInterrupt:
        print("\nstopping", file=sys.stderr)
    finally:
        stop.set()
        server.server_close()
        if router is not None:
            router.close()
    return 0


def _route_plan(args: argparse.Namespace) -> tuple[dict[str, list[str]], dict[str, Forward], str | None, dict[str, Any]]:
    """Check --route/--forward/--default/--on-reject/--serve-route together, before anything is bound.

    Returns the routes (name -> filter specs, in order), the forwards, the
    route the file server answers (None: every route is forwarded, a relay
    only) and the policy keywords for :func:`acceptfilter.listener.route`.

    ``--default NAME`` gets only silent clients: unless NAME is also a
    ``--route``, it becomes the last route with the ``silent`` filter (waits
    while nothing has arrived, rejects any byte, accepts the still-silent
    connection at the deadline). Everything else that no route accepts, at
    once or at the deadline, gets ``--on-reject``: a half-sent redis command or
    TLS garbage no longer reaches the SSH backend.
    """
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
    try:
        reject = parse_action(args.on_reject, "--on-reject")
        timeout_action = parse_action(args.on_timeout, "--on-timeout") if args.on_timeout else None
    except AcceptFilterError as exc:
        raise AcceptFilterError(str(exc)) from None
    if reject.kind == "surface" and reject.route is None:
        raise AcceptFilterError("--on-reject takes close, reset or route:NAME (a route to send them to)")
    internal: set[str] = set()
    if args.default and args.default not in routes:
        routes[args.default] = ["silent"]
    elif args.default:
        # A route with filters of its own (sshready for the SSH clients that speak
        # first): silent clients are labelled for it by an extra, last route.
        internal.add(f"{args.default}.silent")
        routes[f"{args.default}.silent"] = [f"silent:to={args.default}"]
    reject_route = reject.route  # route() adds it as a target with no filters if it is not a route
    forwards: dict[str, Forward] = {}
    for text in args.forward:
        name, sep, target = text.partition("=")
        try:
            forwards[name.strip()] = parse_forward(target)
        except ValueError as exc:
            raise AcceptFilterError(f"--forward {text!r}: {exc}") from None
    names = set(routes) | ({reject_route} if reject_route else set())
    if timeout_action is not None and timeout_action.route is not None and timeout_action.route not in names:
        raise AcceptFilterError(f"--on-timeout names route {timeout_action.route!r}, which is not one of: "
                                f"{', '.join(sorted(names))}")
    unknown = sorted(set(forwards) - names)
    if unknown:
        raise AcceptFilterError(f"--forward names route {unknown[0]!r}, which is not one of: {', '.join(sorted(names))}")
    serve_name: str | None = args.serve_route
    if serve_name is None:
        unforwarded = [n for n in [*routes, *([reject_route] if reject_route else [])] if n not in forwards and n not in internal]
        serve_name = "http" if "http" in unforwarded else (unforwarded[0] if unforwarded else None)
    if serve_name is not None and serve_name not in names:
        raise AcceptFilterError(f"--serve-route {serve_name!r} is not one of the routes: {', '.join(sorted(names))}")
    stranded = sorted(names - set(forwards) - {serve_name} - internal)
    if stranded:
        raise AcceptFilterError(f"route {stranded[0]!r} has nowhere to go: add --forward {stranded[0]}=HOST:PORT")
    if serve_name is not None and serve_name in forwards:
        raise AcceptFilterError(f"route {serve_name!r} is served by the file server; it cannot also be forwarded")
    if timeout_action is None:
        # Silent clients are matched by the silent route at the deadline; what is
        # left timed out with a part of something, and gets the reject action.
        timeout_action = reject
    policy: dict[str, Any] = {
        "on_timeout": timeout_action,
        "on_reject": reject if reject.route is None else "close",
        "default": reject_route,
    }
    return routes, forwards, serve_name, policy
