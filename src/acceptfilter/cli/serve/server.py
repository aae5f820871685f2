"""What ``acceptfilter serve`` serves: the file server on filtered listener(s), the forwards, and reloads."""

from __future__ import annotations

import argparse
import functools
import http.server
import logging
import os
import socket
import threading
from dataclasses import dataclass, field
from typing import Any

from ...listener import FilteredListener, Router, route, wrap
from ...policy import WORKER_ON_TIMEOUT
from ...relay import forward
from ...reloading import reload_filter_modules
from .files import FileHandler, FileServer
from .listen import display
from .plan import Plan


@dataclass
class Current:
    """What is serving now; a reload swaps ``source`` (a FilteredListener or Router) under the status and metrics."""

    sock: socket.socket
    source: FilteredListener | Router
    listener: FilteredListener
    json_logs: bool = False
    stop: threading.Event = field(default_factory=threading.Event)

    def stats(self) -> dict[str, Any]:
        return self.source.stats()


class Serve:
    """The server, its filtered listener(s), forwards and reloads."""

    def __init__(self, args: argparse.Namespace, plan: Plan, sock: socket.socket) -> None:
        self.args = args
        self.plan = plan
        self.sock = sock  # bound by run(), or systemd's (socket activation); ours to close
        self.forwards: list[threading.Thread] = []
        self.unix_path = self.sock.getsockname() if self.sock.family == socket.AF_UNIX else None
        handler = functools.partial(FileHandler, directory=args.directory)
        try:
            server = FileServer(("127.0.0.1", 0), handler, bind_and_activate=False)
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

    def _build(self, sock: socket.socket, *, driver: str) -> Current:
        args, plan = self.args, self.plan
        policy: dict[str, Any] = {"timeout": args.timeout, "idle_timeout": args.idle_timeout, "max_held": args.max_held,
                                  "core": args.core, "driver": driver,
                                  "defer_accept": args.defer_accept or None}
        if plan.routes is None:
            listener = wrap(sock, plan.specs, on_timeout=args.on_timeout or WORKER_ON_TIMEOUT,
                            on_reject=args.on_reject, **policy)
            return Current(sock, listener, listener, args.log_format == "json")
        router = route(sock, plan.routes, **plan.policy, **policy)
        return Current(sock, router, router[plan.serve_name or next(iter(plan.routes))], args.log_format == "json")

    def start(self) -> None:
        """Point the server at the current listener and start the forwards (again, after a reload)."""
        if self.plan.serve_name is not None:
            self.server.socket = self.current.listener  # type: ignore[assignment]
        if isinstance(self.current.source, Router):
            if self.plan.forwards:
                logging.getLogger("acceptfilter.relay").setLevel(logging.INFO)  # a line per relayed connection
                logging.getLogger("acceptfilter.outcome").setLevel(logging.INFO)  # and per one rejected or timed out
            # The accept threads of the current listeners (a reload's old ones end with their listeners).
            self.forwards = [forward(self.current.source[name], target) for name, target in self.plan.forwards.items()]

    def banner(self) -> str:
        args, plan, listener = self.args, self.plan, self.current.listener
        on_timeout = plan.policy["on_timeout"] if plan.routes is not None else (args.on_timeout or WORKER_ON_TIMEOUT)
        idle = "no limit" if listener.idle_timeout is None else f"{listener.idle_timeout:g} s"
        policy = (f"deadline {listener.deadline:g} s, idle limit {idle}, on timeout: {on_timeout}, "
                  f"max held {listener.max_held}, {args.core} core")
        if plan.routes is not None and plan.serve_name is None:
            where = display(self.sock).removeprefix("http://").rstrip("/")
            return (f"Relaying on {where} (no file server: every route is forwarded; on reject: {args.on_reject}; "
                    f"{policy}). Ctrl-C stops, SIGHUP reloads.")
        if plan.routes is None:
            through = " -> ".join(plan.specs)
        else:
            through = f"route {plan.serve_name} ({' -> '.join(plan.routes.get(plan.serve_name or '', [])) or 'rejected connections'})"
        return f"Serving {args.directory} on {display(self.sock)} through {through} ({policy}). Ctrl-C stops, SIGHUP reloads."

    def reload(self) -> str:
        """Rebuild every chain and route; move held connections over undecided; serve what was ready."""
        reload_filter_modules()
        from ...registry import load_chain

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
        from ...drivers.thread import ThreadDriver

        driver = ThreadDriver(fresh.listener.engine)
        driver.start()
        fresh.listener.attach_driver(driver)
        self.current = fresh
        self.sock = dup
        self.start()
        drain(old, self.server if self.plan.serve_name is not None else None)
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


def drain(old: Current, server: http.server.HTTPServer | None) -> None:
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
