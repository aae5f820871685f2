"""Sanic (its low-level create_server, on asyncio and uvloop) serving through httpready, with curl."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Callable
from typing import Any

import pytest
import uvloop
from sanic import Sanic, response

from acceptfilter.integrations.sanic import request_info, serve
from acceptfilter.integrations.uvloop import new_event_loop

from .serverutil import CURL, IDLE, SLOW, Counter, await_held, close_all, needs_curl, open_held

LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {"asyncio": asyncio.SelectorEventLoop, "uvloop": new_event_loop}


def make_app(name: str, counter: Counter) -> Any:
    Sanic.test_mode = True
    app = Sanic(name)

    @app.get("/<path:path>")
    async def hello(request: Any, path: str) -> Any:
        counter.add(request.path)
        info = request_info(request)
        return response.text(f"hello {info['target'] if info else None} {info.reason if info else None}")

    return app


@needs_curl
@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_sanic_serves_curl_while_idle_and_slow_are_held(core: str, loop: str) -> None:
    counter = Counter()
    app = make_app(f"af_{core}_{loop}", counter)
    got: dict[str, Any] = {}

    async def main() -> None:
        threads = threading.active_count()
        sock = socket.create_server(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        ready = asyncio.Event()

        def started(listener: Any, server: Any) -> None:
            got["listener"], got["server"] = listener, server
            ready.set()

        task = asyncio.create_task(serve(app, sock=sock, core=core, policy={"timeout": 60}, started=started))
        await asyncio.wait_for(ready.wait(), 30)
        listener = got["listener"]
        clients = await asyncio.to_thread(open_held, port)
        await await_held(listener.stats)  # the engine runs on this loop
        assert not [t for t in threading.enumerate() if t.name.startswith("acceptfilter")], "no engine thread"
        assert threading.active_count() <= threads + 1  # + the to_thread worker
        proc = await asyncio.create_subprocess_exec(
            CURL or "curl", "-sS", "--max-time", "20", f"http://127.0.0.1:{port}/sanic", stdout=asyncio.subprocess.PIPE
        )
        out, _ = await proc.communicate()
        assert out.decode() == "hello /sanic ready"
        assert counter.seen == ["/sanic"]
        stats = listener.stats()
        assert stats["held"] == IDLE + SLOW and stats["surfaced"] == 1, "held connections reached Sanic"
        close_all(clients)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, 30)
        assert listener.closed

    with asyncio.Runner(loop_factory=LOOPS[loop]) as runner:
        runner.run(main())


def test_plain_uvloop_is_refused() -> None:
    async def main() -> None:
        with pytest.raises(RuntimeError, match="acceptfilter.integrations.uvloop.Loop"):
            await serve(make_app("af_refused", Counter()), port=0)

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main())
