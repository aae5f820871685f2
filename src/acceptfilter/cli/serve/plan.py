"""The checked command line of ``acceptfilter serve``: chains, routes, forwards and their policies."""

from __future__ import annotations

import argparse
import os
import socket
from dataclasses import dataclass, field
from typing import Any

from ...errors import AcceptFilterError
from ...policy import Action, parse_action
from ...relay import Forward, parse_forward


@dataclass
class Plan:
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


def check(args: argparse.Namespace) -> Plan:
    """Every mistake the command line can hold, found before anything is bound."""
    if not os.path.isdir(args.directory):
        raise AcceptFilterError(f"--directory {args.directory!r} is not a directory")
    if args.defer_accept and args.bind.startswith("unix:"):
        raise AcceptFilterError("--defer-accept is TCP_DEFER_ACCEPT, for TCP: not with --bind unix:PATH")
    from ...registry import load_chain

    if args.route:
        plan = route_plan(args)
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
        plan = Plan(args.filter or ["httpready"])
    for chain in plan.chains():
        load_chain(chain)  # report a bad spec before binding anything
    if args.on_timeout:
        parse_action(args.on_timeout, "--on-timeout")
    if args.metrics_port is not None:
        from ...metrics import _client

        _client()  # PrometheusMissingError (one line) if prometheus_client is missing
    return plan


def route_plan(args: argparse.Namespace) -> Plan:
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
    resolved = {name: Forward(resolve_once(name, fwd.target), fwd.send_proxy) for name, fwd in forwards.items()}
    policy: dict[str, Any] = {
        # Silent clients are matched by the silent route at the deadline; what is left
        # timed out with a part of something, and gets the reject action.
        "on_timeout": action or reject,
        "on_reject": reject if reject.route is None else "close",
        "default": reject_route,
    }
    return Plan([], routes, resolved, serve_name, policy)


def resolve_once(name: str, target: tuple[str, int]) -> tuple[str, int]:
    """HOST:PORT to an address, at start: a typo fails now, and no connection waits on DNS later."""
    host, port_number = target
    try:
        infos = socket.getaddrinfo(host, port_number, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise AcceptFilterError(f"--forward {name}={host}:{port_number}: cannot resolve {host!r} ({exc.strerror})") from None
    address = infos[0][4]
    return str(address[0]), int(address[1])
