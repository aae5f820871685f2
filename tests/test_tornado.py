"""tornado's HTTPServer behind httpready (asyncio driver, no thread), on asyncio and uvloop, with curl."""

from __future__ import annotations

import asyncio
import shutil
import socket
import threading
from collections.abc import Callable

import pytest
import tornado.httpserver
import tornado.iostream
import tornado.web
import uvloop

from acceptfilter.integrations.tornado import add_socket, request_info

CURL = shutil.which("curl")
needs_curl = pytest.mark.skipif(CURL is None, reason="curl is not installed")
LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {"asyncio": asyncio.SelectorEventLoop, "uvloop": uvloop.new_event_loop}


class CountingServer(tornado.httpserver.HTTPServer):
    """Counts the connections tornado actually gets."""

    streams = 0

    def handle_stream(self, stream: tornado.iostream.IOStream, address: tuple[str, int]) -> None:
        type(self).streams += 1
        super().handle_stream(stream, address)


class Hello(tornado.web.RequestHandler):
    def get(self) -> None:
        info = request_info(self.request)
        self.write(f"hello {info['target'] if info else None} {info['host'] if info else None}")


@needs_curl
@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_tornado_add_socket(core: str, loop: str) -> None:
    async def main() -> None:
        threads = threading.active_count()
        CountingServer.streams = 0
        server = CountingServer(tornado.web.Application([(r"/.*", Hello)]))
        listener = add_socket(server, socket.create_server(("127.0.0.1", 0)), "httpready", core=core, timeout=30)
        port = listener.getsockname()[1]
        idle = [await asyncio.open_connection("127.0.0.1", port) for _ in range(20)]
        slow = [await asyncio.open_connection("127.0.0.1", port) for _ in range(5)]
        for _, w in slow:
            w.write(b"GET / HTTP/1.1\r\nHost: x\r\n")
        await asyncio.sleep(0.1)
        assert threading.active_count() <= threads, "no extra thread"
        proc = await asyncio.create_subprocess_exec(
            CURL or "curl", "-sS", "--max-time", "5", f"http://127.0.0.1:{port}/tornado", stdout=asyncio.subprocess.PIPE
        )
        out, _ = await proc.communicate()
        assert out.decode() == f"hello /tornado 127.0.0.1:{port}"
        assert CountingServer.streams == 1, "held connections reached tornado"
        assert listener.stats()["held"] == 25
        assert not [t for t in threading.enumerate() if t.name.startswith("acceptfilter")]  # curl's child watcher may run
        for _, w in idle + slow:
            w.close()
        server.stop()
        assert listener.closed

    with asyncio.Runner(loop_factory=LOOPS[loop]) as runner:
        runner.run(main())
