"""tlsready: complete ClientHello across records and segments, with real clients."""

from __future__ import annotations

import contextlib
import socket
import ssl
import struct
import subprocess
import threading
import time

import pytest
from acceptfilter.filters.tlsready import TlsReady, ja4

from acceptfilter import Verdict, load_filter
from acceptfilter.listener import wrap

from .filterutil import assert_split_independent

A, R, W = Verdict.ACCEPT, Verdict.REJECT, Verdict.WAIT


def client_hello(sni: str | None = "www.example.com", alpn: tuple[str, ...] = ("h2", "http/1.1")) -> bytes:
    """The ClientHello Python's ssl (OpenSSL) really sends, captured through a MemoryBIO."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if alpn:
        ctx.set_alpn_protocols(list(alpn))
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname=sni)
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


def records(hello: bytes, size: int) -> bytes:
    """Re-frame one ClientHello's handshake message into records of at most ``size`` bytes."""
    assert hello[0] == 0x16
    hs = hello[5:]
    return b"".join(b"\x16\x03\x01" + struct.pack("!H", len(hs[i : i + size])) + hs[i : i + size] for i in range(0, len(hs), size))


def pad(hello: bytes, extra: int) -> bytes:
    """Add a padding extension (21) of ``extra`` bytes and re-frame in 16 KiB records."""
    hs = hello[5:]
    body = hs[4:]
    # legacy_version(2) random(32) session_id cipher_suites compression
    pos = 34
    pos += 1 + body[pos]
    pos += 2 + int.from_bytes(body[pos : pos + 2], "big")
    pos += 1 + body[pos]
    ext_len = int.from_bytes(body[pos : pos + 2], "big")
    exts = body[pos + 2 : pos + 2 + ext_len] + struct.pack("!HH", 21, extra) + b"\0" * extra
    body = body[:pos] + struct.pack("!H", len(exts)) + exts
    msg = b"\x01" + len(body).to_bytes(3, "big") + body
    return records(b"\x16\x03\x01\x00\x00" + msg, 16384)


def test_info_from_python_ssl() -> None:
    hello = client_hello()
    d = assert_split_independent(TlsReady(), hello)
    assert d.verdict is A
    assert d.info["sni"] == "www.example.com"
    assert d.info["alpn"] == ["h2", "http/1.1"]
    assert "TLSv1.3" in d.info["versions"] and "TLSv1.2" in d.info["versions"]
    assert d.info["ciphers"] > 3
    assert d.info["ja4"].startswith("t13d") and d.info["ja4"][8:10] == "h2"
    d2 = TlsReady().check(client_hello(None, ()), False)
    assert d2.info["sni"] is None and d2.info["alpn"] == [] and d2.info["ja4"][3] == "i" and d2.info["ja4"][8:10] == "00"


def test_ja4_known_vector() -> None:
    # A Chrome ClientHello as published with its ja4 and ja4_r (raw) strings.
    ciphers = [int(c, 16) for c in ["002f", "0035", "009c", "009d", "1301", "1302", "1303", "c013", "c014", "c02b", "c02c", "c02f", "c030", "cca8", "cca9"]]
    exts = [int(e, 16) for e in ["0005", "000a", "000b", "000d", "0012", "0017", "001b", "0023", "002b", "002d", "0033", "44cd", "fe0d", "ff01"]]
    sigs = [int(s, 16) for s in ["0403", "0804", "0401", "0503", "0805", "0501", "0806", "0601"]]
    got = ja4(0x0304, True, [*ciphers, 6682], [*exts, 0x0000, 0x0010, 0x2A2A], ["h2", "http/1.1"], sigs)
    assert got == "t13d1516h2_8daaf6152771_d8a2da3f94cd"
    assert ja4(0x0303, False, [], [], ["\x01x"], [])[:10] == "t12i000008"  # non-alphanumeric ALPN: hex of 01 78


def test_several_records_and_padding() -> None:
    hello = client_hello()
    small = records(hello, 100)
    d = assert_split_independent(TlsReady(), small)
    assert d.verdict is A and d.info == TlsReady().check(hello, False).info
    padded = pad(hello, 17000)
    assert len(padded) > 17000 and padded.count(b"\x16\x03\x01") >= 2
    big = TlsReady(max_bytes=65536)
    assert big.check(padded, False).verdict is A
    assert big.check(padded[:-1], False).verdict is W
    too = TlsReady().check(padded[:300], False)  # the length alone says it cannot fit in 16 KiB
    assert too.verdict is R and "larger than max_bytes=16384" in too.reason


@pytest.mark.parametrize(
    ("data", "verdict"),
    [
        (b"", W),
        (b"\x16", W),
        (b"\x16\x03\x01\x00", W),
        (b"GET / HTTP/1.1\r\n", A),  # not TLS: passed
        (b"SSH-2.0-x\r\n", A),
        (b"\x16\x03\x01\x00\x00", R),  # empty record
        (b"\x16\x03\x01\x00\x04\x02\x00\x00\x00", R),  # ServerHello, not ClientHello
        (b"\x16\x03\x01\x00\x05\x01\x00\x00\x01\x00", R),  # truncated body
        (b"\x16\x03\x01\x00\x02\x01\x00\x17\x03\x03", R),  # application data inside
    ],
)
def test_verdicts(data: bytes, verdict: Verdict) -> None:
    assert TlsReady().check(data, False).verdict is verdict


def test_options_and_final() -> None:
    hello = client_hello("api.example.org")
    assert load_filter("tlsready:non_tls=reject").check(b"GET /", False).verdict is R
    assert load_filter("tlsready:sni=*.example.org|x.test").check(hello, False).verdict is A
    assert load_filter("tlsready:sni=API.example.org").check(hello, False).verdict is A
    d = load_filter("tlsready:sni=example.org|*.other.org").check(hello, False)
    assert d.verdict is R and "SNI" in d.reason
    assert load_filter("tlsready:sni=*.example.org").check(client_hello("example.org"), False).verdict is R
    assert load_filter("tlsready:sni=*.example.org").check(client_hello(None), False).verdict is R
    assert TlsReady().check(hello[:-1], True).verdict is R
    assert TlsReady().check(b"", True).verdict is R
    assert TlsReady(max_bytes=64).check(hello[:64] + b"x", False).verdict is R  # never WAIT at the cap


def _accept_one(listener: object, timeout: float = 5) -> tuple[socket.socket, dict[str, object]]:
    listener.settimeout(timeout)  # type: ignore[attr-defined]
    sock, _, info = listener.accept_with_info()  # type: ignore[attr-defined]
    return sock, dict(info.info)


def test_python_ssl_client(core: str, listen_sock: socket.socket) -> None:
    port = listen_sock.getsockname()[1]
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["http/1.1"])

    def client() -> None:
        try:
            with socket.create_connection(("127.0.0.1", port)) as raw, ctx.wrap_socket(raw, server_hostname="py.example"):
                pass
        except (ssl.SSLError, OSError):
            pass  # the test server never answers the handshake

    with wrap(listen_sock, "tlsready", core=core, timeout=3) as listener:
        t = threading.Thread(target=client)
        t.start()
        sock, info = _accept_one(listener)
        with sock:
            assert info["sni"] == "py.example" and info["alpn"] == ["http/1.1"]
            assert sock.recv(1, socket.MSG_PEEK) == b"\x16"  # the application still gets the hello
        t.join(5)


@pytest.mark.parametrize("tool", ["openssl", "curl"])
def test_openssl_and_curl(core: str, listen_sock: socket.socket, tool: str) -> None:
    port = listen_sock.getsockname()[1]
    if tool == "openssl":
        cmd = ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-servername", "ossl.example", "-alpn", "h2,http/1.1"]
    else:
        cmd = ["curl", "-sk", "--http2", "--max-time", "4", "--resolve", f"curl.example:{port}:127.0.0.1", f"https://curl.example:{port}/"]
    with wrap(listen_sock, "tlsready", core=core, timeout=3) as listener:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            sock, info = _accept_one(listener)
            sock.close()
        finally:
            proc.wait(5)
    assert info["sni"] == f"{tool if tool == 'curl' else 'ossl'}.example"
    assert info["alpn"][0] == "h2" and "http/1.1" in info["alpn"]
    assert str(info["ja4"]).startswith("t13d")


def test_padded_hello_over_a_socket(core: str, listen_sock: socket.socket) -> None:
    padded = pad(client_hello(), 20000)
    with (
        wrap(listen_sock, "tlsready:max_bytes=65536", core=core, timeout=3) as listener,
        socket.create_connection(listen_sock.getsockname()) as client,
    ):
        for i in range(0, len(padded), 1000):
            client.sendall(padded[i : i + 1000])
        sock, info = _accept_one(listener)
        with sock:
            assert info["sni"] == "www.example.com"
        # Too large for the default cap: rejected (closed), with a clear reason.
    with socket.create_server(("127.0.0.1", 0)) as ls2, wrap(ls2, "tlsready", core=core, timeout=3) as listener2:
        with socket.create_connection(ls2.getsockname()) as client:
            client.sendall(padded[:2000])
            client.settimeout(3)
            with contextlib.suppress(ConnectionResetError):
                assert client.recv(10) == b""
        deadline = time.monotonic() + 2  # the counter is bumped just after the close
        while listener2.stats()["rejected"] != 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert listener2.stats()["rejected"] == 1


@pytest.mark.parametrize("on_reject", ["close", "reset"])
def test_a_hello_over_max_bytes_is_closed_as_on_reject_says(listen_sock: socket.socket, core: str,
                                                             on_reject: str) -> None:
    """A refused ClientHello gets what ``on_reject`` promises, as OpenSSL's client sees it: ``close``
    a clean FIN (the core reads the unread hello first, so the kernel sends no RST: issue 24, item 4;
    it used to be an RST by accident), ``reset`` an RST."""
    from acceptfilter.listener import wrap

    with wrap(listen_sock, "tlsready:max_bytes=200", core=core, timeout=5, on_reject=on_reject) as listener:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        with socket.create_connection(listen_sock.getsockname(), timeout=10) as raw, \
                pytest.raises((ConnectionResetError, ssl.SSLError)) as caught, \
                ctx.wrap_socket(raw, server_hostname="big.example"):
            pass
        reset = isinstance(caught.value, ConnectionResetError) or "reset" in str(caught.value).lower()
        if on_reject == "reset":
            assert reset, caught.value
        else:
            assert isinstance(caught.value, ssl.SSLEOFError) and not reset, caught.value
        assert listener.stats()["rejected"] == 1
