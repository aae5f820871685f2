"""Twisted Web (asyncio reactor, no engine thread) serving through httpready, with curl."""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import threading
from typing import Any

import pytest
from twisted.internet.asyncioreactor import AsyncioSelectorReactor
from twisted.web import resource, server

from acceptfilter.integrations.twisted import listen, transport_info

CURL = shutil.which("curl")
pytestmark = pytest.mark.skipif(CURL is None, reason="curl is not installed")


class Hello(resource.Resource):
    isLeaf = True

    def render_GET(self, request: Any) -> bytes:
        info = transport_info(request.channel.transport)
        return f"hello {info['target'] if info else None}".encode()


class CountingSite(server.Site):
    """Counts the connections Twisted actually gets."""

    built = 0

    def buildProtocol(self, addr: Any) -> Any:
        type(self).built += 1
        return super().buildProtocol(addr)


def test_twisted_adopts_only_ready_connections(core: str) -> None:
    CountingSite.built = 0
    loop = asyncio.SelectorEventLoop()
    reactor = AsyncioSelectorReactor(loop)
    port = listen(reactor, 0, CountingSite(Hello()), filter="httpready", core=core, timeout=30)
    number = port.getHost()[1]
    assert not [t for t in threading.enumerate() if t.name.startswith("acceptfilter")], "no engine thread"
    result: dict[str, Any] = {}

    def client() -> None:
        try:
            idle = [socket.create_connection(("127.0.0.1", number)) for _ in range(20)]
            slow = [socket.create_connection(("127.0.0.1", number)) for _ in range(5)]
            for s in slow:
                s.sendall(b"GET /slow HTTP/1.1\r\nHost: x\r\n")
            out = subprocess.run(
                [CURL or "curl", "-sS", "--max-time", "5", f"http://127.0.0.1:{number}/tw"], capture_output=True, check=False
            )
            result["body"] = out.stdout
            result["built"] = CountingSite.built
            result["held"] = port.listener.stats()["held"]
            for s in idle + slow:
                s.close()
        finally:
            reactor.callFromThread(reactor.stop)

    reactor.callWhenRunning(threading.Thread(target=client).start)
    reactor.run(installSignalHandlers=False)
    port.stopListening()
    loop.close()
    assert result["body"] == b"hello /tw"
    assert result["built"] == 1, "held connections reached Twisted"
    assert result["held"] == 25
    assert port.listener.closed
