"""gunicorn with the uvicorn worker (the ``uvicorn-worker`` package) behind a filter.

gunicorn's arbiter binds and forks as usual; each worker wraps its copy of
the listen socket in its own engine, on the worker's event loop (no thread),
and serves it with uvicorn: one engine per worker on the shared socket, the
model of :mod:`acceptfilter.workers` (why: the README's "Several worker
processes"). Name this class instead of ``uvicorn_worker.UvicornWorker``::

    ACCEPTFILTER_FILTER=httpready gunicorn -k acceptfilter.integrations.uvicorn_worker.UvicornWorker -w 4 app:app
    acceptfilter run --filter httpready -- gunicorn -k uvicorn_worker.UvicornWorker -w 4 app:app   # the same

Settings come from the ``ACCEPTFILTER_*`` environment variables, as for the
sync and gthread workers (``ACCEPTFILTER_DEFER_ACCEPT`` included). The loop
is uvicorn's ``auto`` choice: uvloop runs as
:class:`acceptfilter.integrations.uvloop.Loop`. The application reads what
the filters learnt with :func:`acceptfilter.integrations.asgi.scope_info`.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from typing import Any

from gunicorn.arbiter import Arbiter
from uvicorn.server import Server
from uvicorn_worker import UvicornWorker as _UvicornWorker

from ..errors import AcceptFilterError
from ..listener import FilteredListener, wrap
from .asgi import ConnectionInfoMiddleware, index_peers, is_asgi3
from .uvicorn import loop_factory

__all__ = ["UvicornH11Worker", "UvicornWorker"]


class UvicornWorker(_UvicornWorker):  # type: ignore[misc]
    """``uvicorn_worker.UvicornWorker`` whose sockets are filtered, one engine per worker."""

    def _listeners(self) -> list[FilteredListener]:
        from .gunicorn import settings

        try:
            config = settings()
        except AcceptFilterError as exc:
            self.log.error("acceptfilter: %s", exc)
            sys.exit(Arbiter.WORKER_BOOT_ERROR)
        policy: dict[str, Any] = {k: v for k, v in (("timeout", config.timeout), ("on_timeout", config.on_timeout),
                                    ("max_held", config.max_held), ("idle_timeout", config.idle_timeout))
                                  if v is not None}
        listeners = []
        for sock in self.sockets:
            raw = getattr(sock, "sock", sock)  # gunicorn's TCPSocket wraps the socket
            listener = wrap(raw, list(config.filters), core=config.core, driver="asyncio",
                            defer_accept=config.defer_accept or None, **policy)
            index_peers(listener)
            listeners.append(listener)
        return listeners

    async def _serve(self) -> None:
        app = self.wsgi
        self.config.app = ConnectionInfoMiddleware(app) if is_asgi3(app) else app
        listeners = self._listeners()
        server = Server(config=self.config)

        def quick_exit() -> None:
            # gunicorn's quick shutdown (SIGINT, SIGQUIT to the arbiter) sends workers SIGQUIT;
            # uvicorn_worker's own handler only marks the gunicorn worker, which the uvicorn server
            # never looks at, so the arbiter waited graceful_timeout and then SIGKILLed every worker.
            server.should_exit = server.force_exit = True

        asyncio.get_running_loop().add_signal_handler(signal.SIGQUIT, quick_exit)
        try:
            await server.serve(sockets=listeners)  # type: ignore[arg-type]
        finally:
            for listener in listeners:
                listener.close()
        if not server.started:
            sys.exit(Arbiter.WORKER_BOOT_ERROR)

    def run(self) -> None:
        with asyncio.Runner(loop_factory=loop_factory(str(self.config.loop))) as runner:
            runner.run(self._serve())


class UvicornH11Worker(UvicornWorker):
    """The pure-Python HTTP parser on the asyncio loop, like ``uvicorn_worker.UvicornH11Worker``."""

    CONFIG_KWARGS: dict[str, Any] = {"loop": "asyncio", "http": "h11"}  # noqa: RUF012
