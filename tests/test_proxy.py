"""proxy: PROXY protocol v1/v2 consumed from trusted balancers; a real HAProxy in front."""

from __future__ import annotations

import contextlib
import shutil
import socket
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from acceptfilter.filters.proxy import V2_SIGNATURE, Proxy

from acceptfilter import Verdict, load_filter
from acceptfilter.listener import wrap

from .filterutil import assert_split_independent

A, R, W = Verdict.ACCEPT, Verdict.REJECT, Verdict.WAIT
LB = ("127.0.0.1", 40000)
V1 = b"PROXY TCP4 192.0.2.7 198.51.100.1 51234 443\r\n"
REQ = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"


def v2(cmd: int = 1, fam: int = 0x11, addr: bytes | None = None, tlvs: bytes = b"") -> bytes:
    if addr is None:
        addr = socket.inet_aton("192.0.2.7") + socket.inet_aton("198.51.100.1") + struct.pack("!HH", 51234, 443)
    body = addr + tlvs
    return V2_SIGNATURE + bytes([0x20 | cmd, fam]) + struct.pack("!H", len(body)) + body


class _PeerFilter(Proxy):
    """The filter as the engine uses it: every session knows the peer (here: a trusted balancer)."""

    def session(self) -> object:  # type: ignore[override]
        return self.peer_session(LB)


def flt(**kw: object) -> Proxy:
    return _PeerFilter(trusted=("127.0.0.0/8", "::1/128"), **kw)  # type: ignore[arg-type]


def test_v1_info_consume_and_split_independence() -> None:
    d = assert_split_independent(flt(), V1 + REQ)
    assert d.verdict is A and d.consume == len(V1)
    assert d.info["client_address"] == ("192.0.2.7", 51234)
    assert d.info["server_address"] == ("198.51.100.1", 443)
    assert d.info["balancer"] == LB and d.info["proxy_version"] == 1
    d6 = flt().check(b"PROXY TCP6 2001:db8::1 ::1 1 2\r\n", False)
    assert d6.info["client_address"] == ("2001:db8::1", 1, 0, 0)
    unknown = flt().check(b"PROXY UNKNOWN\r\n", False)
    assert unknown.verdict is A and "client_address" not in unknown.info


def test_v2_info_tlvs_and_split_independence() -> None:
    tlvs = b"\x02" + struct.pack("!H", 11) + b"example.com" + b"\x01\x00\x02h2"
    data = v2(tlvs=tlvs)
    d = assert_split_independent(flt(), data + REQ)
    assert d.verdict is A and d.consume == len(data)
    assert d.info["client_address"] == ("192.0.2.7", 51234) and d.info["transport"] == "tcp4"
    assert d.info["authority"] == "example.com" and d.info["proxy_alpn"] == "h2"
    assert d.info["tlvs"] == {2: b"example.com", 1: b"h2"}
    local = flt().check(v2(cmd=0, fam=0, addr=b""), False)
    assert local.verdict is A and local.info["command"] == "LOCAL" and "client_address" not in local.info
    six = v2(fam=0x21, addr=socket.inet_pton(socket.AF_INET6, "2001:db8::7") + bytes(16) + struct.pack("!HH", 5, 6))
    assert flt().check(six, False).info["client_address"] == ("2001:db8::7", 5, 0, 0)


@pytest.mark.parametrize(
    ("data", "verdict"),
    [
        (b"", W),
        (b"PRO", W),
        (b"\r\n\r\n\x00", W),
        (REQ, R),  # no header
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n", R),  # LF only
        (b"PROXY TCP4 1.2.3.4 ::1 1 2\r\n", R),  # family mismatch
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 99999 2\r\n", R),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n", R),
        (b"PROXY " + b"A" * 120, R),  # no CRLF within 107 bytes
        (V2_SIGNATURE + b"\x31\x11\x00\x00", R),  # version 3
        (V2_SIGNATURE + b"\x21\x99\x00\x00", R),  # unknown family
        (v2(addr=b"\x01\x02"), R),  # address block too short
        (v2(tlvs=b"\x02\x00\x09ab"), R),  # TLV runs past
        (v2()[:-1], W),
    ],
)
def test_verdicts(data: bytes, verdict: Verdict) -> None:
    assert flt().check(data, False).verdict is verdict


def test_trust_missing_and_final() -> None:
    untrusted = Proxy(trusted=("10.0.0.0/8",)).peer_session(("127.0.0.1", 5))
    d = untrusted.check(V1, False)
    assert d.verdict is R and "not trusted" in d.reason
    assert Proxy(trusted=("127.0.0.0/8",)).peer_session(("::ffff:127.0.0.1", 5, 0, 0)).check(V1, False).verdict is A
    assert Proxy(trusted=("127.0.0.0/8",)).check(V1, False).verdict is R  # no peer known: not trusted
    assert Proxy(trusted=("127.0.0.0/8",)).peer_session("").check(V1, False).verdict is R  # AF_UNIX peer
    with pytest.raises(ValueError, match="trusted"):
        Proxy()
    allow = flt(allow_missing=True)
    got = allow.check(REQ, False)
    assert got.verdict is A and got.consume == 0 and got.info["proxy_version"] is None
    assert allow.check(b"", True).verdict is A  # trusted balancer's idle connection
    assert Proxy(trusted=("10.0.0.0/8",), allow_missing=True).peer_session(LB).check(REQ, False).verdict is R
    assert flt().check(V1[:-1], True).verdict is R
    assert flt().check(b"", True).verdict is R
    assert flt(max_bytes=20).check(v2(), False).verdict is R  # never WAIT past the cap
    assert load_filter("proxy:trusted=127.0.0.1/32|::1").trusted[1].prefixlen == 128


# -- end to end ---------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def haproxy(tmp_path: Path) -> Iterator[object]:
    exe = shutil.which("haproxy")
    if exe is None:
        pytest.skip("haproxy is not installed (requirements/apt-test.txt)")
    procs: list[subprocess.Popen[bytes]] = []

    def start(backend_port: int, option: str) -> int:
        port = _free_port()
        cfg = tmp_path / f"haproxy-{port}.cfg"
        cfg.write_text(
            "defaults\n  mode tcp\n  timeout connect 2s\n  timeout client 5s\n  timeout server 5s\n"
            f"frontend fe\n  bind 127.0.0.1:{port}\n  unique-id-format req-%rt\n  default_backend be\n"
            f"backend be\n  server s1 127.0.0.1:{backend_port} {option}\n"
        )
        proc = subprocess.Popen([exe, "-f", str(cfg), "-db"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        procs.append(proc)
        deadline = time.monotonic() + 5
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                return port
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError(f"haproxy did not start: {proc.stderr.read() if proc.stderr else b''!r}") from None
                time.sleep(0.02)

    yield start
    for proc in procs:
        proc.terminate()
        proc.wait(5)


@pytest.mark.parametrize(("option", "version"), [("send-proxy", 1), ("send-proxy-v2 proxy-v2-options unique-id", 2)])
def test_haproxy_chain_with_httpready(core: str, listen_sock: socket.socket, haproxy: object, option: str, version: int) -> None:
    backend = listen_sock.getsockname()[1]
    with wrap(listen_sock, ["proxy:trusted=127.0.0.1/32", "httpready"], core=core, timeout=3) as listener:
        listener.settimeout(5)
        front = haproxy(backend, option)  # type: ignore[operator]
        # The startup probe connected through HAProxy without a header's payload: drain what it caused.
        with socket.create_connection(("127.0.0.1", front)) as client:
            client.sendall(REQ[:10])
            time.sleep(0.1)
            client.sendall(REQ[10:])
            while True:
                sock, addr, info = listener.accept_with_info()
                if info.reason == "ready":
                    break
                sock.close()
            with sock:
                assert addr == client.getsockname()  # the real client, not HAProxy
                assert info.peer[0] == "127.0.0.1" and info.peer != addr  # HAProxy's own address
                assert info["balancer"] == info.peer
                assert info["proxy_version"] == version and info["method"] == "GET"
                if version == 2:
                    assert 5 in info["tlvs"]  # UNIQUE_ID
                assert info.consumed > 0
                sock.settimeout(3)
                assert sock.recv(1000) == REQ  # header consumed, request intact
                sock.sendall(b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n")
            client.settimeout(3)
            assert client.recv(100).startswith(b"HTTP/1.1 204")


def test_untrusted_and_missing_rejected(core: str, listen_sock: socket.socket) -> None:
    addr = listen_sock.getsockname()
    with wrap(listen_sock, "proxy:trusted=10.0.0.0/8", core=core, timeout=3) as listener:
        for payload in (V1 + REQ, REQ):
            with socket.create_connection(addr) as c:
                c.sendall(payload)
                c.settimeout(3)
                with contextlib.suppress(ConnectionResetError):
                    assert c.recv(10) == b""
        listener.settimeout(0.2)
        with pytest.raises(TimeoutError):
            listener.accept()
    with socket.create_server(("127.0.0.1", 0)) as ls2, wrap(ls2, "proxy:trusted=127.0.0.0/8", core=core, timeout=3) as l2:
        with socket.create_connection(ls2.getsockname()) as c:
            c.sendall(REQ)  # trusted, but no header
            c.settimeout(3)
            with contextlib.suppress(ConnectionResetError):
                assert c.recv(10) == b""
        l2.settimeout(0.2)
        with pytest.raises(TimeoutError):
            l2.accept()
