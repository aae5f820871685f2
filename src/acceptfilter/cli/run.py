"""``acceptfilter run [options] -- uvicorn|hypercorn|gunicorn ARGS...``: a filter with no code change.

gunicorn keeps its prefork design: this replaces the process with
``gunicorn -c python:acceptfilter.gunicorn ARGS...`` and the options as
``ACCEPTFILTER_*`` environment variables (see :mod:`acceptfilter.integrations.gunicorn`).
For uvicorn and Hypercorn:

The server's own command line is parsed by the server's own CLI code, in this
process; only the final "run it" step is replaced: acceptfilter binds the
address the server was asked to bind, wraps it in the filter (asyncio driver:
no thread) and serves it with the server's in-process API
(``uvicorn.Server.serve(sockets=[listener])``, Hypercorn's asyncio worker).
One process, one event loop per worker: ``--reload`` is refused; ``--workers N``
forks N workers on one shared socket (:mod:`acceptfilter.workers`). SIGHUP
reloads uvicorn's filters in place, in every worker, keeping held connections
(:mod:`acceptfilter.integrations.uvicorn`); Hypercorn's workers keep running
through a SIGHUP with the filters they have.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import logging
import os
import socket
import sys
from typing import Any

from ..errors import AcceptFilterError
from ..exporter import MetricsServer
from ..exporter import start as start_metrics
from ..workers import check_workers, fork_workers
from .args import (
    IDLE_TIMEOUT_HELP,
    MAX_HELD_HELP,
    TIMEOUT_HELP,
    non_negative_float,
    on_timeout,
    positive_float,
    positive_int,
)

SERVERS = ("uvicorn", "hypercorn", "gunicorn")


def register(subparsers: Any) -> None:
    p: argparse.ArgumentParser = subparsers.add_parser(
        "run",
        help="run uvicorn, hypercorn or gunicorn behind an accept filter, unchanged",
        description="Run `uvicorn ...`, `hypercorn ...` or `gunicorn ...` (their usual arguments, after --) "
        "behind an accept filter.",
    )
    p.add_argument("--filter", "-f", action="append", metavar="SPEC", help="filter spec; repeat for a chain (default: httpready)")
    p.add_argument("--timeout", type=positive_float, default=None, help=TIMEOUT_HELP)
    p.add_argument("--idle-timeout", type=non_negative_float, default=None, metavar="S", help=IDLE_TIMEOUT_HELP)
    p.add_argument("--on-timeout", type=on_timeout, default=None, metavar="ACTION",
                   help="close (default: a partial HTTP request is answered 408 Request Timeout first), surface "
                        "(the server sees it) or reset (RST)")
    p.add_argument("--max-held", type=positive_int, default=None, help=MAX_HELD_HELP)
    p.add_argument("--core", choices=("c", "python"), default="c", help="I/O core (default: c)")
    p.add_argument("--metrics-port", default=None, metavar="[HOST:]PORT",
                   help="serve Prometheus metrics there: every engine on the server's port summed (all workers), "
                        "with the kernel's view of it (host default: 127.0.0.1; needs prometheus_client)")
    p.add_argument("server", nargs=argparse.REMAINDER, metavar="-- SERVER ARGS", help="uvicorn|hypercorn|gunicorn ...")
    p.set_defaults(func=run)


def _options(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "filter": args.filter or ["httpready"],
        "core": args.core,
        "policy": {"timeout": args.timeout, "idle_timeout": args.idle_timeout, "on_timeout": args.on_timeout,
                   "max_held": args.max_held},
        "metrics": _metrics_address(args),
    }


def _metrics_address(args: argparse.Namespace) -> tuple[str, int] | None:
    """--metrics-port checked before the server starts (a bad value, or prometheus_client missing: one line)."""
    if args.metrics_port is None:
        return None
    from ..exporter import parse_address
    from ..metrics import _client

    address = parse_address(args.metrics_port, "--metrics-port")
    _client()
    return address


def _metrics(options: dict[str, Any], port: int) -> MetricsServer | None:
    """The scrape endpoint for every engine on ``port`` (bound now: a port in use is one line, before serving)."""
    if options["metrics"] is None:
        return None
    from ..exporter import metrics_server

    host, mport = options["metrics"]
    server = metrics_server(host, mport, port)
    print(f"acceptfilter: metrics on {server.url}", file=sys.stderr, flush=True)
    return server


def run(args: argparse.Namespace) -> int:
    if args.on_timeout and args.on_timeout.startswith("route:"):
        raise AcceptFilterError(f"--on-timeout {args.on_timeout}: acceptfilter run has no routes; use surface, close or reset")
    command = list(args.server)
    if command and command[0] == "--":
        command = command[1:]
    if not command or command[0] not in SERVERS:
        raise AcceptFilterError(f"give the server command after --: one of {', '.join(SERVERS)} (e.g. -- uvicorn app:app)")
    name, server_args = command[0], command[1:]
    for value in _workers_args(server_args):
        check_workers(value)  # the server's own parser would print its whole usage for this
    if name == "gunicorn":
        return _run_gunicorn(server_args, args)  # gunicorn takes LISTEN_FDS itself (same pid after exec)
    from ..activation import inherited_listener

    options = _options(args)
    options["sock"] = inherited_listener()  # systemd socket activation; None: bind as the server says
    if name == "uvicorn":
        return _run_uvicorn(server_args, options)
    return _run_hypercorn(server_args, options)


def _run_gunicorn(server_args: list[str], args: argparse.Namespace) -> int:
    if any(a in ("-c", "--config") or a.startswith("--config=") for a in server_args):
        raise AcceptFilterError("gunicorn already has a config file here: add "
                                "`import acceptfilter.gunicorn; acceptfilter.gunicorn.install(globals())` to it "
                                "and run gunicorn directly")
    env = dict(os.environ)
    env["ACCEPTFILTER_FILTER"] = " ".join(args.filter or ["httpready"])
    env["ACCEPTFILTER_CORE"] = args.core
    if args.metrics_port is not None:
        _metrics_address(args)
        env["ACCEPTFILTER_METRICS_PORT"] = str(args.metrics_port)
    for var, value in (("ACCEPTFILTER_TIMEOUT", args.timeout), ("ACCEPTFILTER_MAX_HELD", args.max_held),
                       ("ACCEPTFILTER_ON_TIMEOUT", args.on_timeout), ("ACCEPTFILTER_IDLE_TIMEOUT", args.idle_timeout)):
        if value is not None:
            env[var] = str(value)
    from ..integrations.gunicorn import settings

    settings(env)  # a bad filter spec fails here, before gunicorn starts
    server_args, asgi = _gunicorn_worker_class(server_args)
    if asgi and args.metrics_port is not None:
        raise AcceptFilterError("--metrics-port with gunicorn's uvicorn worker is not supported: each worker filters "
                                "by itself; use `acceptfilter run --metrics-port ... -- uvicorn --workers N ...`")
    # The uvicorn worker filters in each worker (acceptfilter.workers); sync and gthread need the hooks.
    config = [] if asgi else ["-c", "python:acceptfilter.gunicorn"]
    argv = [sys.executable, "-m", "gunicorn", *config, *server_args]
    os.execve(sys.executable, argv, env)
    return 1  # not reached


#: gunicorn worker classes and what acceptfilter runs for them (None: the hooks with the filter process).
GUNICORN_WORKERS: dict[str, str | None] = {
    "sync": None,
    "gthread": None,
    "uvicorn_worker.UvicornWorker": "acceptfilter.integrations.uvicorn_worker.UvicornWorker",
    "uvicorn_worker.UvicornH11Worker": "acceptfilter.integrations.uvicorn_worker.UvicornH11Worker",
    "uvicorn.workers.UvicornWorker": "acceptfilter.integrations.uvicorn_worker.UvicornWorker",
    "uvicorn.workers.UvicornH11Worker": "acceptfilter.integrations.uvicorn_worker.UvicornH11Worker",
}
GUNICORN_WORKERS.update({v: v for v in list(GUNICORN_WORKERS.values()) if v})


def _gunicorn_worker_class(server_args: list[str]) -> tuple[list[str], bool]:
    """gunicorn's arguments with the worker class mapped to a filtering one; True for the ASGI worker.

    Any other worker class (gevent, eventlet, tornado, a class of your own) is
    refused with one line: those workers accept in ways acceptfilter cannot
    put a filter in front of without knowing them.
    """
    out = list(server_args)
    asgi = False
    for i, arg in enumerate(out):
        if arg == "--":
            break
        if arg in ("-k", "--worker-class") and i + 1 < len(out):
            index, value = i + 1, out[i + 1]
        elif arg.startswith("--worker-class="):
            index, value = i, arg.partition("=")[2]
        elif arg.startswith("-k") and len(arg) > 2:
            index, value = i, arg[2:]
        else:
            continue
        name = value.removeprefix("egg:gunicorn#")
        if name not in GUNICORN_WORKERS:
            raise AcceptFilterError(
                f"gunicorn worker class {value!r} is not supported: use sync or gthread for WSGI apps (slow clients "
                "wait in the filter process), or -k uvicorn_worker.UvicornWorker for ASGI apps")
        mapped = GUNICORN_WORKERS[name]
        if mapped is not None:
            asgi = True
            out[index] = mapped if index == i + 1 else (f"--worker-class={mapped}" if arg.startswith("--") else f"-k{mapped}")
    return out, asgi


def _workers_args(server_args: list[str]) -> list[str]:
    """The values given to -w/--workers on the server's command line (every form argparse and click take)."""
    values: list[str] = []
    for i, arg in enumerate(server_args):
        if arg == "--":
            break
        if arg in ("-w", "--workers"):
            values.append(server_args[i + 1] if i + 1 < len(server_args) else "")
        elif arg.startswith("--workers="):
            values.append(arg.partition("=")[2])
        elif arg.startswith("-w") and not arg.startswith("--") and len(arg) > 2:
            values.append(arg[2:].lstrip("="))
    return values


def _bind(host: str, port: int, backlog: int, option: str) -> socket.socket:
    """The listen socket (every worker shares it), bound before the server starts: a port in use or
    a privileged one is one line, in ``acceptfilter serve``'s words, not the server's traceback."""
    from ..errors import listen_error

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    where = f"[{host}]:{port}" if family == socket.AF_INET6 else f"{host}:{port}"
    try:
        return socket.create_server((host, port), family=family, backlog=backlog)
    except OSError as exc:
        raise listen_error(where, exc, option) from None


def _run_uvicorn(server_args: list[str], options: dict[str, Any]) -> int:
    import uvicorn

    from ..integrations import uvicorn as af_uvicorn

    main_module = importlib.import_module("uvicorn.main")  # `uvicorn.main` is also the click command
    accepted = set(inspect.signature(uvicorn.Config).parameters)
    exit_code: list[int] = []

    def filtered_run(app: Any, **kwargs: Any) -> None:
        for flag, bad in (("reload", True), ("uds", None), ("fd", None)):
            if kwargs.get(flag) not in (None, False) and (bad is None or kwargs.get(flag) == bad):
                raise AcceptFilterError(f"acceptfilter run does not support uvicorn --{flag}")
        workers = check_workers(1 if kwargs.get("workers") is None else kwargs["workers"])
        if kwargs.get("app_dir") is not None:
            sys.path.insert(0, kwargs["app_dir"])
        host, port, loop = kwargs.pop("host"), kwargs.pop("port"), kwargs.pop("loop", "auto")
        config = {k: v for k, v in kwargs.items() if k in accepted and k not in ("uds", "fd", "reload", "workers")}
        policy = {k: v for k, v in options["policy"].items() if v is not None}
        sock = options["sock"] or _bind(host, port, int(config.get("backlog", 2048)), "--port")
        metrics = _metrics(options, int(sock.getsockname()[1]))
        if workers > 1:
            role = fork_workers(workers, idle=metrics.serve_for if metrics else None)  # one engine per worker
            if not role.is_worker:
                sock.close()
                exit_code.append(role.exit_code)
                return
            if metrics is not None:
                metrics.server_close()  # the parent answers scrapes, summing the workers
                metrics = None
        if metrics is not None:
            start_metrics(metrics)
        try:
            af_uvicorn.run(app, host, port, loop=str(loop), filter=options["filter"], core=options["core"], policy=policy,
                           sock=sock, reload_on_hup=True, **config)
        except KeyboardInterrupt:  # uvicorn re-raises the signal it shut down for; uvicorn.run() swallows it too
            pass

    original = getattr(main_module, "run")  # noqa: B009
    setattr(main_module, "run", filtered_run)  # noqa: B010
    import click

    try:
        uvicorn.main.main(args=server_args, prog_name="uvicorn", standalone_mode=False)
    except click.ClickException as exc:
        raise AcceptFilterError(f"uvicorn: {exc.format_message()}") from None
    finally:
        setattr(main_module, "run", original)  # noqa: B010
    return exit_code[0] if exit_code else 0


def _run_hypercorn(server_args: list[str], options: dict[str, Any]) -> int:
    import asyncio

    from hypercorn.config import Config
    from hypercorn.utils import load_application

    from ..integrations import hypercorn as af_hypercorn
    from ..integrations.uvicorn import loop_factory

    main_module = importlib.import_module("hypercorn.__main__")

    def filtered_run(config: Config) -> int:
        if config.use_reloader:
            raise AcceptFilterError("acceptfilter run does not support hypercorn --reload")
        workers = check_workers(config.workers)
        if len(config.bind) != 1 or config.bind[0].startswith(("unix:", "fd://")) or config.ssl_enabled:
            raise AcceptFilterError("acceptfilter run supports exactly one TCP --bind HOST:PORT, without TLS")
        host, _, port = config.bind[0].rpartition(":")
        host = host.strip("[]") or "127.0.0.1"
        if config.worker_class not in ("asyncio", "uvloop"):
            raise AcceptFilterError(f"acceptfilter run supports Hypercorn's asyncio and uvloop workers, not "
                                    f"{config.worker_class!r} (trio: use acceptfilter.integrations.trio in code)")
        sock = options["sock"] or _bind(host, int(port), config.backlog, "--bind")
        metrics = _metrics(options, int(sock.getsockname()[1]))
        if workers > 1:
            role = fork_workers(workers, idle=metrics.serve_for if metrics else None)  # one engine per worker
            if not role.is_worker:
                sock.close()
                return role.exit_code
            if metrics is not None:
                metrics.server_close()  # the parent answers scrapes, summing the workers
                metrics = None
        if metrics is not None:
            start_metrics(metrics)
        _hypercorn_logs_once(config)
        app = load_application(config.application_path, config.wsgi_max_body_size)
        loop = "uvloop" if config.worker_class == "uvloop" else "asyncio"
        policy = {k: v for k, v in options["policy"].items() if v is not None}
        with asyncio.Runner(loop_factory=loop_factory(loop)) as runner:
            runner.run(af_hypercorn.serve(app, config, sock=sock, filter=options["filter"], core=options["core"], **policy))
        return 0

    original = getattr(main_module, "run")  # noqa: B009
    setattr(main_module, "run", filtered_run)  # noqa: B010
    try:
        return int(main_module.main(server_args) or 0)
    finally:
        setattr(main_module, "run", original)  # noqa: B010


def _hypercorn_logs_once(config: Any) -> None:
    """Keep Hypercorn's error log to its own handler: it propagates to the root logger too, which
    is silent under ``hypercorn`` alone but is the command's handler here (every line twice)."""
    error_logger = config.log.error_logger
    if isinstance(error_logger, logging.Logger) and error_logger.handlers:
        error_logger.propagate = False

