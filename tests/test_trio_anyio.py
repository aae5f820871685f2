"""trio and anyio (both backends) serving HTTP through httpready, with curl."""

from __future__ import annotations

import shutil
import threading
from typing import Any

import anyio
import anyio.abc
import pytest
import trio

from acceptfilter.integrations import anyio as af_anyio
from acceptfilter.integrations import trio as af_trio

CURL = shutil.which("curl")
pytestmark = pytest.mark.skipif(CURL is None, reason="curl is not installed")
SLOW_HEAD = b"GET /slow HTTP/1.1\r\nHost: x\r\n"


def response(info: Any) -> bytes:
    body = f"hello {info['target']} {info['host']}".encode() if info else b"no info"
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body)


def test_trio_listener(core: str) -> None:
    seen: list[object] = []

    async def handler(stream: trio.SocketStream) -> None:
        info = af_trio.stream_info(stream)
        seen.append(info)
        head = b""
        while b"\r\n\r\n" not in head:
            head += await stream.receive_some(4096)
        await stream.send_all(response(info))
        await stream.aclose()

    async def main() -> None:
        listener = await af_trio.open_filtered_tcp_listener(0, filter="httpready", core=core, timeout=30)
        port = listener.listener.getsockname()[1]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.serve_listeners, handler, [listener])
            idle = [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(20)]
            slow = [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(5)]
            for s in slow:
                await s.send_all(SLOW_HEAD)
            await trio.sleep(0.1)
            out = await trio.run_process([CURL or "curl", "-sS", "--max-time", "5", f"http://127.0.0.1:{port}/trio"],
                                         capture_stdout=True)
            assert out.stdout.decode() == f"hello /trio 127.0.0.1:{port}"
            assert len(seen) == 1, "held connections reached the trio handler"
            assert listener.listener.stats()["held"] == 25
            for s in idle + slow:
                await s.aclose()
            await listener.aclose()
            nursery.cancel_scope.cancel()
        assert listener.listener.closed

    trio.run(main)


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_anyio_listener(core: str, backend: str) -> None:
    seen: list[object] = []

    async def handler(stream: anyio.abc.SocketStream) -> None:
        info = af_anyio.stream_info(stream)
        seen.append(info)
        head = b""
        while b"\r\n\r\n" not in head:
            head += await stream.receive()
        await stream.send(response(info))

    async def main() -> None:
        threads = threading.active_count()
        driver = "asyncio" if backend == "asyncio" else "thread"
        listener = await af_anyio.open_filtered_tcp_listener(0, filter="httpready", core=core, timeout=30, driver=driver)
        if backend == "asyncio":
            assert threading.active_count() <= threads, "the asyncio driver must not start a thread"
        port = listener.listener.getsockname()[1]
        async with anyio.create_task_group() as tg:
            tg.start_soon(listener.serve, handler)
            idle = [await anyio.connect_tcp("127.0.0.1", port) for _ in range(20)]
            slow = [await anyio.connect_tcp("127.0.0.1", port) for _ in range(5)]
            for s in slow:
                await s.send(SLOW_HEAD)
            await anyio.sleep(0.1)
            out = await anyio.run_process([CURL or "curl", "-sS", "--max-time", "5", f"http://127.0.0.1:{port}/anyio"])
            assert out.stdout.decode() == f"hello /anyio 127.0.0.1:{port}"
            assert len(seen) == 1, "held connections reached the anyio handler"
            assert listener.listener.stats()["held"] == 25
            for s in idle + slow:
                await s.aclose()
            await listener.aclose()
            tg.cancel_scope.cancel()
        assert listener.listener.closed

    anyio.run(main, backend=backend)
