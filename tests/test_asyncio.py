"""asyncio and uvloop behind httpready, driven by the event loop itself (no extra thread)."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Callable

import pytest
import uvloop

import acceptfilter
from acceptfilter.integrations import asyncio as af_asyncio

REQUEST = b"GET /hello HTTP/1.1\r\nHost: example.test\r\nConnection: close\r\n\r\n"

LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.SelectorEventLoop,
    "uvloop": uvloop.new_event_loop,
}


def run(loop_name: str, coro_fn: Callable[[], object]) -> None:
    with asyncio.Runner(loop_factory=LOOPS[loop_name]) as runner:
        runner.run(coro_fn())  # type: ignore[arg-type]


async def open_idle(port: int, n: int, data: bytes = b"") -> list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    """Clients that connect (and maybe send a partial head) and then say nothing."""
    out = []
    for _ in range(n):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        if data:
            writer.write(data)
        out.append((reader, writer))
    return out


async def get(port: int) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(REQUEST)
    body = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    return body


@pytest.mark.parametrize("loop_name", ["asyncio", "uvloop"])
def test_start_server_holds_idle_and_slow_and_exposes_info(core: str, loop_name: str) -> None:
    seen: list[object] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        info = writer.get_extra_info("acceptfilter")
        seen.append(info)
        await reader.readuntil(b"\r\n\r\n")  # every byte is still there for the application
        body = f"{info['method']} {info['target']} {info['host']}".encode()
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body))
        await writer.drain()
        writer.close()

    async def main() -> None:
        threads = threading.active_count()
        listener = acceptfilter.wrap(socket.create_server(("127.0.0.1", 0)), "httpready", timeout=30, core=core, driver="asyncio")
        server = await af_asyncio.start_server(handle, sock=listener)
        assert threading.active_count() <= threads, "the asyncio driver must not start a thread"
        port = listener.getsockname()[1]
        idle = await open_idle(port, 20)
        slow = await open_idle(port, 5, b"GET / HTTP/1.1\r\nHost: x\r\n")  # a head that never completes
        await asyncio.sleep(0.05)
        body = await get(port)
        assert body.endswith(b"GET /hello example.test"), body
        assert len(seen) == 1, "idle and slow connections reached the application"
        assert isinstance(seen[0], acceptfilter.ConnectionInfo)
        stats = listener.stats()
        assert stats["held"] == 25
        assert threading.active_count() <= threads
        for _, w in idle + slow:
            w.close()
        server.close()
        await server.wait_closed()
        assert listener.closed

    run(loop_name, main)


@pytest.mark.parametrize("loop_name", ["asyncio", "uvloop"])
def test_start_server_binds_host_port(loop_name: str) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        info = writer.get_extra_info("acceptfilter")
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + info["target"].encode())
        await writer.drain()
        writer.close()

    async def main() -> None:
        threads = threading.active_count()
        server = await af_asyncio.start_server(handle, "127.0.0.1", 0, filter="httpready", timeout=30)
        assert threading.active_count() <= threads
        port = server.sockets[0].getsockname()[1]
        assert (await get(port)).endswith(b"/hello")
        server.close()
        await server.wait_closed()

    run(loop_name, main)


@pytest.mark.parametrize("loop_name", ["asyncio", "uvloop"])
def test_create_server_with_protocol_and_deadline_timer(core: str, loop_name: str) -> None:
    """The call_at timer surfaces an idle connection at its idle limit (on_timeout=surface) without any I/O."""
    made: list[asyncio.BaseTransport] = []

    class Proto(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            made.append(transport)

    async def main() -> None:
        threads = threading.active_count()
        sock = socket.create_server(("127.0.0.1", 0))
        listener = acceptfilter.wrap(sock, "httpready", idle_timeout=0.3, on_timeout="surface", core=core,
                                     driver="asyncio")
        server = await af_asyncio.create_server(Proto, listener)
        port = listener.getsockname()[1]
        _, w = await asyncio.open_connection("127.0.0.1", port)
        await asyncio.sleep(0.1)
        assert made == []
        for _ in range(100):
            if made:
                break
            await asyncio.sleep(0.02)
        assert len(made) == 1, "the deadline timer did not fire"
        assert listener.stats()["timed_out"] == 1
        assert threading.active_count() <= threads
        w.close()
        made[0].close()
        server.close()
        await server.wait_closed()
        assert listener.closed

    run(loop_name, main)


def test_plain_asyncio_start_server_on_a_listener(core: str) -> None:
    """asyncio.start_server(sock=listener) works unchanged on the selector loop."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
        await writer.drain()
        writer.close()

    async def main() -> None:
        threads = threading.active_count()
        listener = acceptfilter.wrap(socket.create_server(("127.0.0.1", 0)), "httpready", core=core, driver="asyncio")
        server = await asyncio.start_server(handle, sock=listener)  # type: ignore[arg-type]
        body = await get(listener.getsockname()[1])
        assert body.endswith(b"ok")
        assert threading.active_count() <= threads
        server.close()
        await server.wait_closed()
        assert listener.closed

    run("asyncio", main)


def test_close_detaches_the_reader() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        listener = acceptfilter.wrap(socket.create_server(("127.0.0.1", 0)), "httpready", driver="none")
        driver = af_asyncio.attach(listener)
        fd = listener.engine.fileno()
        assert loop.remove_reader(fd) is True  # attached ...
        loop.add_reader(fd, driver._run)
        listener.close()
        assert loop.remove_reader(fd) is False  # ... and detached by close()

    run("asyncio", main)


def test_driver_asyncio_needs_a_running_loop() -> None:
    sock = socket.create_server(("127.0.0.1", 0))
    with pytest.raises(RuntimeError):
        acceptfilter.wrap(sock, "httpready", driver="asyncio")
    sock.close()
