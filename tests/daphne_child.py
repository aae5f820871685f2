"""A Daphne server behind httpready, run as a child process (Daphne installs a global reactor).

argv: CORE. Prints the port once ready. ``GET /state`` answers the listener's
counters and the paths the application saw; ``GET /stop`` stops the reactor.
"""

from __future__ import annotations

import json
import socket
import sys
import threading
from typing import Any

from acceptfilter.integrations.asgi import scope_info
from acceptfilter.integrations.daphne import (
    FilteredServer,  # installs the asyncio reactor (asgi does not import twisted)
)

seen: list[str] = []
server: FilteredServer


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    path = scope["path"]
    info = scope_info(scope)
    if path == "/state":
        assert server.port is not None
        threads = [t.name for t in threading.enumerate()]
        body = json.dumps({"stats": server.port.listener.stats(), "seen": seen, "threads": threads}, default=str).encode()
    else:
        seen.append(path)
        body = f"hello {info['target'] if info else None} {info.reason if info else None}".encode()
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"%d" % len(body))]})
    await send({"type": "http.response.body", "body": body})
    if path == "/stop":
        from twisted.internet import reactor

        reactor.callLater(0.05, reactor.stop)


def main() -> None:
    global server
    sock = socket.create_server(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = FilteredServer(app, sock, core=sys.argv[1], policy={"timeout": 60}, signal_handlers=False,
                            ready_callable=lambda: print(port, flush=True), verbosity=0)
    server.run()


if __name__ == "__main__":
    main()
