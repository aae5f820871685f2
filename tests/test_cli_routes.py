"""`acceptfilter serve --route`: HTTP files, TLS and a silent server-first client on one port."""

from __future__ import annotations

import socket
import ssl
import struct
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

CURL = "curl"


def _banner_server(banner: bytes) -> tuple[socket.socket, threading.Thread]:
    """A server-first backend (like SSH): greets, then echoes one line."""
    srv = socket.create_server(("127.0.0.1", 0))

    def run() -> None:
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            with conn:
                conn.sendall(banner)
                conn.settimeout(5)
                try:
                    conn.sendall(b"echo " + conn.recv(100))
                except OSError:
                    pass

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return srv, t


def _tls_backend(tmp_path: Path) -> tuple[socket.socket, ssl.SSLContext]:
    key, crt = tmp_path / "key.pem", tmp_path / "crt.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(crt),
                    "-days", "1", "-subj", "/CN=local.test"], check=True, capture_output=True)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(crt, key)
    srv = socket.create_server(("127.0.0.1", 0))

    def run() -> None:
        while True:
            try:
                raw, _ = srv.accept()
            except OSError:
                return
            try:
                with ctx.wrap_socket(raw, server_side=True) as conn:
                    conn.sendall(b"tls says " + conn.recv(100))
            except (OSError, ssl.SSLError):
                pass

    threading.Thread(target=run, daemon=True).start()
    return srv, ctx


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[int, subprocess.Popen[str]]]:
    (tmp_path / "hello.txt").write_text("hello over http\n")
    ssh, _ = _banner_server(b"SSH-2.0-backend\r\n")
    tls, _ = _tls_backend(tmp_path)
    proc = subprocess.Popen(
        [sys.executable, "-m", "acceptfilter.cli", "serve", "--port", "0", "--directory", str(tmp_path), "--no-status",
         "--timeout", "0.5",
         "--route", "http=httpready", "--route", "tls=tlsready:non_tls=reject", "--default", "ssh",
         "--forward", f"tls=127.0.0.1:{tls.getsockname()[1]}", "--forward", f"ssh=127.0.0.1:{ssh.getsockname()[1]}"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    port = 0
    for _ in range(4):
        line = proc.stdout.readline()
        if line.startswith("Serving"):
            port = int(line.split(" on ", 1)[1].split()[0].rsplit(":", 1)[1].strip("/"))
            break
    assert port, proc.stderr.read() if proc.stderr else ""
    yield port, proc
    proc.terminate()
    proc.wait(5)
    ssh.close()
    tls.close()


def test_one_port_serves_http_tls_and_a_silent_client(served: tuple[int, subprocess.Popen[str]]) -> None:
    port, _ = served
    out = subprocess.run([CURL, "-sS", "--max-time", "5", f"http://127.0.0.1:{port}/hello.txt"], capture_output=True, text=True)
    assert out.stdout == "hello over http\n", out.stderr
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, ctx.wrap_socket(raw, server_hostname="local.test") as tls:
        tls.sendall(b"ping")
        assert tls.recv(100) == b"tls says ping"
    with socket.create_connection(("127.0.0.1", port), timeout=5) as silent:
        assert silent.recv(100) == b"SSH-2.0-backend\r\n"  # after the 0.5 s wait: the default route
        silent.sendall(b"hi")
        assert silent.recv(100) == b"echo hi"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--route", "http=httpready", "--route", "tls=tlsready"], "route 'tls' has nowhere to go: add --forward tls=HOST:PORT"),
        (["--route", "http"], "--route takes NAME=SPEC"),
        (["--route", "http=httpready", "--forward", "x=127.0.0.1:1"], "--forward names route 'x'"),
        (["--route", "http=httpready", "--route", "t=tlsready", "--forward", "t=nohost"], "expected HOST:PORT"),
        (["--route", "http=nope"], "unknown filter 'nope'"),
        (["--filter", "httpready", "--route", "http=httpready"], "either --filter"),
    ],
)
def test_route_mistakes_are_one_clear_line(args: list[str], message: str) -> None:
    out = subprocess.run([sys.executable, "-m", "acceptfilter.cli", "serve", "--port", "0", *args],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 2
    assert message in out.stderr and "Traceback" not in out.stderr


def _resetting_tls_backend(tmp_path: Path) -> socket.socket:
    """A TLS backend that ends each session like a database does: answers, waits for the client's close, then a reset."""
    key, crt = tmp_path / "key.pem", tmp_path / "crt.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(crt),
                    "-days", "1", "-subj", "/CN=local.test"], check=True, capture_output=True)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(crt, key)
    srv = socket.create_server(("127.0.0.1", 0))

    def run() -> None:
        while True:
            try:
                raw, _ = srv.accept()
            except OSError:
                return
            raw.settimeout(20)
            sock: socket.socket = raw
            try:
                sock = conn = ctx.wrap_socket(raw, server_side=True)
                conn.sendall(b"tls says " + conn.recv(100))
                while conn.recv(100):  # until the client's close_notify (or EOF)
                    pass
            except (OSError, ssl.SSLError):
                pass
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()  # a reset, after a session that went well

    threading.Thread(target=run, daemon=True).start()
    return srv


def test_relay_logs_rejected_and_timed_out_connections_and_a_reset_after_a_session_is_no_error(tmp_path: Path) -> None:
    backend = _resetting_tls_backend(tmp_path)
    proc = subprocess.Popen(
        [sys.executable, "-m", "acceptfilter.cli", "serve", "--port", "0", "--no-status", "--timeout", "1",
         "--route", "tls=tlsready:non_tls=reject", "--forward", f"tls=127.0.0.1:{backend.getsockname()[1]}"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stderr is not None
        line = proc.stdout.readline()
        while line and not line.startswith("Relaying on"):  # after a line per forwarded route
            line = proc.stdout.readline()
        assert line.startswith("Relaying on"), "serve did not start"
        port = int(line.split(" on ", 1)[1].split()[0].rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=10) as plain:
            plain.sendall(b"GET / HTTP/1.0\r\n\r\n")  # not TLS: rejected
            assert plain.recv(100) == b""
        with socket.create_connection(("127.0.0.1", port), timeout=10) as half:
            half.sendall(b"\x16\x03\x01")  # a ClientHello begun, never finished: times out
            assert half.recv(100) == b""
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
                ctx.wrap_socket(raw, server_hostname="local.test") as tls:
            tls.sendall(b"ping")
            assert tls.recv(100) == b"tls says ping"
            try:
                tls.unwrap()  # close_notify, as psql sends it; the answer is the backend's reset
            except (OSError, ssl.SSLError):
                pass
        lines: list[str] = []
        while not any(x.startswith("forwarded") for x in lines):
            line = proc.stderr.readline()
            assert line, lines  # serve is still running and writing
            lines.append(line.split(" INFO ", 1)[-1].strip())
    finally:
        proc.terminate()
        proc.wait(10)
        backend.close()
    rejected = next(x for x in lines if x.startswith("rejected"))
    assert "client=127.0.0.1:" in rejected and "reason=" in rejected and "then=close" in rejected
    timed_out = next(x for x in lines if x.startswith("timed out"))
    assert "reason=timeout" in timed_out and "bytes=3" in timed_out
    forwarded = next(x for x in lines if x.startswith("forwarded"))
    assert "closed=reset" in forwarded and "reset by peer" not in forwarded, forwarded
