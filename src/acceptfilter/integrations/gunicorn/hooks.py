"""gunicorn's server hooks and the settings they read (see the package docstring)."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Mapping, MutableMapping
from typing import Any

from ...errors import AcceptFilterError
from ...listener import ConnectionInfo
from ...listener import connection_info as _connection_info
from ...policy import WORKER_ON_TIMEOUT, Policy
from ...registry import load_chain
from .filter_process import FeederSettings
from .supervisor import Supervisor

__all__ = ["connection_info", "install", "on_exit", "on_reload", "on_starting", "post_fork", "settings", "when_ready"]

_ENV = {
    "filter": "ACCEPTFILTER_FILTER",
    "timeout": "ACCEPTFILTER_TIMEOUT",
    "on_timeout": "ACCEPTFILTER_ON_TIMEOUT",
    "max_held": "ACCEPTFILTER_MAX_HELD",
    "idle_timeout": "ACCEPTFILTER_IDLE_TIMEOUT",
    "core": "ACCEPTFILTER_CORE",
    "defer_accept": "ACCEPTFILTER_DEFER_ACCEPT",
    "metrics_port": "ACCEPTFILTER_METRICS_PORT",
}
_installed: dict[str, Any] = {}


def settings(env: Mapping[str, str] | None = None, **defaults: Any) -> FeederSettings:
    """The effective settings, checked: environment over ``defaults`` over built-in defaults.

    Raises :class:`AcceptFilterError` (or its subclasses) naming what is wrong.
    """
    env = os.environ if env is None else env
    merged: dict[str, Any] = {k: v for k, v in {**_installed, **defaults}.items() if v is not None}
    for key, var in _ENV.items():
        if env.get(var, "").strip():
            merged[key] = env[var].strip()
    unknown = set(merged) - set(_ENV)
    if unknown:
        raise AcceptFilterError(f"unknown acceptfilter setting(s): {', '.join(sorted(unknown))}; known: {', '.join(_ENV)}")
    raw_filter = merged.get("filter", "httpready")
    filters = tuple(raw_filter.split()) if isinstance(raw_filter, str) else tuple(raw_filter)
    try:
        timeout = None if merged.get("timeout") is None else float(merged["timeout"])
        max_held = None if merged.get("max_held") is None else int(merged["max_held"])
        idle_timeout = None if merged.get("idle_timeout") is None else float(merged["idle_timeout"])
    except ValueError as exc:
        raise AcceptFilterError(f"{_ENV['timeout']} and {_ENV['idle_timeout']} must be seconds and "
                                f"{_ENV['max_held']} a count: {exc}") from None
    if idle_timeout is not None and not (idle_timeout >= 0 and idle_timeout != float("inf")):
        raise AcceptFilterError(f"{_ENV['idle_timeout']} must be 0 (no limit) or more seconds, not {idle_timeout:g}")
    if timeout is not None and not timeout > 0:
        raise AcceptFilterError(f"{_ENV['timeout']} must be more than 0 seconds, not {timeout:g}")
    if max_held is not None and max_held < 1:
        raise AcceptFilterError(f"{_ENV['max_held']} must be at least 1, not {max_held}")
    try:
        defer_accept = int(merged.get("defer_accept", 1))
    except ValueError:
        raise AcceptFilterError(f"{_ENV['defer_accept']} must be whole seconds (0: off)") from None
    if defer_accept < 0:
        raise AcceptFilterError(f"{_ENV['defer_accept']} must be whole seconds (0: off), not {defer_accept}")
    core = str(merged.get("core", "c"))
    if core not in ("c", "python"):
        raise AcceptFilterError(f"{_ENV['core']} must be 'c' or 'python', not {core!r}")
    on_timeout = str(merged.get("on_timeout", WORKER_ON_TIMEOUT))  # sync/gthread: a surfaced idle client pins a worker
    metrics = merged.get("metrics_port")
    if metrics is not None:
        from ...exporter import parse_address

        host, port = parse_address(str(metrics), _ENV["metrics_port"])
        metrics = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        from ...metrics import _client

        _client()  # one line naming what to install if prometheus_client is missing
    load_chain(list(filters))  # unknown names and malformed specs fail here, in the arbiter
    Policy.build(timeout=timeout, on_timeout=on_timeout, max_held=max_held, idle_timeout=idle_timeout)
    return FeederSettings(filters, timeout, on_timeout, max_held, core, defer_accept, idle_timeout, metrics)


def connection_info(environ: Mapping[str, Any]) -> ConnectionInfo | None:
    """What the filters learnt about the connection serving this WSGI request."""
    sock = environ.get("gunicorn.socket")
    return None if sock is None else _connection_info(sock)


# -- gunicorn's server hooks ----------------------------------------------
_supervisor: Supervisor | None = None


def _check_server(server: Any) -> None:
    from gunicorn.workers.gthread import ThreadWorker
    from gunicorn.workers.sync import SyncWorker

    worker = server.worker_class
    if not (isinstance(worker, type) and issubclass(worker, (SyncWorker, ThreadWorker))):
        name = getattr(server.cfg, "worker_class_str", worker)
        raise RuntimeError(f"acceptfilter supports gunicorn's sync and gthread workers, not {name}; "
                           "for an ASGI app use -k acceptfilter.integrations.uvicorn_worker.UvicornWorker "
                           "(without this config) or `acceptfilter run -- uvicorn ...`")
    if server.cfg.reuse_port:
        raise RuntimeError("acceptfilter cannot filter with --reuse-port (each worker binds its own socket); drop it")


def on_starting(server: Any) -> None:
    """Check the worker class and settings before anything binds."""
    _check_server(server)
    try:
        settings()
    except AcceptFilterError as exc:
        raise RuntimeError(f"acceptfilter: {exc}") from None


def when_ready(server: Any) -> None:
    """Listeners are bound: start the filter process before any worker exists."""
    global _supervisor
    sup = Supervisor(server, server.LISTENERS, settings())
    try:
        sup.start()
    except AcceptFilterError as exc:
        raise RuntimeError(str(exc)) from None
    _supervisor = sup


def post_fork(server: Any, worker: Any) -> None:
    """In each new worker: accept from the hand-off channel instead of the listen socket."""
    if _supervisor is not None:
        worker.sockets = _supervisor.worker_sockets(worker.sockets)


def on_reload(server: Any) -> None:
    """HUP: keep the filter process if nothing changed; hand over if the settings did."""
    global _supervisor
    old = _supervisor
    try:
        config = settings()
    except AcceptFilterError as exc:
        server.log.error("acceptfilter: keeping the previous settings: %s", exc)
        return
    if old is None:
        return
    fds = tuple(lst.fileno() for lst in server.LISTENERS)
    try:
        if fds != old.fds:
            new = Supervisor(server, server.LISTENERS, config)
            new.start()
            _supervisor = new
            old.stop()
        elif config != old.config:
            server.log.info("acceptfilter: settings changed; handing over to a new filter process")
            old.replace(config)
    except AcceptFilterError as exc:
        server.log.error("acceptfilter: keeping the running filter process: %s", exc)


def on_exit(server: Any) -> None:
    """The arbiter is done: stop the filter process."""
    global _supervisor
    if _supervisor is not None:
        _supervisor.stop()
        _supervisor = None


_HOOKS: dict[str, Callable[..., None]] = {
    "on_starting": on_starting,
    "when_ready": when_ready,
    "post_fork": post_fork,
    "on_reload": on_reload,
    "on_exit": on_exit,
}


def install(namespace: MutableMapping[str, Any], **defaults: Any) -> None:
    """Enable acceptfilter from your own gunicorn config file: ``install(globals(), filter=...)``.

    Adds the server hooks to ``namespace``; a hook you already define there
    still runs, after acceptfilter's. ``defaults`` are ``filter``,
    ``timeout``, ``idle_timeout``, ``on_timeout``, ``max_held``, ``core`` and ``defer_accept``; the
    ``ACCEPTFILTER_*`` environment variables override them.
    """
    unknown = set(defaults) - set(_ENV)
    if unknown:
        raise TypeError(f"install() got unknown setting(s) {', '.join(sorted(unknown))}; known: {', '.join(_ENV)}")
    _installed.clear()
    _installed.update(defaults)
    for name, ours in _HOOKS.items():
        theirs = namespace.get(name)
        if theirs is None or getattr(theirs, "_acceptfilter", False):
            namespace[name] = ours
        else:
            namespace[name] = _chained(ours, theirs)


def _chained(ours: Callable[..., None], theirs: Callable[..., None]) -> Callable[..., None]:
    @functools.wraps(theirs)  # keeps the signature: gunicorn checks each hook's arity
    def hook(*args: Any) -> None:
        ours(*args)
        theirs(*args)

    hook._acceptfilter = True  # type: ignore[attr-defined]
    return hook
