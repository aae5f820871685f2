"""waitress (a thread pool: a slowloris victim) serving a WSGI app through httpready, with curl."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from typing import Any

from acceptfilter.integrations.waitress import create_server
from acceptfilter.integrations.wsgi import environ_info

from .serverutil import Counter, close_all, curl, needs_curl, open_held, wait_held


def make_app(counter: Counter) -> Callable[..., Iterable[bytes]]:
    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        counter.add(environ["PATH_INFO"])
        info = environ_info(environ)
        body = f"hello {info['target'] if info else None} {info.reason if info else None}".encode()
        start_response("200 OK", [("Content-Length", str(len(body)))])
        return [body]

    return app


@needs_curl
def test_waitress_serves_curl_while_idle_and_slow_are_held(core: str) -> None:
    """threads=1, connection_limit=10: had the 25 held connections reached waitress, it would stop accepting."""
    counter = Counter()
    server, listener = create_server(make_app(counter), port=0, core=core, policy={"timeout": 60},
                                     threads=1, connection_limit=10)
    port = listener.getsockname()[1]
    t = threading.Thread(target=server.run, daemon=True)
    t.start()
    clients = open_held(port)
    try:
        wait_held(listener.stats)
        assert curl(port, "/waitress") == (200, "hello /waitress ready")
        assert counter.seen == ["/waitress"], "held connections reached the application"
        assert len(server._map) <= 3, "held connections reached waitress"  # listener, trigger, curl's channel
        assert listener.stats()["held"] == 25
    finally:
        close_all(clients)
        server.close()
        t.join(10)
    assert not t.is_alive()
    assert listener.closed
