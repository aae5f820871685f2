"""Routing on one port: HTTP (http.server), TLS (an ssl server) and a silent SSH-like default."""

from __future__ import annotations

import http.server
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from acceptfilter.listener import Router, route

from .conftest import QuietHandler
from .test_tlsready import client_hello


@pytest.fixture(scope="module")
def cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("cert")
    crt, key = d / "cert.pem", d / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", str(key), "-out", str(crt), "-days", "1", "-subj", "/CN=localhost"],
        check=True, capture_output=True,
    )  # fmt: skip
    return crt, key


class _Handler(QuietHandler):
    def body(self) -> bytes:
        return b"plain http\n"


@pytest.fixture
def router(core: str, listen_sock: socket.socket, cert: tuple[Path, Path]) -> Iterator[Router]:
    r = route(listen_sock, {"http": "httpready", "tls": "tlsready:non_tls=reject"}, default="ssh", timeout=0.5, core=core)
    port = listen_sock.getsockname()[1]
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", port), _Handler, bind_and_activate=False)
    httpd.socket.close()
    httpd.socket = r["http"]  # type: ignore[assignment]
    httpd.daemon_threads = True
    threads = [threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)]

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(*map(str, cert))
    ctx.set_alpn_protocols(["http/1.1"])
    stop = threading.Event()

    def tls_server() -> None:
        r["tls"].settimeout(0.1)
        while not stop.is_set():
            try:
                raw, _, info = r["tls"].accept_with_info()
            except (TimeoutError, OSError):
                continue
            try:
                with ctx.wrap_socket(raw, server_side=True) as conn:
                    conn.settimeout(3)
                    conn.recv(1000)
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 14\r\nConnection: close\r\n\r\ntls sni=" + str(info["sni"]).encode()[:6])
            except (ssl.SSLError, OSError):
                pass

    def ssh_server() -> None:
        r["ssh"].settimeout(0.1)
        while not stop.is_set():
            try:
                conn, _, info = r["ssh"].accept_with_info()
            except (TimeoutError, OSError):
                continue
            with conn:
                conn.sendall(f"SSH-2.0-acceptfilter-{info.reason}\r\n".encode())

    threads += [threading.Thread(target=tls_server, daemon=True), threading.Thread(target=ssh_server, daemon=True)]
    for t in threads:
        t.start()
    yield r
    stop.set()
    httpd.shutdown()
    for t in threads[1:]:
        t.join(2)
    r.close()


def test_http_tls_and_silent_default_on_one_port(router: Router, listen_sock: socket.socket) -> None:
    port = listen_sock.getsockname()[1]
    http_out = subprocess.run(["curl", "-s", "--max-time", "20", f"http://127.0.0.1:{port}/"], capture_output=True, check=True)
    assert http_out.stdout == b"plain http\n"
    tls_out = subprocess.run(
        ["curl", "-sk", "--max-time", "20", "--resolve", f"local.test:{port}:127.0.0.1", f"https://local.test:{port}/"],
        capture_output=True, check=True,
    )  # fmt: skip
    assert tls_out.stdout == b"tls sni=local."
    # A server-first client (SSH, SMTP) says nothing: it gets the default route after the wait.
    start = time.monotonic()
    with socket.create_connection(("127.0.0.1", port)) as ssh:
        ssh.settimeout(20)
        banner = ssh.recv(100)
    assert banner == b"SSH-2.0-acceptfilter-timeout\r\n"
    assert time.monotonic() - start >= 0.4  # not before the deadline (a busy machine may be later)
    # A client that speaks first but is neither HTTP nor TLS: every route rejects -> default, at once.
    with socket.create_connection(("127.0.0.1", port)) as other:
        other.sendall(b"SSH-2.0-OpenSSH_9.6\r\n")
        other.settimeout(20)
        assert other.recv(100) == b"SSH-2.0-acceptfilter-default\r\n"
    stats = router.stats()["surfaced_by_route"]
    assert stats == {"http": 1, "tls": 1, "ssh": 2}


def test_first_match_wins_and_passes_are_no_match(core: str, listen_sock: socket.socket) -> None:
    """httpready passes TLS bytes on its own; in a router that pass must not win the "http" route."""
    addr = listen_sock.getsockname()
    with route(listen_sock, {"http": "httpready", "tls": "tlsready", "any": "dataready"}, timeout=2, core=core) as r:
        hello = client_hello("x.test")
        with socket.create_connection(addr) as c:
            c.sendall(hello[:50])  # tlsready waits; "any" would accept but must wait for it
            time.sleep(0.1)
            r["any"].settimeout(0)
            with pytest.raises(BlockingIOError):
                r["any"].accept()
            c.sendall(hello[50:])
            r["tls"].settimeout(3)
            sock, _, info = r["tls"].accept_with_info()
            sock.close()
            assert info.route == "tls" and info["sni"] == "x.test"
        with socket.create_connection(addr) as c:
            c.sendall(b"\x00\x01garbage")
            r["any"].settimeout(3)
            sock, _, info = r["any"].accept_with_info()
            sock.close()
            assert info.route == "any"
