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


@needs_curl
@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_uvicorn_serves_through_httpready_while_idle_are_held(core: str, loop: str) -> None:
    """limit_concurrency=5: had the 25 held connections reached uvicorn, curl would get a 503."""
    app = App()
    got: dict[str, Any] = {}

    def started(listener: acceptfilter.FilteredListener, server: uvicorn.Server) -> None:
        got["listener"], got["server"] = listener, server

    async def main() -> None:
        threads = threading.active_count()
        sock = socket.create_server(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        task = asyncio.create_task(
            af_uvicorn.serve(app, sock=sock, core=core, policy={"timeout": 30}, started=started, limit_concurrency=5,
                             log_level="warning", lifespan="off")
        )
        while "server" not in got or not got["server"].started:
            await asyncio.sleep(0.01)
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
