"""uvicorn behind a filter: ``Server.serve(sockets=[listener])``, on asyncio or uvloop.

uvicorn hands each socket in ``sockets`` to ``loop.create_server(sock=...)``
and closes it at shutdown (``close()`` is idempotent). The listener is created
inside the loop (``driver="asyncio"``: no thread). On uvloop the loop must be
:class:`acceptfilter.integrations.uvloop.Loop`, which :func:`run` picks for
``loop="uvloop"`` (and for ``"auto"`` when uvloop is installed)::

    from acceptfilter.integrations.uvicorn import run
    run(app, "0.0.0.0", 8000, filter="httpready", timeout=10)

With ``reload_on_hup=True`` (what ``acceptfilter run -- uvicorn`` passes),
SIGHUP reloads the filters in place, as ``acceptfilter serve`` does: a fresh
listener on a duplicate of the listen socket, the held connections moved to
it undecided, uvicorn's protocol serving it, and the old listener closed once
what it had already surfaced was taken (see :class:`_Reloader`).

An ASGI 3 application reads what the filters learnt with
``acceptfilter.integrations.asgi.scope_info(scope)`` (see :mod:`.asgi`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
from collections.abc import Callable
from typing import Any

import uvicorn

from ..listener import FilteredListener, FilterSpecs, wrap
from ..workers import take_early_hangup
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
    reload_on_hup: bool = False,
    **config: Any,
) -> None:
    """Serve ``app`` with uvicorn on the running loop, behind ``filter``.

    ``sock`` (a listening socket) replaces ``host``/``port``; ``policy`` goes
    to :func:`acceptfilter.wrap`; ``config`` to ``uvicorn.Config``;
    ``started(listener, server)`` is called before serving (set
    ``server.should_exit = True`` to stop); ``reload_on_hup`` makes SIGHUP
    reload the filters, keeping every held connection.
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
    reloader = _Reloader(server, listener, filter, core, dict(policy or {}), int(config.get("backlog", 2048)))
    if reload_on_hup:
        loop.add_signal_handler(signal.SIGHUP, reloader.schedule)
        if take_early_hangup():  # a worker's SIGHUP that came before this handler (acceptfilter.workers)
            reloader.schedule()
    try:
        await server.serve(sockets=[listener])  # type: ignore[list-item]
    finally:
        if reload_on_hup:
            loop.remove_signal_handler(signal.SIGHUP)
        listener.close()
        reloader.close()


log = logging.getLogger("uvicorn.error")


class _Reloader:
    """SIGHUP for uvicorn: new filters on the same socket, no held connection and no request lost.

    uvicorn serves the listener through an asyncio ``Server`` whose accept
    callback watches the listener's ``fileno()``. A reload builds a fresh
    listener (asyncio driver) on a ``dup`` of the listen socket, serves it
    with the old server's protocol factory, then moves the held connections
    into it undecided (``detach_held``/``adopt``: the old engine stops
    accepting first, so each connection is in exactly one engine), and
    closes the old server only after asyncio has taken everything the old
    listener had already surfaced. A reload that fails before the move
    changes nothing. Everything runs on the event loop, between two
    callbacks: no lock, no thread.
    """

    def __init__(self, server: uvicorn.Server, listener: FilteredListener, filter: FilterSpecs, core: str,
                 policy: dict[str, Any], backlog: int) -> None:
        self.server, self.listener, self.filter, self.core = server, listener, filter, core
        self.policy, self.backlog = policy, backlog
        self._extra: list[FilteredListener] = []
        self._busy = False
        self._again = False
        self._task: asyncio.Task[None] | None = None

    def schedule(self) -> None:
        if self._busy:  # a SIGHUP during a reload: one more after it
            self._again = True
            return
        self._busy = True
        self._task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        try:
            while True:
                self._again = False
                try:
                    await self.reload()
                except Exception as exc:  # a plugin that no longer imports, a socket gone at shutdown
                    log.error("acceptfilter: reload failed, keeping the filters in place: %s", exc)
                if not self._again or self.server.should_exit:
                    return
        finally:
            self._busy = False

    async def reload(self) -> None:
        from ..reloading import reload_filter_modules
        from .asgi import index_peers

        # A SIGHUP while uvicorn is still starting: its server for the listener does not exist yet.
        while not self.server.started and not self.server.should_exit:
            await asyncio.sleep(0.05)
        if self.server.should_exit:
            return
        reload_filter_modules()
        old = self.listener
        old_server, factory = _serving(self.server, old)
        dup = socket.socket(fileno=os.dup(old._hub.sock.fileno()))
        try:
            fresh = wrap(dup, self.filter, core=self.core, driver="asyncio", **self.policy)
        except BaseException:
            dup.close()
            raise
        # Served before anything moves into it: a reload that fails here leaves the held connections
        # where they were, on the old listener that is still served, not on one that nothing serves.
        loop = asyncio.get_running_loop()
        try:
            index_peers(fresh)
            new_server = await loop.create_server(factory, sock=fresh, backlog=self.backlog)  # type: ignore[call-overload]
        except BaseException:
            fresh.close()
            raise
        self.server.servers.append(new_server)
        self.listener = fresh
        self._extra.append(fresh)
        moved = 0
        for fd in old.detach_held():  # the old engine no longer accepts: each connection in one engine
            try:
                fresh.adopt(fd)
                moved += 1
            except OSError:  # it closed meanwhile
                os.close(fd)
        # What the old listener had surfaced is accepted by the old server's callback; then close it.
        deadline = loop.time() + 10.0
        while old.queued and loop.time() < deadline and not self.server.should_exit:
            await asyncio.sleep(0.01)
        old_server.close()  # closes the old listener (a closed listener is not closed twice)
        log.info("acceptfilter: reloaded: filters rebuilt, %d held connection(s) moved to them", moved)

    def close(self) -> None:
        for listener in self._extra:
            listener.close()


def _serving(server: uvicorn.Server, listener: FilteredListener) -> tuple[Any, Callable[..., Any]]:
    """The server uvicorn made for ``listener``, and its protocol factory.

    asyncio's ``Server`` (``_sockets``, ``_protocol_factory``) on the selector
    loop, :class:`~acceptfilter.integrations.asyncio.FilteredServer`
    (``_listener``, ``_factory``) on the filtered uvloop.
    """
    for candidate in getattr(server, "servers", []):
        mine = getattr(candidate, "_listener", None) is listener or listener in (getattr(candidate, "_sockets", None) or ())
        factory = getattr(candidate, "_protocol_factory", None) or getattr(candidate, "_factory", None)
        if mine and factory is not None:
            return candidate, factory
    raise RuntimeError("uvicorn is not serving this listener (yet)")


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
