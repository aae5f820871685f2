"""The two I/O cores, side by side: same scripted clients, same outcomes.

Hypothesis writes scripts for a handful of real loopback clients (connect,
send chunks, half-close, reset, close, stay silent); each script runs once
against the C core and once against the pure-Python reference, with the same
filters and policy. Deadlines run on an injected clock, and the engine is
stepped until quiet after every client action, so nothing depends on timing.
Per-connection outcomes (route, reason, consumed, info) and the final
counters must be identical.
"""

from __future__ import annotations

import socket
import struct
import time
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import acceptfilter
from acceptfilter.engine import unaccounted
from acceptfilter.listener import FilteredListener

HEAD = b"GET /x HTTP/1.1\r\nHost: h\r\n\r\n"
DNS_QUERY = bytes.fromhex("001d" "abcd01000001000000000000" "076578616d706c6503636f6d0000010001")
CHUNKS = [b"GET /x HTTP/1.1\r\n", b"Host: h\r\n", b"\r\n", HEAD, b"x", b"\x00\x01", DNS_QUERY[:5], DNS_QUERY[5:],
          b"PROXY TCP4 192.0.2.1 10.0.0.1 1111 80\r\n", b"SSH-2.0-OpenSSH_9.2p1 Debian-2\r\n"]

CONFIGS: dict[str, dict[str, Any]] = {
    "httpready": {"filter": "httpready", "on_timeout": "surface"},
    "dataready-close": {"filter": "dataready:min_bytes=3", "on_timeout": "close"},
    "proxy-chain": {"filter": ["proxy:trusted=127.0.0.0/8", "httpready"], "on_timeout": "reset"},
    "routes": {"routes": {"http": "httpready", "dns": "dnsready"}, "default": "other"},
}

action = st.one_of(
    st.tuples(st.just("send"), st.sampled_from(CHUNKS)),
    st.sampled_from([("shut", b""), ("rst", b""), ("close", b""), ("idle", b"")]),
)
script = st.lists(action, min_size=0, max_size=4)


def _settle(engine: Any) -> None:
    deadline = time.monotonic() + 10
    while not (engine.step(0) == 0 and engine.step(0.005) == 0):
        assert time.monotonic() < deadline, "the engine did not settle"


def _run(core: str, config: dict[str, Any], max_held: int, scripts: list[list[tuple[str, bytes]]]) -> Any:
    lsock = socket.create_server(("127.0.0.1", 0), backlog=64)
    port = lsock.getsockname()[1]
    listeners: dict[str, FilteredListener]
    if "routes" in config:
        router = acceptfilter.listener.route(lsock, config["routes"], default=config["default"], timeout=5,
                                             max_held=max_held, core=core, driver="none")
        listeners = dict(router)
    else:
        listeners = {"default": acceptfilter.wrap(lsock, config["filter"], timeout=5, on_timeout=config["on_timeout"],
                                                  max_held=max_held, core=core, driver="none")}
    engine = next(iter(listeners.values())).engine
    engine.set_clock(1000.0)
    clients: list[socket.socket | None] = []
    index: dict[int, int] = {}
    try:
        for step in range(1 + max(map(len, scripts))):
            for n, actions in enumerate(scripts):
                if step == 0:
                    client = socket.create_connection(("127.0.0.1", port), timeout=10)
                    index[client.getsockname()[1]] = n
                    clients.append(client)
                elif step - 1 < len(actions):
                    _act(clients, n, actions[step - 1])
                _settle(engine)
        engine.set_clock(1000.0 + 60)  # every deadline has passed
        _settle(engine)
        outcomes: dict[int, tuple[Any, ...]] = {}
        for name, listener in listeners.items():
            while listener.queued:
                conn, _, info = listener.accept_with_info()
                # The TCP peer (an ephemeral port) differs between the two runs: compare the rest.
                learnt = sorted(repr(item) for item in info.items() if item[1] != info.peer)
                outcomes[index[info.peer[1]]] = (name, info.reason, info.consumed, learnt)
                conn.close()
        stats = engine.stats()
    finally:
        for lst in listeners.values():
            lst.close()
        for client in clients:
            if client is not None:
                client.close()
    assert unaccounted(stats) == 0
    keys = ("accepted", "held", "surfaced", "rejected", "closed_empty", "aborted", "failed", "dropped", "detached",
            "timed_out", "evicted", "filter_errors", "surfaced_by_reason", "surfaced_by_route")
    return outcomes, {k: stats[k] for k in keys}


def _act(clients: list[socket.socket | None], n: int, act: tuple[str, bytes]) -> None:
    client = clients[n]
    if client is None:
        return
    kind, data = act
    try:
        if kind == "send":
            client.sendall(data)
        elif kind == "shut":
            client.shutdown(socket.SHUT_WR)
        elif kind in ("rst", "close"):
            if kind == "rst":
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            client.close()
            clients[n] = None
    except OSError:  # sending after a half-close, or into a reset connection: the same on both cores
        pass


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(config=st.sampled_from(sorted(CONFIGS)), max_held=st.sampled_from([2, 3, 100]),
       scripts=st.lists(script, min_size=1, max_size=5))
def test_both_cores_agree(config: str, max_held: int, scripts: list[list[tuple[str, bytes]]]) -> None:
    c = _run("c", CONFIGS[config], max_held, scripts)
    python = _run("python", CONFIGS[config], max_held, scripts)
    assert c == python
