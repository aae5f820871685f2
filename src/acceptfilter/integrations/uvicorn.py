"""uvicorn behind a filter: ``Server.serve(sockets=[listener])``, on asyncio or uvloop.

uvicorn hands each socket in ``sockets`` to ``loop.create_server(sock=...)``
and closes it at shutdown (``close()`` is idempotent). The listener is created
inside the loop (``driver="asyncio"``: no thread). On uvloop the loop must be
:class:`acceptfilter.integrations.uvloop.Loop`, which :func:`run` picks for
``loop="uvloop"`` (and for ``"auto"`` when uvloop is installed)::

    from acceptfilter.integrations.uvicorn import run
    run(app, "0.0.0.0", 8000, filter="httpready", timeout=10)

An ASGI 3 application reads what the filters learnt with
``acceptfilter.integrations.asgi.scope_info(scope)`` (see :mod:`.asgi`).
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable
from typing import Any

import uvicorn

from ..listener import FilteredListener, FilterSpecs, wrap
from .asgi import ConnectionInfoMiddleware, index_peers, is_asgi3
from .asyncio import _is_selector_loop

__all__ = ["loop_factory", "run", "serve"]


def loop_factory(loop: str = "auto") -> Callable[[], asyncio.AbstractEventLoop]:
    """The event loop factory for uvicorn's ``loop`` names: "auto", "asyncio" or "uvloop"."""
    if loop in ("auto", "uvloop"):
        try:
            from .uvloop import new_event_loop
        except ImportError:
            if loop == "uvloop":
                raise
        else:
            return new_event_loop
    if loop in ("auto", "asyncio"):
        return asyncio.SelectorEventLoop
    raise ValueError(f"loop must be 'auto', 'asyncio' or 'uvloop', not {loop!r}")


def _is_filtered_uvloop(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        from .uvloop import Loop
    except ImportError:
        return False
    return isinstance(loop, Loop)


async def serve(
    app: Any,
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    filter: FilterSpecs = "httpready",
    sock: socket.socket | None = None,
    core: str = "c",
    policy: dict[str, Any] | None = None,
    started: Callable[[FilteredListener, uvicorn.Server], None] | None = None,
    **config: Any,
) -> None:
    """Serve ``app`` with uvicorn on the running loop, behind ``filter``.

    ``sock`` (a listening socket) replaces ``host``/``port``; ``policy`` goes
    to :func:`acceptfilter.wrap`; ``config`` to ``uvicorn.Config``;
    ``started(listener, server)`` is called before serving (set
    ``server.should_exit = True`` to stop).
    """
    loop = asyncio.get_running_loop()
    if not _is_selector_loop(loop) and not _is_filtered_uvloop(loop):
        raise RuntimeError(
            "uvicorn calls loop.create_server(sock=listener): on uvloop run it on "
            "acceptfilter.integrations.uvloop.Loop (see loop_factory())"
        )
    app = _with_info(app, config)
    server = _AnnouncingServer(uvicorn.Config(app, **config), filter)  # Config() sets up uvicorn's logging
    # Load the app before listening, as uvicorn does: a bad "module:app" is uvicorn's one
    # "Error loading ASGI app" line and exit status 3, with nothing announced and nothing bound.
    server.config.load()
    raw = sock or socket.create_server((host, port), backlog=config.get("backlog", 2048))
    listener = wrap(raw, filter, core=core, driver="asyncio", **(policy or {}))
    index_peers(listener)
    if started is not None:
        started(listener, server)
    try:
        await server.serve(sockets=[listener])  # type: ignore[list-item]
    finally:
        listener.close()


class _AnnouncingServer(uvicorn.Server):
    """uvicorn's Server that says where it runs once it does: after the lifespan startup and listening.

    uvicorn logs its address only for sockets it bound itself, so the filtered
    listener would start silently; a line before ``serve()`` would claim "running"
    for an app whose startup then fails.
    """

    def __init__(self, config: uvicorn.Config, filter: FilterSpecs) -> None:
        super().__init__(config)
        self._filter = filter

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if not self.started or not sockets:
            return
        bound_host, bound_port = sockets[0].getsockname()[:2]
        logging.getLogger("uvicorn.error").info(
            "Uvicorn running on http://%s:%d behind acceptfilter %s (Press CTRL+C to quit)",
            f"[{bound_host}]" if ":" in bound_host else bound_host,
            bound_port,
            self._filter,
        )


def _with_info(app: Any, config: dict[str, Any]) -> Any:
    """The app wrapped so ``scope_info(scope)`` works, when it is an ASGI 3 app we can see."""
    if config.get("interface", "auto") not in ("auto", "asgi3") or config.get("factory"):
        return app
    if isinstance(app, str):
        from uvicorn.importer import ImportFromStringError, import_from_string

        try:
            loaded = import_from_string(app)
        except ImportFromStringError:
            return app  # uvicorn reports it, in its words
    else:
        loaded = app
    return ConnectionInfoMiddleware(loaded) if is_asgi3(loaded) else app


def run(app: Any, host: str = "127.0.0.1", port: int = 8000, *, loop: str = "auto", **kwargs: Any) -> None:
    """Like ``uvicorn.run(app, host=, port=)`` behind a filter (keywords: see :func:`serve`)."""
    with asyncio.Runner(loop_factory=loop_factory(loop)) as runner:
        runner.run(serve(app, host, port, **kwargs))
