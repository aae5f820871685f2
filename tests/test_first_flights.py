"""Every built-in filter against the first flights of real clients, standalone and behind routing.

Issue 14, item 3: Debian's OpenSSH identification line and an SMTP ``EHLO``
were taken for HTTP/0.9 requests, so ``--default ssh`` routing failed for a
real ``ssh``. The corpus (:mod:`acceptfilter.testing.corpus`) is what one
port in front of many services sees; the table below is what each filter
must say about each flight, however TCP splits it; the routing test sends
every flight over loopback to one listener with a route per protocol; the
last tests put a real sshd and a real SMTP server (exim) behind ``serve``'s
routing and drive them with the real ``ssh`` client and smtplib.
"""

from __future__ import annotations

import re
import smtplib
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path

import pytest

from acceptfilter import Verdict, load_filter
from acceptfilter.listener import Router, route
from acceptfilter.testing.corpus import FIRST_FLIGHTS, FirstFlight

from .conftest import wait_for
from .peers import SSH_OPTS, Exim, Sshd, exim, sshd  # noqa: F401  (fixtures)

FILTERS = ("dataready", "httpready", "tlsready", "dnsready", "proxy:trusted=127.0.0.0/8", "sshready", "silent")
PEER = ("127.0.0.1", 40000)

# One letter per filter of FILTERS for the whole flight with final=False:
# A accept, P accept as a pass-through (foreign bytes; no match behind a router),
# R reject, W wait (silence, or a prefix of something longer).
EXPECTED = {
    "ssh-debian": "ARPRRAR",
    "ssh-plain": "ARPRRAR",
    "ssh-putty": "ARPRRAR",
    "smtp-ehlo": "ARPRRRR",
    "smtp-helo": "ARPRRRR",
    "imap-capability": "ARPRRRR",
    "imap-login": "ARPRRRR",
    "pop3-capa": "ARPRRRR",
    "pop3-user": "ARPRRRR",
    "redis-inline": "ARPRRRR",
    "redis-inline-get": "ARPRRRR",
    "redis-array": "ARPRRRR",
    "memcached-text": "ARPRRRR",
    "memcached-binary": "ARPRRRR",
    "postgres-sslrequest": "ARPRRRR",
    "postgres-startup": "ARPRRRR",
    "mysql": "WWWWWWW",
    "mqtt-connect": "ARPRRRR",
    "socks4": "ARPWRRR",  # dnsready: 0x0401 bytes announced, 14 here: waits (and rejects at the end)
    "socks5": "ARPWRRR",
    "rdp": "ARPWRRR",
    "tls12-hello": "ARARRRR",
    "tls13-hello": "ARARRRR",
    "http11-get": "AAPRRRR",
    "http10-head": "AAPRRRR",
    "http09-get": "AAPRRRR",
    "websocket-upgrade": "AAPRRRR",
    "h2-preface": "AAPRRRR",
    "grpc-h2c": "AAPRRRR",
    "proxy-v1": "ARPRARR",
    "proxy-v2": "ARPRARR",
    "dns-query": "ARPARRR",
    "garbage-nul": "ARPWRRR",
}


def _letter(spec: str, data: bytes, step: int) -> str:
    """The verdict letter after feeding ``data`` to one session in ``step``-byte arrivals."""
    flt = load_filter(spec)
    session = flt.peer_session(PEER) if flt.needs_peer else flt.session()
    decision = session.check(b"", False)
    for end in range(step, len(data) + step, step):
        decision = session.check(data[: min(end, len(data))], False)
        if decision.decided:
            break  # the engine stops asking once a filter has decided
    if decision.passed:
        return "P"
    return {Verdict.ACCEPT: "A", Verdict.REJECT: "R", Verdict.WAIT: "W"}[decision.verdict]


def test_the_table_covers_the_whole_corpus() -> None:
    assert set(EXPECTED) == set(FIRST_FLIGHTS)
    wanted = {"ssh", "smtp", "imap", "pop3", "redis", "memcached", "postgres", "mysql", "mqtt", "socks", "rdp", "tls",
              "http", "proxy", "dns"}
    assert wanted <= {f.protocol for f in FIRST_FLIGHTS.values()}


@pytest.mark.parametrize("name", list(FIRST_FLIGHTS))
def test_every_builtin_filter_on_every_first_flight(name: str) -> None:
    flight = FIRST_FLIGHTS[name]
    for step in (len(flight.data) or 1, 1, 7):  # whole, byte by byte, odd segments: same verdict
        got = "".join(_letter(spec, flight.data, step) for spec in FILTERS)
        assert got == EXPECTED[name], f"{name} in {step}-byte arrivals: {got} (filters {FILTERS})"
    # final=True (EOF, deadline): every filter decides; silence and partial messages are rejected
    # (but by `silent`, which matches exactly the client that said nothing).
    for spec, letter in zip(FILTERS, EXPECTED[name], strict=True):
        flt = load_filter(spec)
        session = flt.peer_session(PEER) if flt.needs_peer else flt.session()
        final = session.check(flight.data, True)
        assert final.decided
        if letter == "W":  # silence is what `silent` waits for; everyone else gives up on it
            want = Verdict.ACCEPT if spec == "silent" else Verdict.REJECT
            assert final.verdict is want, (name, spec)


ROUTES: dict[str, list[str]] = {
    "proxied": ["proxy:trusted=127.0.0.0/8", "httpready"],
    "http": ["httpready"],
    "tls": ["tlsready"],
    "dns": ["dnsready"],
    "ssh": ["sshready"],
}
ROUTE_OF = {"http": "http", "tls": "tls", "dns": "dns", "proxy": "proxied", "ssh": "ssh"}  # everything else: the default


def _flow_route(router: Router, flights: list[FirstFlight]) -> dict[str, str]:
    """Send each flight on its own connection at once; map flight name -> the route that surfaced it."""
    clients: dict[int, tuple[socket.socket, str]] = {}
    for flight in flights:
        c = socket.create_connection(router["http"].getsockname()[:2], timeout=10)
        c.sendall(flight.data)
        clients[c.getsockname()[1]] = (c, flight.name)
    seen: dict[str, str] = {}
    for name in router:
        router[name].setblocking(False)

    def drain() -> bool:
        for name in router:
            while True:
                try:
                    conn, _ = router[name].accept()
                except BlockingIOError:
                    break
                seen[clients[conn.getpeername()[1]][1]] = name  # the TCP peer (PROXY gives the header's)
                conn.close()
        return len(seen) == len(flights)

    try:
        wait_for(drain, timeout=30)
    finally:
        for c, _ in clients.values():
            c.close()
    return seen


def test_every_first_flight_behind_routing(core: str) -> None:
    """One port, a route per protocol: each flight reaches its route, the rest the default (at once or at the deadline)."""
    sock = socket.create_server(("127.0.0.1", 0), backlog=128)
    with route(sock, ROUTES, default="other", timeout=1.0, core=core) as router:
        seen = _flow_route(router, list(FIRST_FLIGHTS.values()))
    wrong = {n: (r, ROUTE_OF.get(FIRST_FLIGHTS[n].protocol, "other")) for n, r in seen.items()
             if r != ROUTE_OF.get(FIRST_FLIGHTS[n].protocol, "other")}
    assert not wrong, f"flight: (got, wanted) {wrong}"


# -- real peers behind `acceptfilter serve --route ... --default ... --forward` ----------------
def start_serve(tmp_path: Path, *args: str) -> Iterator[int]:
    proc = subprocess.Popen([sys.executable, "-m", "acceptfilter.cli", "serve", "--port", "0", "--no-status",
                             "--directory", str(tmp_path), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    port = 0
    lines = []
    for _ in range(8):
        line = proc.stdout.readline()
        lines.append(line)
        found = re.search(r"(?:on|listening on) \S*?:(\d+)", line)
        if line.startswith(("Serving", "Relaying")) and found:
            port = int(found.group(1))
            break
    if not port:
        proc.kill()
        raise AssertionError(f"serve did not start: {lines} {proc.communicate(timeout=10)[1]}")
    try:
        yield port
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture
def serve(tmp_path: Path) -> Iterator:
    gens: list[Iterator[int]] = []

    def start(*args: str) -> int:
        gen = start_serve(tmp_path, *args)
        gens.append(gen)
        return next(gen)

    yield start
    for gen in gens:
        for _ in gen:
            pass


def test_real_ssh_client_reaches_sshd_behind_http_routing(sshd: Sshd, serve, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]  # noqa: F811
    """The relay docs' example (docs/filters/relay.md) with Debian's OpenSSH: its commented identification line is not HTTP/0.9.

    OpenSSH speaks first, so ``sshready`` recognises it; a client that waits
    for the banner is silent and reaches sshd through ``--default ssh``.
    """
    port = serve("--timeout", "2", "--route", "http=httpready", "--route", "ssh=sshready", "--default", "ssh",
                 "--forward", f"ssh=127.0.0.1:{sshd.port}")
    direct = sshd.ssh(sshd.port, "echo", "direct")
    assert direct.returncode == 0 and direct.stdout.strip() == "direct", direct.stderr
    out = sshd.ssh(port, "echo", "through-the-filter")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "through-the-filter"
    # scp rides the same SSH connection: a file there and back through the relay.
    src = tmp_path / "payload.bin"
    src.write_bytes(bytes(range(256)) * 400)
    copy = subprocess.run(["scp", *SSH_OPTS, "-i", str(sshd.key), "-P", str(port), str(src),
                           f"root@127.0.0.1:{tmp_path / 'copied.bin'}"], capture_output=True, text=True, timeout=60)
    assert copy.returncode == 0, copy.stderr
    assert (tmp_path / "copied.bin").read_bytes() == src.read_bytes()
    # A client that waits for the server's banner (silent) gets to sshd at the deadline.
    with socket.create_connection(("127.0.0.1", port), timeout=15) as probe:
        banner = probe.recv(100)
    assert banner.startswith(b"SSH-2.0-"), banner


def test_real_smtp_client_reaches_exim_behind_http_routing(exim: Exim, serve) -> None:  # type: ignore[no-untyped-def]  # noqa: F811
    """SMTP is server-first: the silent client is routed to the default at the deadline, then EHLO and a mail go through."""
    port = serve("--timeout", "0.5", "--route", "http=httpready", "--default", "smtp", "--forward", f"smtp=127.0.0.1:{exim.port}")
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = "alice@client.test", "bob@mx.test", "through acceptfilter"
    msg.set_content("hello over a filtered port\n")
    started = time.monotonic()
    with smtplib.SMTP("127.0.0.1", port, timeout=20) as client:
        code, banner = client.ehlo("client.test")
        assert code == 250 and b"mx.test" in banner
        client.send_message(msg)
    assert time.monotonic() - started < 15
    wait_for(lambda: "<= alice@client.test H=(client.test) [127.0.0.1]" in exim.received(), timeout=20)
    # An HTTP request on the same port still gets the file server.
    with socket.create_connection(("127.0.0.1", port), timeout=10) as c:
        c.sendall(b"GET / HTTP/1.0\r\n\r\n")
        assert c.recv(100).startswith(b"HTTP/1.0 200")


def test_forty_mixed_connections_at_once_route_as_the_table_says(core: str) -> None:
    """Bounded concurrency check: 40 connections of mixed flights, all routed as the table says."""
    names = ["ssh-debian", "smtp-ehlo", "http11-get", "tls13-hello", "redis-array", "dns-query", "proxy-v2", "mysql"] * 5
    sock = socket.create_server(("127.0.0.1", 0), backlog=128)
    flights = [FirstFlight(f"{n}#{i}", FIRST_FLIGHTS[n].protocol, FIRST_FLIGHTS[n].data) for i, n in enumerate(names)]
    with route(sock, ROUTES, default="other", timeout=1.0, core=core) as router:
        seen = _flow_route(router, flights)
    assert len(seen) == len(flights)
    for name, got in seen.items():
        assert got == ROUTE_OF.get(FIRST_FLIGHTS[name.split("#")[0]].protocol, "other"), name
