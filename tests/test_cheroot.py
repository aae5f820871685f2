"""cheroot (CherryPy's WSGI server, a thread pool) serving through httpready, with curl."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from typing import Any, ClassVar

import cheroot.wsgi

from acceptfilter.integrations.cheroot import FilterMixIn
from acceptfilter.integrations.wsgi import environ_info

from .conftest import wait_for
from .serverutil import Counter, close_all, curl, needs_curl, open_held, wait_held


@needs_curl
def test_cheroot_serves_curl_while_idle_and_slow_are_held(core: str) -> None:
    """numthreads=2: had the 25 held connections reached cheroot, both workers would sit on idle ones."""
    counter = Counter()

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        counter.add(environ["PATH_INFO"])
        info = environ_info(environ)
        body = f"hello {info['target'] if info else None} {info['host'] if info else None}".encode()
        start_response("200 OK", [("Content-Length", str(len(body)))])
        return [body]

    class Server(FilterMixIn, cheroot.wsgi.Server):  # type: ignore[misc]
        accept_filter = "httpready"
        accept_filter_options: ClassVar[dict[str, Any]] = {"timeout": 60, "core": core}

    server = Server(("127.0.0.1", 0), app, numthreads=2, timeout=60)
    server.prepare()
    t = threading.Thread(target=server.serve, daemon=True)
    t.start()
    listener = server.listener
    assert listener is not None
    port = listener.getsockname()[1]
    clients = open_held(port)
    try:
        wait_held(listener.stats)
        assert curl(port, "/cheroot") == (200, f"hello /cheroot 127.0.0.1:{port}")
        assert counter.seen == ["/cheroot"], "held connections reached the application"
        assert listener.stats()["held"] == 25 and listener.stats()["surfaced"] == 1
    finally:
        close_all(clients)
        server.stop()
        t.join(10)
    assert not t.is_alive()
    wait_for(lambda: listener.closed)
