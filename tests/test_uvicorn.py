"""uvicorn (asyncio and uvloop) serving an ASGI app through httpready, with curl."""

from __future__ import annotations

import asyncio
import shutil
import socket
import threading
from typing import Any

import pytest
import uvicorn

import acceptfilter
from acceptfilter.integrations import uvicorn as af_uvicorn

CURL = shutil.which("curl")
needs_curl = pytest.mark.skipif(CURL is None, reason="curl is not installed")


class App:
    """Counts the HTTP requests the application sees."""

    def __init__(self) -> None:
        self.requests: list[str] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        self.requests.append(scope["path"])
        body = f"hello {scope['path']}".encode()
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"%d" % len(body))]})
        await send({"type": "http.response.body", "body": body})


async def curl(port: int) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        CURL or "curl", "-sS", "--max-time", "5", "-w", " %{http_code}", f"http://127.0.0.1:{port}/ready",
        stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await proc.communicate()
    body, _, code = out.decode().rpartition(" ")
    return int(code), body


async def start_uvicorn(app: Any, **kwargs: Any) -> tuple[asyncio.Task[None], acceptfilter.FilteredListener,
                                                         uvicorn.Server, int]:
    """``af_uvicorn.serve(app, ...)`` on a fresh loopback socket, once uvicorn has started: (task, listener, server, port)."""
    got: dict[str, Any] = {}

    def started(listener: acceptfilter.FilteredListener, server: uvicorn.Server) -> None:
        got["listener"], got["server"] = listener, server

    sock = socket.create_server(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    task = asyncio.create_task(af_uvicorn.serve(app, sock=sock, started=started, log_level="warning", lifespan="off",
                                                **kwargs))
    while "server" not in got or not got["server"].started:
        assert not task.done(), task
        await asyncio.sleep(0.01)
    return task, got["listener"], got["server"], port


@needs_curl
@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_uvicorn_serves_through_httpready_while_idle_are_held(core: str, loop: str) -> None:
    """limit_concurrency=5: had the 25 held connections reached uvicorn, curl would get a 503."""
    app = App()
    got: dict[str, Any] = {}

    async def main() -> None:
        threads = threading.active_count()
        task, got["listener"], got["server"], port = await start_uvicorn(app, core=core, policy={"timeout": 30},
                                                                         limit_concurrency=5)
        idle = [await asyncio.open_connection("127.0.0.1", port) for _ in range(20)]
        slow = [await asyncio.open_connection("127.0.0.1", port) for _ in range(5)]
        for _, w in slow:
            w.write(b"GET /slow HTTP/1.1\r\nHost: x\r\n")
        await asyncio.sleep(0.1)
        assert threading.active_count() <= threads, "no extra thread"
        code, body = await curl(port)
        assert (code, body) == (200, "hello /ready")
        assert app.requests == ["/ready"]
        assert len(got["server"].server_state.connections) <= 1, "held connections reached uvicorn"
        stats = got["listener"].stats()
        assert stats["held"] == 25 and stats["surfaced"] == 1
        assert not [t for t in threading.enumerate() if t.name.startswith("acceptfilter")]  # curl's child watcher may run
        for _, w in idle + slow:
            w.close()
        got["server"].should_exit = True
        await asyncio.wait_for(task, 10)
        assert got["listener"].closed

    with asyncio.Runner(loop_factory=af_uvicorn.loop_factory(loop)) as runner:
        runner.run(main())


def test_plain_uvloop_is_refused_with_a_clear_error() -> None:
    import uvloop

    async def main() -> None:
        with pytest.raises(RuntimeError, match="acceptfilter.integrations.uvloop.Loop"):
            await af_uvicorn.serve(App(), port=0)

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main())


def test_a_reload_that_cannot_serve_its_new_listener_keeps_every_held_connection_served() -> None:
    """SIGHUP whose new listener cannot be served (``create_server`` fails, say at EMFILE): nothing moves.

    Before: the held connections were moved into the new listener first, and the failure left them on a
    listener nothing served: their requests waited forever. The failure is injected into the loop's
    ``create_server`` only for the reload (uvicorn has started by then); everything else is real.
    """
    import logging
    import os
    import signal

    app = App()
    got: dict[str, Any] = {}
    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    async def main() -> None:
        loop = asyncio.get_running_loop()
        task, got["listener"], got["server"], port = await start_uvicorn(app, core="c", policy={"timeout": 30},
                                                                         reload_on_hup=True)
        logging.getLogger("uvicorn.error").addHandler(handler)  # after uvicorn's dictConfig, which drops handlers
        idle = [await asyncio.open_connection("127.0.0.1", port) for _ in range(5)]
        deadline = loop.time() + 30
        while got["listener"].stats()["held"] < 5:
            assert loop.time() < deadline, got["listener"].stats()
            await asyncio.sleep(0.01)

        async def refuse(*args: Any, **kwargs: Any) -> Any:
            raise OSError(24, "Too many open files")

        loop.create_server = refuse  # type: ignore[method-assign]
        os.kill(os.getpid(), signal.SIGHUP)
        while not any("reload failed" in r for r in records):
            assert loop.time() < deadline, records
            await asyncio.sleep(0.01)
        del loop.create_server  # the class's own again
        assert got["listener"].stats()["held"] == 5, "the held connections stay with the served listener"
        for i, (reader, writer) in enumerate(idle):
            writer.write(f"GET /kept{i} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
            reply = await asyncio.wait_for(reader.read(), 10)
            assert reply.startswith(b"HTTP/1.1 200") and reply.endswith(f"hello /kept{i}".encode()), reply
            writer.close()
        got["server"].should_exit = True
        await asyncio.wait_for(task, 10)

    handler = Keep()
    try:
        with asyncio.Runner(loop_factory=af_uvicorn.loop_factory("asyncio")) as runner:
            runner.run(main())
    finally:
        logging.getLogger("uvicorn.error").removeHandler(handler)
