"""Hypercorn's asyncio worker (asyncio and uvloop) serving an ASGI app through httpready."""

from __future__ import annotations

import asyncio
import shutil
import socket
import threading
from collections.abc import Callable
from typing import Any

import pytest
from hypercorn.config import Config

import acceptfilter
from acceptfilter.integrations import hypercorn as af_hypercorn
from acceptfilter.integrations.uvloop import new_event_loop as filtered_uvloop

CURL = shutil.which("curl")
pytestmark = pytest.mark.skipif(CURL is None, reason="curl is not installed")
LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {"asyncio": asyncio.SelectorEventLoop, "uvloop": filtered_uvloop}


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_hypercorn_serves_through_httpready(core: str, loop: str) -> None:
    """keep_alive_timeout=0.2: connections Hypercorn saw would be closed by now; held ones stay open."""
    requests: list[str] = []
    got: dict[str, acceptfilter.FilteredListener] = {}

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        requests.append(scope["path"])
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"5")]})
        await send({"type": "http.response.body", "body": b"hyper"})

    async def main() -> None:
        threads = threading.active_count()
        config = Config()
        config.keep_alive_timeout = 0.2
        config.accesslog = None
        stop = asyncio.Event()
        sock = socket.create_server(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        task = asyncio.create_task(
            af_hypercorn.serve(app, config, sock=sock, core=core, timeout=30, shutdown_trigger=stop.wait,
                               started=lambda listener: got.setdefault("listener", listener))
        )
        await asyncio.sleep(0.1)
        idle = [await asyncio.open_connection("127.0.0.1", port) for _ in range(10)]
        slow = [await asyncio.open_connection("127.0.0.1", port) for _ in range(3)]
        for _, w in slow:
            w.write(b"GET /slow HTTP/1.1\r\nHost: x\r\n")
        await asyncio.sleep(0.6)
        assert threading.active_count() <= threads, "no extra thread"
        for reader, _ in idle + slow:
            with pytest.raises(TimeoutError):  # still open: Hypercorn never saw it
                await asyncio.wait_for(reader.read(1), 0.01)
        proc = await asyncio.create_subprocess_exec(
            CURL or "curl", "-sS", "--max-time", "5", f"http://127.0.0.1:{port}/hc", stdout=asyncio.subprocess.PIPE
        )
        out, _ = await proc.communicate()
        assert out == b"hyper"
        assert requests == ["/hc"]
        assert got["listener"].stats()["held"] == 13
        for _, w in idle + slow:
            w.close()
        stop.set()
        await asyncio.wait_for(task, 10)
        assert got["listener"].closed

    with asyncio.Runner(loop_factory=LOOPS[loop]) as runner:
        runner.run(main())
