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
import errno
import functools
import http.server
import importlib
import logging
import os
import signal
import socket
import stat
import struct
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..errors import AcceptFilterError
from ..listener import FilteredListener, Router, route, wrap
from ..policy import WORKER_ON_TIMEOUT, Action, parse_action
from ..relay import Forward, forward, parse_forward
from .args import (
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
from .console import console

access_log = logging.getLogger("acceptfilter.access")
status_log = logging.getLogger("acceptfilter.status")
log = logging.getLogger("acceptfilter")


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


class _Server(http.server.ThreadingHTTPServer):
    """ThreadingHTTPServer that reports a client gone mid-answer in one line, not a traceback.

    Under a flood, clients that reset or stop reading made the stock server
    print a BrokenPipeError/ConnectionResetError traceback per connection.
    """

    def handle_error(self, request: Any, client_address: Any) -> None:
        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, TimeoutError)):
            client = client_address[0] if isinstance(client_address, tuple) and client_address else "unix"
            access_log.info("%s - - client went away: %s", client, type(exc).__name__,
                            extra={"fields": {"type": "access", "client": str(client), "error": type(exc).__name__}})
            return
        super().handle_error(request, client_address)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    """SimpleHTTPRequestHandler whose access lines go to the ``acceptfilter.access`` logger.

    Through logging, they share stderr with the status line without tearing it
    (see :mod:`.console`) and follow ``--log-format``. Each line also says why the
    connection was surfaced and how long it was held.

    A percent-encoded NUL in the path (``GET /%00/``) made the stock handler raise
    ``ValueError: embedded null byte`` from ``open()`` (a traceback, and no answer
    for the client); it gets a 400 here. (A raw NUL never gets past httpready.)
    """

    def send_head(self) -> Any:
        if "\x00" in self.path or "%00" in self.path.lower():
            self.send_error(400, "NUL byte in the path")
            return None
        try:
            return super().send_head()
        except ValueError:  # another path open() cannot take
            self.send_error(400, "bad path")
            return None

    def address_string(self) -> str:
        addr = self.client_address
        return str(addr[0]) if isinstance(addr, tuple) and addr else "unix"

    def log_message(self, format: str, *args: Any) -> None:
        from ..listener import connection_info

        info = connection_info(self.request)
        why = f" [{info.reason}, held {info.held_for * 1000:.1f} ms]" if info else ""
        fields: dict[str, Any] = {"client": self.address_string(), "request": getattr(self, "requestline", "")}
        if format == '"%s" %s %s' and len(args) == 3:  # log_request(): the request, its status and size
            fields["status"], fields["size"] = str(args[1]), str(args[2])
        if info:
            fields["reason"], fields["held_ms"] = info.reason, round(info.held_for * 1000, 3)
        access_log.info("%s - - [%s] %s%s", self.address_string(), self.log_date_time_string(), format % args, why,
                        extra={"fields": {"type": "access", **fields}})


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
        if self.sock.family not in (socket.AF_INET, socket.AF_INET6):
            return None
        try:
            raw = self.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
        except OSError:
            return None
        if len(raw) < 32:
            return None
        unacked, sacked = struct.unpack_from("=II", raw, 24)
        return unacked, sacked


_TERMS = ("accepted", "held", "surfaced", "rejected", "closed_empty", "failed", "dropped", "timed_out", "evicted")


def status_line(stats: dict[str, Any], queue: tuple[int, int] | None) -> str:
    """One line an operator can read at a glance, with every outcome of the invariant.

    ``accepted == surfaced + rejected + closed_empty + failed + dropped + detached + held``:
    each term is on the line, so the sum can be checked by eye; then the
    causes (timed out, evicted) and the kernel's accept queue / backlog.
    """
    kernel = "?" if queue is None else f"{queue[0]}/{queue[1]}"
    return (f"accepted {stats['accepted']} = held {stats['held']} + surfaced {stats['surfaced']} "
            f"+ rejected {stats['rejected']} + closed empty {stats['closed_empty']} + failed {stats['failed']} "
            f"+ dropped {stats['dropped']} + detached {stats['detached']}  timed out {stats['timed_out']}  "
            f"evicted {stats['evicted']}  kernel queue {kernel}")


@dataclass
class _Current:
    """What is serving now; a reload swaps ``source`` (a FilteredListener or Router) under the status and metrics."""

    sock: socket.socket
    source: FilteredListener | Router
    listener: FilteredListener
    json_logs: bool = False
    stop: threading.Event = field(default_factory=threading.Event)

    def stats(self) -> dict[str, Any]:
        return self.source.stats()


def _status_loop(current: _Current, interval: float) -> None:
    """Refresh the status line in place on a terminal; print plain (or JSON) lines otherwise."""
    queue = KernelQueue(current.sock)
    while not current.stop.wait(interval):
        kernel = queue.read()
        try:
            stats = current.stats()
        except Exception:  # the server is shutting down under us
            return
        line = status_line(stats, kernel)
        if current.json_logs:
            fields: dict[str, Any] = {k: stats[k] for k in (*_TERMS, "queued") if k in stats}
            if kernel is not None:
                fields.update(kernel_queue=kernel[0], kernel_backlog=kernel[1])
            status_log.info("%s", line, extra={"fields": {"type": "status", **fields}})
        else:
            console.status(line)


def _listen(bind: str, port: int, backlog: int) -> socket.socket:
    """The listen socket: IPv4, IPv6 (``::`` is dual-stack, like ``python -m http.server``) or ``unix:PATH``."""
    if bind.startswith("unix:"):
        return _listen_unix(bind[5:], backlog)
    host = bind.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    where = f"[{host}]:{port}" if family == socket.AF_INET6 else f"{host}:{port}"
    dual = host == "::" and socket.has_dualstack_ipv6()
    try:
        return socket.create_server((host, port), family=family, backlog=backlog, reuse_port=False, dualstack_ipv6=dual)
    except OSError as exc:
        raise _listen_error(where, exc, "--port") from None


def _listen_error(where: str, exc: OSError, option: str) -> AcceptFilterError:
    if exc.errno == errno.EADDRINUSE:
        return AcceptFilterError(f"cannot listen on {where}: the port is already in use; stop the other server or pick another {option}")
    if exc.errno in (errno.EACCES, errno.EPERM):
        return AcceptFilterError(f"cannot listen on {where}: permission denied (ports below 1024 need privileges)")
    if isinstance(exc, socket.gaierror) or exc.errno == errno.EADDRNOTAVAIL:  # a name or an address not here
        return AcceptFilterError(f"cannot listen on {where}: no such local address")
    return AcceptFilterError(f"cannot listen on {where}: {exc.strerror or exc}")


def _listen_unix(path: str, backlog: int) -> socket.socket:
    """A UNIX stream socket at ``path``; a stale socket file left by a dead server is replaced."""
    if not path:
        raise AcceptFilterError("--bind unix:PATH needs a path")
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        mode = None
    if mode is not None:
        if not stat.S_ISSOCK(mode):
            raise AcceptFilterError(f"cannot listen on unix:{path}: it exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except ConnectionRefusedError:
            os.unlink(path)  # nobody listens there: a stale file
        except OSError:
            pass
        else:
            raise AcceptFilterError(f"cannot listen on unix:{path}: another server is listening there")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        raise _listen_error(f"unix:{path}", exc, "--bind") from None
    return sock


def _display(sock: socket.socket) -> str:
    name = sock.getsockname()
    if sock.family == socket.AF_UNIX:
        return f"unix:{name}"
    host, port = name[:2]
    return f"http://{f'[{host}]' if ':' in host else host}:{port}/"


def _reload_filter_modules() -> None:
    """Discover installed filters again and re-import their modules, so an upgraded plugin takes effect."""
    from .. import registry

    registry._clear_cache()
    seen: set[str] = set()
    for eps in registry._entry_points().values():
        for ep in eps:
            module = ep.value.partition(":")[0].strip()
            if module in sys.modules and module not in seen:
                seen.add(module)
                try:
                    importlib.reload(sys.modules[module])
                except Exception as exc:  # the old module stays in sys.modules: say so, change nothing
                    raise AcceptFilterError(f"re-importing {module} ({ep.name}) failed: {type(exc).__name__}: {exc}") from None


class _Serve:
    """The server, its filtered listener(s), forwards and reloads."""

    def __init__(self, args: argparse.Namespace, plan: _Plan, sock: socket.socket) -> None:
        self.args = args
        self.plan = plan
        self.sock = sock  # bound by run(), or systemd's (socket activation); ours to close
        self.forwards: list[threading.Thread] = []
        self.unix_path = self.sock.getsockname() if self.sock.family == socket.AF_UNIX else None
        handler = functools.partial(_QuietHandler, directory=args.directory)
        try:
            server = _Server(("127.0.0.1", 0), handler, bind_and_activate=False)
            server.socket.close()
            server.socket = self.sock
            if self.sock.family == socket.AF_UNIX:
                server.server_name, server.server_port = "localhost", 0
            else:
                server.server_name = socket.getfqdn(self.sock.getsockname()[0])
                server.server_port = self.sock.getsockname()[1]
            server.daemon_threads = True
            self.server = server
            self.current = self._build(self.sock, driver="thread")
        except BaseException:
            self.sock.close()
            raise

    def _build(self, sock: socket.socket, *, driver: str) -> _Current:
        args, plan = self.args, self.plan
        policy: dict[str, Any] = {"timeout": args.timeout, "idle_timeout": args.idle_timeout, "max_held": args.max_held,
                                  "core": args.core, "driver": driver, "defer_accept": args.defer_accept or None}
        if plan.routes is None:
            listener = wrap(sock, plan.specs, on_timeout=args.on_timeout or WORKER_ON_TIMEOUT,
                            on_reject=args.on_reject, **policy)
            return _Current(sock, listener, listener, args.log_format == "json")
        router = route(sock, plan.routes, **plan.policy, **policy)
        return _Current(sock, router, router[plan.serve_name or next(iter(plan.routes))], args.log_format == "json")

    def start(self) -> None:
        """Point the server at the current listener and start the forwards (again, after a reload)."""
        if self.plan.serve_name is not None:
            self.server.socket = self.current.listener  # type: ignore[assignment]
        if isinstance(self.current.source, Router):
            if self.plan.forwards:
                logging.getLogger("acceptfilter.relay").setLevel(logging.INFO)  # a line per relayed connection
            # The accept threads of the current listeners (a reload's old ones end with their listeners).
            self.forwards = [forward(self.current.source[name], target) for name, target in self.plan.forwards.items()]

    def banner(self) -> str:
        args, plan, listener = self.args, self.plan, self.current.listener
        on_timeout = plan.policy["on_timeout"] if plan.routes is not None else (args.on_timeout or WORKER_ON_TIMEOUT)
        idle = "no limit" if listener.idle_timeout is None else f"{listener.idle_timeout:g} s"
        policy = (f"deadline {listener.deadline:g} s, idle limit {idle}, on timeout: {on_timeout}, "
                  f"max held {listener.max_held}, {args.core} core")
        if plan.routes is not None and plan.serve_name is None:
            where = _display(self.sock).removeprefix("http://").rstrip("/")
            return (f"Relaying on {where} (no file server: every route is forwarded; on reject: {args.on_reject}; "
                    f"{policy}). Ctrl-C stops, SIGHUP reloads.")
        if plan.routes is None:
            through = " -> ".join(plan.specs)
        else:
            through = f"route {plan.serve_name} ({' -> '.join(plan.routes.get(plan.serve_name or '', [])) or 'rejected connections'})"
        return f"Serving {args.directory} on {_display(self.sock)} through {through} ({policy}). Ctrl-C stops, SIGHUP reloads."

    def reload(self) -> str:
        """Rebuild every chain and route; move held connections over undecided; serve what was ready."""
        _reload_filter_modules()
        from ..registry import load_chain

        for chain in self.plan.chains():
            load_chain(chain)  # a plugin that broke: raise before anything changes
        dup = socket.socket(fileno=os.dup(self.sock.fileno()))
        try:
            fresh = self._build(dup, driver="none")
        except BaseException:
            dup.close()
            raise
        old = self.current
        if self.plan.serve_name is not None:
            self.server.shutdown()  # the serving loop stops between two accepts
        held = old.listener.detach_held()
        moved = 0
        for fd in held:
            try:
                fresh.listener.adopt(fd)
                moved += 1
            except OSError:  # it closed meanwhile
                os.close(fd)
        from ..drivers.thread import ThreadDriver

        driver = ThreadDriver(fresh.listener.engine)
        driver.start()
        fresh.listener.attach_driver(driver)
        self.current = fresh
        self.sock = dup
        self.start()
        _drain(old, self.server if self.plan.serve_name is not None else None)
        return f"reloaded: {len(self.plan.chains())} chain(s) rebuilt, {moved} held connection(s) moved to them"

    def close(self) -> None:
        self.current.stop.set()
        try:
            self.current.source.close()
            for thread in self.forwards:  # the last one out stops the relay loop: its connections closed and logged
                thread.join(10)
        finally:
            self.server.server_close()
            if self.unix_path:
                try:
                    os.unlink(self.unix_path)
                except OSError:
                    pass


def _drain(old: _Current, server: http.server.HTTPServer | None) -> None:
    """Serve what the old listener had already surfaced, then close it (its socket is a dup).

    ``server`` None: a relay only, every route forwarded; their relay loops take what is queued.
    """
    old.stop.set()
    listener = old.listener
    listener.setblocking(False)
    while server is not None:
        try:
            conn, addr = listener.accept()
        except (BlockingIOError, OSError):
            break
        server.process_request(conn, addr)
    if isinstance(old.source, Router):  # forwarded routes: their relay loops take what is queued
        import time

        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline and any(old.source[n].queued for n in old.source
                                                  if server is None or n != listener.route):
            time.sleep(0.01)
    old.source.close()


@dataclass
class _Plan:
    """The checked command line: one chain, or routes with their forwards."""

    specs: list[str]
    routes: dict[str, list[str]] | None = None
    forwards: dict[str, Forward] = field(default_factory=dict)
    #: The route the file server answers; None when every route is forwarded (a relay only).
    serve_name: str | None = ""
    #: Keywords for route(): on_timeout, on_reject, default (the --on-reject route, if any).
    policy: dict[str, Any] = field(default_factory=dict)

    def chains(self) -> list[list[str]]:
        return [self.specs] if self.routes is None else list(self.routes.values())


def _check(args: argparse.Namespace) -> _Plan:
    """Every mistake the command line can hold, found before anything is bound."""
    if not os.path.isdir(args.directory):
        raise AcceptFilterError(f"--directory {args.directory!r} is not a directory")
    if args.defer_accept and args.bind.startswith("unix:"):
        raise AcceptFilterError("--defer-accept is TCP_DEFER_ACCEPT, for TCP: not with --bind unix:PATH")
    from ..registry import load_chain

    if args.route:
        plan = _route_plan(args)
    else:
        for option, value in (("--serve-route", args.serve_route), ("--default", args.default)):
            if value is not None:
                raise AcceptFilterError(f"{option} {value} needs --route: without routes there is only one chain")
        if args.forward:
            raise AcceptFilterError("--forward needs --route: it relays one route's connections")
        if args.on_timeout and args.on_timeout.startswith("route:"):
            raise AcceptFilterError(f"--on-timeout {args.on_timeout} needs --route: without routes there is none to name")
        if args.on_reject not in ("close", "reset"):
            raise AcceptFilterError(f"--on-reject {args.on_reject} needs --route: without routes it is close or reset")
        plan = _Plan(args.filter or ["httpready"])
    for chain in plan.chains():
        load_chain(chain)  # report a bad spec before binding anything
    if args.on_timeout:
        parse_action(args.on_timeout, "--on-timeout")
    if args.metrics_port is not None:
        from ..metrics import _client

        _client()  # PrometheusMissingError (one line) if prometheus_client is missing
    return plan


def _serve_metrics(bind: str, port: int, stats: Callable[[], dict[str, Any]]) -> http.server.HTTPServer:
    """A small HTTP server for Prometheus: ``/metrics`` in the text format, read from stats() at scrape time."""
    from ..metrics import exposition

    class Source:
        def stats(self) -> dict[str, Any]:
            return stats()

    class Metrics(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path.split("?", 1)[0] not in ("/metrics", "/"):
                self.send_error(404, "only /metrics here")
                return
            body = exposition(Source())
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass  # scrapes every few seconds would bury the access log

    host = "127.0.0.1" if bind.startswith("unix:") else bind.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET

    class Server(http.server.ThreadingHTTPServer):
        address_family = family
        daemon_threads = True

    try:
        server = Server((host, port), Metrics)
    except OSError as exc:
        raise _listen_error(f"{host}:{port}" if family == socket.AF_INET else f"[{host}]:{port}", exc, "--metrics-port") from None
    threading.Thread(target=server.serve_forever, name="acceptfilter-metrics", daemon=True).start()
    return server


class _Signals:
    """SIGINT, SIGTERM and SIGHUP as events for the main thread, caught from the very start.

    Installed before anything is bound, so a SIGTERM that comes while the server is
    still starting is a clean stop too, not a default death (exit 143, no word).
    """

    WATCHED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def __init__(self) -> None:
        self.wake = threading.Event()
        self.pending: list[int] = []
        self._previous: dict[signal.Signals, Any] = {}

    def __enter__(self) -> _Signals:
        if threading.current_thread() is threading.main_thread():
            for sig in self.WATCHED:
                self._previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.pending.append(signum)
        self.wake.set()

    def post(self, signum: int) -> None:
        self._on_signal(signum, None)

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def run(args: argparse.Namespace, ready: threading.Event | None = None) -> int:
    plan = _check(args)
    from ..activation import inherited_listener
    from ..workers import check_workers, fork_workers

    workers = check_workers(args.workers)
    sock = inherited_listener() or _listen(args.bind, args.port, args.backlog)  # systemd's socket first
    if workers > 1:
        # Before any thread exists: each worker filters and serves the shared socket (acceptfilter.workers).
        role = fork_workers(workers)
        if not role.is_worker:
            sock.close()
            return role.exit_code
    with _Signals() as signals:
        return _run(args, plan, sock, signals, ready)


def _run(args: argparse.Namespace, plan: _Plan, sock: socket.socket, signals: _Signals,
         ready: threading.Event | None) -> int:
    serve = _Serve(args, plan, sock)
    metrics: http.server.HTTPServer | None = None
    try:
        if args.metrics_port is not None:
            metrics = _serve_metrics(args.bind, args.metrics_port, lambda: serve.current.stats())
        serve.start()
        for name, target in plan.forwards.items():
            chain = " -> ".join(plan.routes.get(name, []) if plan.routes else []) or "(rejected connections)"
            _line(f"route {name}: {chain} forwarded to {target}")
        _line(serve.banner())
        if metrics is not None:
            host, mport = str(metrics.server_address[0]), int(metrics.server_address[1])
            _line(f"Metrics on http://{f'[{host}]' if ':' in host else host}:{mport}/metrics")
        _kernel_warnings(serve.sock, args.backlog)
        return _run_until_signal(serve, args, signals, ready)
    finally:
        if metrics is not None:
            metrics.shutdown()
            metrics.server_close()
        serve.close()


def _line(text: str) -> None:
    """One whole line on stdout in one write, flushed.

    ``print`` writes the text and its newline separately when stdout is
    unbuffered (``PYTHONUNBUFFERED``, common in containers), and the workers
    of ``--workers N`` share one stdout: their banners would interleave
    ("Serving ...Serving ...\\n\\n") and a reader waiting for a line per worker
    would wait forever. One ``write`` of a short line to a pipe is atomic.
    """
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def _kernel_warnings(sock: socket.socket, backlog: int) -> None:
    if sock.family == socket.AF_UNIX:
        return  # sock_diag's TCP view has nothing to say about a UNIX socket
    from .. import diag

    try:
        for warning in diag.inspect(sock, requested_backlog=backlog).warnings:
            log.warning("%s", warning)
    except diag.DiagError as exc:
        log.warning("no kernel view of the listener: %s", exc)


def _say(message: str, **fields: Any) -> None:
    """A line for the operator (stopping, reloaded): bare text, or a JSON object with ``fields``."""
    status_log.info("%s", message, extra={"fields": {"type": "event", **fields}})


def _run_until_signal(serve: _Serve, args: argparse.Namespace, signals: _Signals, ready: threading.Event | None) -> int:
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
            threading.Thread(target=_status_loop, args=(serve.current, args.status_interval),
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


def _route_plan(args: argparse.Namespace) -> _Plan:
    """Check --route/--forward/--default/--on-reject/--serve-route/--on-timeout together, before anything is bound.

    ``--default NAME`` gets only silent clients: unless NAME is also a
    ``--route``, it becomes the last route with the ``silent`` filter (waits
    while nothing has arrived, rejects any byte, accepts the still-silent
    connection at the deadline); if it is one, a last route ``silent:to=NAME``
    labels silent clients for it. Everything else that no route accepts, at
    once or at the deadline, gets ``--on-reject``: a half-sent redis command or
    TLS garbage no longer reaches the SSH backend. With every route forwarded
    there is no file server (``serve_name`` None).
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
    except AcceptFilterError:
        raise AcceptFilterError(f"--on-reject takes close, reset or route:NAME, not {args.on_reject!r}") from None
    if reject.kind == "surface" and reject.route is None:
        raise AcceptFilterError("--on-reject takes close, reset or route:NAME (a route to send them to)")
    internal: set[str] = set()
    if args.default and args.default not in routes:
        routes[args.default] = ["silent"]
    elif args.default:
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
    action: Action | None = None
    if args.on_timeout:
        action = parse_action(args.on_timeout, "--on-timeout")
        if action.route is not None and action.route not in names:
            raise AcceptFilterError(f"--on-timeout {args.on_timeout}: {action.route!r} is not one of the routes: "
                                    f"{', '.join(sorted(names - internal))}")
    unknown = sorted(set(forwards) - names)
    if unknown:
        raise AcceptFilterError(f"--forward names route {unknown[0]!r}, which is not one of: "
                                f"{', '.join(sorted(names - internal))}")
    serve_name: str | None = args.serve_route
    if serve_name is None:
        unforwarded = [n for n in [*routes, *([reject_route] if reject_route else [])] if n not in forwards and n not in internal]
        serve_name = "http" if "http" in unforwarded else (unforwarded[0] if unforwarded else None)
    if serve_name is not None and serve_name not in names:
        raise AcceptFilterError(f"--serve-route {serve_name!r} is not one of the routes: {', '.join(sorted(names - internal))}")
    stranded = sorted(names - set(forwards) - {serve_name} - internal)
    if stranded:
        raise AcceptFilterError(f"route {stranded[0]!r} has nowhere to go: add --forward {stranded[0]}=HOST:PORT")
    if serve_name is not None and serve_name in forwards:
        raise AcceptFilterError(f"route {serve_name!r} is served by the file server; it cannot also be forwarded")
    resolved = {name: Forward(_resolve_once(name, fwd.target), fwd.send_proxy) for name, fwd in forwards.items()}
    policy: dict[str, Any] = {
        # Silent clients are matched by the silent route at the deadline; what is left
        # timed out with a part of something, and gets the reject action.
        "on_timeout": action or reject,
        "on_reject": reject if reject.route is None else "close",
        "default": reject_route,
    }
    return _Plan([], routes, resolved, serve_name, policy)


def _resolve_once(name: str, target: tuple[str, int]) -> tuple[str, int]:
    """HOST:PORT to an address, at start: a typo fails now, and no connection waits on DNS later."""
    host, port_number = target
    try:
        infos = socket.getaddrinfo(host, port_number, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise AcceptFilterError(f"--forward {name}={host}:{port_number}: cannot resolve {host!r} ({exc.strerror})") from None
    address = infos[0][4]
    return str(address[0]), int(address[1])


