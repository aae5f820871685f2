"""The relay (`acceptfilter serve --route ... --forward`): real backends, real clients.

Issue 14, item 5: forward-only mode in front of redis (redis-cli and
redis-benchmark through it), ``--on-reject`` apart from ``--default`` (a
half-sent command and TLS garbage must not reach the silent route's backend),
PROXY v1/v2 headers to backends (read by HAProxy's ``accept-proxy`` and by
our own ``proxy`` filter), and a log line per relayed connection.
Throughput and latency against direct are measured in bench/relay.py, not here.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import re
import shutil
import socket
import struct
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from acceptfilter.filters.proxy import Proxy

from acceptfilter.relay import parse_forward, proxy_header

from .conftest import wait_for
from .peers import free_port


# -- PROXY headers, the sending side -----------------------------------------------------------
@pytest.mark.parametrize(
    ("source", "destination", "want_client", "transport"),
    [
        (("192.0.2.7", 5555), ("10.0.0.1", 443), ("192.0.2.7", 5555), "tcp4"),
        (("2001:db8::7", 5555, 0, 0), ("2001:db8::1", 443, 0, 0), ("2001:db8::7", 5555), "tcp6"),
        (("::ffff:192.0.2.7", 5555, 0, 0), ("::ffff:10.0.0.1", 443, 0, 0), ("192.0.2.7", 5555), "tcp4"),
        (("192.0.2.7", 5555), ("2001:db8::1", 443, 0, 0), ("::ffff:192.0.2.7", 5555), "tcp6"),
    ],
)
@pytest.mark.parametrize("version", [1, 2])
def test_proxy_header_round_trips_through_the_proxy_filter(source: tuple, destination: tuple,  # type: ignore[type-arg]
                                                          want_client: tuple, transport: str, version: int) -> None:  # type: ignore[type-arg]
    header = proxy_header(version, source, destination)
    d = Proxy(trusted=("127.0.0.0/8",)).peer_session(("127.0.0.1", 1)).check(header + b"rest", False)
    assert d.accepted and d.consume == len(header)
    host, port = d.info["client_address"]
    assert (ipaddress.ip_address(host), port) == (ipaddress.ip_address(want_client[0]), want_client[1])
    assert d.info["transport"] == transport
    assert d.info["proxy_version"] == version and d.info["command"] == "PROXY"


def test_proxy_header_for_a_non_ip_client_is_unknown_or_local() -> None:
    assert proxy_header(1, "", ("127.0.0.1", 1)) == b"PROXY UNKNOWN\r\n"
    d = Proxy(trusted=("127.0.0.0/8",)).peer_session(("127.0.0.1", 1)).check(proxy_header(2, None, None), False)
    assert d.accepted and d.info["command"] == "LOCAL"


@pytest.mark.parametrize("text", ["127.0.0.1:1,proxy=v3", "127.0.0.1:1,nodelay", "nohost"])
def test_forward_option_mistakes(text: str) -> None:
    with pytest.raises(ValueError):
        parse_forward(text)
    assert parse_forward("[::1]:80,proxy=v2").send_proxy == 2


# -- the C pump -----------------------------------------------------------------------------------
def test_c_pump_moves_both_ways_and_passes_the_half_close_on() -> None:
    """One afr_relay call between two socket pairs: data both ways, EOF passed on, counts returned."""
    from acceptfilter.relay import _c_pump, _lib, _Tally

    if _lib is None:
        pytest.skip("the C relay (acceptfilter._relay) is not built")
    client, client_end = socket.socketpair()
    backend, backend_end = socket.socketpair()
    tally = _Tally()
    t = threading.Thread(target=_c_pump, args=(client_end, backend_end, tally))
    t.start()
    try:
        client.sendall(b"x" * 300_000)  # more than one pipe's worth
        client.shutdown(socket.SHUT_WR)
        got = b""
        backend.settimeout(10)
        while chunk := backend.recv(65536):  # ends: the half-close was passed on
            got += chunk
        assert got == b"x" * 300_000
        backend.sendall(b"answer")  # the other direction still works after the half-close
        backend.close()
        client.settimeout(10)
        assert client.recv(100) == b"answer" and client.recv(100) == b""
        t.join(10)
        assert not t.is_alive()
        assert (tally.up, tally.down, tally.errors) == (300_000, 6, [])
    finally:
        for s in (client, client_end, backend, backend_end):
            s.close()


def test_c_pump_ends_both_ways_when_one_side_resets() -> None:
    from acceptfilter.relay import _c_pump, _lib, _Tally

    if _lib is None:
        pytest.skip("the C relay (acceptfilter._relay) is not built")
    front = socket.create_server(("127.0.0.1", 0))
    back = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(front.getsockname())
    client_end, _ = front.accept()
    backend_end = socket.create_connection(back.getsockname())
    backend, _ = back.accept()
    tally = _Tally()
    t = threading.Thread(target=_c_pump, args=(client_end, backend_end, tally))
    t.start()
    try:
        client.sendall(b"partial")
        backend.settimeout(10)
        assert backend.recv(100) == b"partial"
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.close()  # RST
        t.join(10)
        assert not t.is_alive()
        try:
            assert backend.recv(100) == b""  # the relay shut the backend down too
        except ConnectionResetError:
            pass
    finally:
        for s in (client_end, backend_end, backend, front, back):
            s.close()


# -- serve as a relay ----------------------------------------------------------------------------
class Serve:
    def __init__(self, tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "acceptfilter.cli", "serve", "--port", "0", "--no-status",
                                      "--directory", str(tmp_path), *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env={**os.environ, **(env or {})})
        assert self.proc.stdout is not None and self.proc.stderr is not None
        self.lines: list[str] = []
        self.port = 0
        for _ in range(10):
            line = self.proc.stdout.readline()
            self.lines.append(line)
            found = re.search(r"^(?:Serving .* on http://|Relaying on )\S*?:(\d+)", line)
            if found:
                self.port = int(found.group(1))
                break
        if not self.port:
            self.proc.kill()
            raise AssertionError(f"serve did not start: {self.lines} {self.proc.communicate(timeout=10)[1]}")
        self.err: list[str] = []
        threading.Thread(target=self._read_err, daemon=True).start()

    def _read_err(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.err.append(line)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


@pytest.fixture
def serve(tmp_path: Path) -> Iterator:
    started: list[Serve] = []

    def start(*args: str, env: dict[str, str] | None = None) -> Serve:
        s = Serve(tmp_path, *args, env=env)
        started.append(s)
        return s

    yield start
    for s in started:
        s.stop()


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[int]:
    exe = shutil.which("redis-server")
    if exe is None or shutil.which("redis-cli") is None:
        pytest.skip("needs redis-server and redis-tools (requirements/apt-test.txt)")
    port = free_port()
    proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--dir", str(tmp_path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def up() -> bool:
        assert proc.poll() is None, "redis-server exited"
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
        return False

    try:
        wait_for(up, timeout=20)
        yield port
    finally:
        proc.terminate()
        proc.wait(10)


def redis_cli(port: int, *command: str) -> str:
    out = subprocess.run(["redis-cli", "-h", "127.0.0.1", "-p", str(port), *command], capture_output=True, text=True,
                         timeout=30)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


@pytest.mark.parametrize("pump", ["c", "splice", "copy"])
def test_forward_only_relay_in_front_of_redis_with_a_log_line_per_connection(serve, redis: int, pump: str) -> None:  # type: ignore[no-untyped-def]
    """No dummy http route: every route is forwarded, serve is a relay only (each byte pump)."""
    relay = serve("--route", "redis=dataready", "--forward", f"redis=127.0.0.1:{redis}",
                  env={"ACCEPTFILTER_RELAY_PUMP": pump})
    assert relay.lines[-1].startswith("Relaying on ")
    assert redis_cli(relay.port, "SET", "k", "through the relay") == "OK"
    assert redis_cli(relay.port, "GET", "k") == "through the relay"
    bench = subprocess.run(["redis-benchmark", "-h", "127.0.0.1", "-p", str(relay.port), "-t", "get,set", "-n", "2000",
                            "-c", "10", "-q"], capture_output=True, text=True, timeout=120)
    assert bench.returncode == 0 and "GET:" in bench.stdout and "SET:" in bench.stdout, bench.stdout + bench.stderr
    wait_for(lambda: sum("forwarded route=redis" in line for line in relay.err) >= 12, timeout=30)
    line = next(line for line in relay.err if "forwarded route=redis" in line)
    assert re.search(rf"client=127\.0\.0\.1:\d+ backend=127\.0\.0\.1:{redis} reason=ready up=\d+ down=\d+", line), line


class CountingBackend:
    """A server-first backend (greets like an SSH server) that counts the connections it got."""

    def __init__(self, banner: bytes = b"SSH-2.0-backend\r\n") -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        self.received: list[bytes] = []
        self.banner = banner
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            with conn, contextlib.suppress(OSError):
                conn.sendall(self.banner)
                conn.settimeout(5)
                self.received.append(conn.recv(1000))

    def close(self) -> None:
        self.sock.close()


def _closed_without_banner(port: int, payload: bytes) -> bool:
    with socket.create_connection(("127.0.0.1", port), timeout=15) as c:
        c.sendall(payload)
        try:
            return c.recv(100) == b""
        except ConnectionResetError:
            return True


def test_on_reject_is_apart_from_the_default_route(serve) -> None:  # type: ignore[no-untyped-def]
    """A half-sent redis command and TLS garbage are rejected (closed); only the silent client reaches the default."""
    ssh = CountingBackend()
    try:
        relay = serve("--timeout", "0.5", "--route", "http=httpready", "--route", "tls=tlsready:non_tls=reject",
                      "--default", "ssh", "--forward", f"tls=127.0.0.1:{free_port()}",
                      "--forward", f"ssh=127.0.0.1:{ssh.port}")
        assert _closed_without_banner(relay.port, b"*2\r\n$3\r\nGET\r\n$3\r\nk")  # half-sent: times out, rejected
        assert _closed_without_banner(relay.port, b"\x16\x03\x01\x00\x05garbage")  # TLS-looking garbage
        assert _closed_without_banner(relay.port, b"\x00")
        assert ssh.accepted == 0
        with socket.create_connection(("127.0.0.1", relay.port), timeout=15) as silent:
            assert silent.recv(100) == b"SSH-2.0-backend\r\n"  # the deadline passed in silence: the default route
            silent.sendall(b"hello")
        wait_for(lambda: ssh.received == [b"hello"], timeout=10)
        assert ssh.accepted == 1
    finally:
        ssh.close()


def test_on_reject_can_name_a_route(serve) -> None:  # type: ignore[no-untyped-def]
    catch_all = CountingBackend(banner=b"")
    try:
        relay = serve("--timeout", "0.5", "--route", "http=httpready", "--on-reject", "route:other",
                      "--forward", f"other=127.0.0.1:{catch_all.port}")
        with socket.create_connection(("127.0.0.1", relay.port), timeout=15) as c:
            c.sendall(b"EHLO x\r\n")
            wait_for(lambda: catch_all.received == [b"EHLO x\r\n"], timeout=10)
    finally:
        catch_all.close()


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_proxy_header_to_a_real_haproxy_with_accept_proxy(serve, tmp_path: Path, version: str) -> None:  # type: ignore[no-untyped-def]
    """HAProxy (bind ... accept-proxy) reads our header and answers with the client address it learnt."""
    exe = shutil.which("haproxy")
    if exe is None:
        pytest.skip("haproxy is not installed (requirements/apt-test.txt)")
    port = free_port()
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text("defaults\n  mode http\n  timeout connect 2s\n  timeout client 5s\n  timeout server 5s\n"
                   f"frontend fe\n  bind 127.0.0.1:{port} accept-proxy\n"
                   '  http-request return status 200 content-type text/plain lf-string "client=%[src]:%[src_port]\\n"\n')
    proc = subprocess.Popen([exe, "-f", str(cfg), "-db"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for(lambda: proc.poll() is not None or _listening(port), timeout=20)
        assert proc.poll() is None
        relay = serve("--route", "web=httpready", "--forward", f"web=127.0.0.1:{port},proxy={version}")
        with socket.create_connection(("127.0.0.1", relay.port), timeout=10) as c:
            c.sendall(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
            data = b""
            while chunk := c.recv(4096):
                data += chunk
            host, port_ = c.getsockname()[:2]
        assert data.startswith(b"HTTP/1.1 200"), data[:200]
        assert f"client={host}:{port_}".encode() in data  # the real client, not the relay's own socket
    finally:
        proc.terminate()
        proc.wait(10)


def _listening(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
        return True
    return False


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--on-reject", "route:x"], "--on-reject route:x needs --route"),
        (["--route", "http=httpready", "--on-reject", "surface"], "--on-reject takes close, reset or route:NAME"),
        (["--route", "http=httpready", "--on-reject", "route:x"], "route 'x' has nowhere to go"),
        (["--route", "http=httpready", "--forward", "http=127.0.0.1:1,proxy=v9"], "unknown forward option"),
        (["--route", "http=httpready", "--default", "ssh"], "route 'ssh' has nowhere to go"),
    ],
)
def test_relay_mistakes_are_one_clear_line(args: list[str], message: str, tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "acceptfilter.cli", "serve", "--port", "0", "--directory", str(tmp_path),
                          *args], capture_output=True, text=True, timeout=30)
    assert out.returncode == 2, out
    assert message in out.stderr and "Traceback" not in out.stderr, out.stderr


def test_relay_sets_nodelay_on_the_client_side_and_sends_the_proxy_header_first() -> None:
    """TCP_NODELAY (a small response must not wait for Nagle + delayed ACK) and PROXY v2 before any byte."""
    from acceptfilter.relay import Forward, relay

    back = socket.create_server(("127.0.0.1", 0))
    front = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(front.getsockname())
    client_end, address = front.accept()
    # The C loop takes the fd over (the socket object is detached): look through a duplicate.
    watch = socket.socket(fileno=os.dup(client_end.fileno()))
    done = threading.Event()
    t = threading.Thread(target=lambda: (relay(client_end, address, None, Forward(back.getsockname(), 2), "t"),
                                         done.set()))
    t.start()
    try:
        backend, _ = back.accept()
        backend.settimeout(10)
        # The backend's own end is the relay's; what it sends first is the header.
        header = backend.recv(28)
        assert watch.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
        d = Proxy(trusted=("127.0.0.0/8",)).peer_session(("127.0.0.1", 1)).check(header, False)
        assert d.accepted and d.info["client_address"] == client.getsockname()
        assert d.info["server_address"] == front.getsockname()
        client.sendall(b"ping")
        assert backend.recv(10) == b"ping"
        backend.close()
        client.close()
        assert done.wait(10)
    finally:
        for s in (client, back, front, watch):
            s.close()


def test_tls_through_the_relay_to_openssl_s_server_is_logged_with_sni_and_ja4(serve, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A real TLS server behind a tlsready route; the log line names the route, SNI, JA4 and bytes each way."""
    import ssl

    if shutil.which("openssl") is None:
        pytest.skip("needs openssl (requirements/apt-test.txt)")
    key, crt = tmp_path / "key.pem", tmp_path / "crt.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(crt),
                    "-days", "1", "-subj", "/CN=relay.test"], check=True, capture_output=True)
    port = free_port()
    server = subprocess.Popen(["openssl", "s_server", "-quiet", "-accept", f"127.0.0.1:{port}", "-cert", str(crt),
                               "-key", str(key), "-www"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: server.poll() is not None or _listening(port), timeout=20)
        assert server.poll() is None, "openssl s_server did not start"
        relay = serve("--route", "tls=tlsready:non_tls=reject", "--forward", f"tls=127.0.0.1:{port}")
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        with socket.create_connection(("127.0.0.1", relay.port), timeout=10) as raw, \
                ctx.wrap_socket(raw, server_hostname="relay.test") as tls:
            tls.sendall(b"GET / HTTP/1.0\r\n\r\n")
            data = b""
            while chunk := tls.recv(65536):
                data += chunk
        assert data.startswith(b"HTTP/1.0 200")
        wait_for(lambda: any("forwarded route=tls" in line for line in relay.err), timeout=10)
        line = next(line for line in relay.err if "forwarded route=tls" in line)
        assert re.search(r"reason=ready sni=relay\.test ja4=t1[23]d\w+ up=\d+ down=\d+", line), line
        up, down = (int(x) for x in re.search(r"up=(\d+) down=(\d+)", line).groups())  # type: ignore[union-attr]
        assert up > 200 and down > len(data)  # the hello and more up; the handshake and the page down
    finally:
        server.terminate()
        server.wait(10)


class EchoBackend:
    """Echoes every connection's bytes back, until the peer closes."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    @staticmethod
    def _echo(conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            while data := conn.recv(65536):
                conn.sendall(data)

    def close(self) -> None:
        self.sock.close()


def test_a_reload_keeps_relayed_connections_and_stopping_closes_and_logs_them(serve) -> None:  # type: ignore[no-untyped-def]
    """SIGHUP rebuilds the listeners: a connection being relayed goes on. SIGTERM: it is closed and logged."""
    import signal

    echo = EchoBackend()
    try:
        relay = serve("--route", "echo=dataready", "--forward", f"echo=127.0.0.1:{echo.port}")
        with socket.create_connection(("127.0.0.1", relay.port), timeout=30) as c:
            c.sendall(b"before")
            assert c.recv(100) == b"before"
            relay.proc.send_signal(signal.SIGHUP)
            wait_for(lambda: any("reloaded" in line for line in relay.err), timeout=30)
            c.sendall(b"after the reload")
            assert c.recv(100) == b"after the reload"
            with socket.create_connection(("127.0.0.1", relay.port), timeout=30) as fresh:
                fresh.sendall(b"new")
                assert fresh.recv(100) == b"new"
            relay.proc.send_signal(signal.SIGTERM)
            assert relay.proc.wait(30) == 0
            try:
                assert c.recv(100) == b""
            except ConnectionResetError:
                pass
        wait_for(lambda: any("relay stopped" in line for line in relay.err), timeout=10)
        line = next(line for line in relay.err if "relay stopped" in line)
        assert re.search(r"forwarded route=echo .* up=22 down=22 seconds=[\d.]+ \(relay stopped\)", line), line
    finally:
        echo.close()
