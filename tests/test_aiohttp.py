"""aiohttp's web server (run_app, and AppRunner + SockSite) serving through httpready, with curl."""

from __future__ import annotations

import asyncio
import socket
import threading

from aiohttp import web
from aiohttp.web_runner import GracefulExit

from acceptfilter import FilteredListener
from acceptfilter.integrations.aiohttp import FilteredSockSite, request_info, run_app

from .conftest import wait_for
from .serverutil import CURL, IDLE, SLOW, Counter, await_held, close_all, curl, needs_curl, open_held, wait_held


def make_app(counter: Counter) -> web.Application:
    async def hello(request: web.Request) -> web.Response:
        counter.add(request.path)
        info = request_info(request)
        return web.Response(text=f"hello {info['target'] if info else None} {info.reason if info else None}")

    app = web.Application()
    app.router.add_get("/{tail:.*}", hello)
    return app


@needs_curl
def test_app_runner_with_filtered_sock_site(core: str) -> None:
    counter = Counter()

    async def main() -> None:
        threads = threading.active_count()
        runner = web.AppRunner(make_app(counter), handle_signals=False)
        await runner.setup()
        site = FilteredSockSite(runner, socket.create_server(("127.0.0.1", 0)), core=core, policy={"timeout": 60})
        await site.start()
        assert site.listener is not None
        port = site.listener.getsockname()[1]
        clients = await asyncio.to_thread(open_held, port)
        await await_held(site.listener.stats)  # the engine runs on this loop: let it
        assert threading.active_count() <= threads + 1, "no engine thread"  # + the to_thread worker
        assert not [t for t in threading.enumerate() if t.name.startswith("acceptfilter")]
        proc = await asyncio.create_subprocess_exec(
            CURL or "curl", "-sS", "--max-time", "20", f"http://127.0.0.1:{port}/aio", stdout=asyncio.subprocess.PIPE
        )
        out, _ = await proc.communicate()
        assert out.decode() == "hello /aio ready"
        assert counter.seen == ["/aio"]
        assert runner.server is not None and len(runner.server.connections) <= 1, "held connections reached aiohttp"
        assert site.listener.stats()["held"] == IDLE + SLOW
        close_all(clients)
        await runner.cleanup()
        assert site.listener.closed

    with asyncio.Runner(loop_factory=asyncio.SelectorEventLoop) as r:
        r.run(main())


@needs_curl
def test_run_app(core: str) -> None:
    counter = Counter()
    app = make_app(counter)
    loop = asyncio.SelectorEventLoop()
    started = threading.Event()

    async def on_startup(app: web.Application) -> None:
        started.set()

    app.on_startup.append(on_startup)
    sock = socket.create_server(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    got: list[FilteredListener] = []

    def serve() -> None:
        try:
            run_app(app, sock=sock, core=core, policy={"timeout": 60}, loop=loop, started=got.append,
                    handle_signals=False, print=None)
        except GracefulExit:
            pass

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        wait_for(started.is_set, 30)
        listener = got[0]
        clients = open_held(port)
        wait_held(listener.stats)
        assert curl(port, "/run_app") == (200, "hello /run_app ready")
        assert counter.seen == ["/run_app"]
        stats = listener.stats()
        assert stats["held"] == IDLE + SLOW and stats["surfaced"] == 1, "held connections reached aiohttp"
        close_all(clients)
    finally:
        def stop() -> None:
            raise GracefulExit

        loop.call_soon_threadsafe(stop)
        t.join(30)
    assert not t.is_alive()
    assert got[0].closed
