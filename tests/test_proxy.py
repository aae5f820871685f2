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
    assert d6.info["client_address"] == ("2001:db8::1", 1)  # an IPv4 listener: 2-tuples, as accept() gives
    unknown = flt().check(b"PROXY UNKNOWN\r\n", False)
    assert unknown.verdict is A and "client_address" not in unknown.info


def test_v2_info_tlvs_and_split_independence() -> None:
    tlvs = b"\x02" + struct.pack("!H", 11) + b"example.com" + b"\x01\x00\x02h2"
    data = v2(tlvs=tlvs)
    d = assert_split_independent(flt(), data + REQ)
    assert d.verdict is A and d.consume == len(data)
    assert d.info["client_address"] == ("192.0.2.7", 51234) and d.info["transport"] == "tcp4"
    assert d.info["authority"] == "example.com" and d.info["proxy_alpn"] == "h2"
    assert d.info["tlvs"] == {"2": b"example.com".hex(), "1": b"h2".hex()}
    local = flt().check(v2(cmd=0, fam=0, addr=b""), False)
    assert local.verdict is A and local.info["command"] == "LOCAL" and "client_address" not in local.info
    six = v2(fam=0x21, addr=socket.inet_pton(socket.AF_INET6, "2001:db8::7") + bytes(16) + struct.pack("!HH", 5, 6))
    assert flt().check(six, False).info["client_address"] == ("2001:db8::7", 5)


# -- issue 14, item 4 ---------------------------------------------------------
LB6 = ("::1", 40000, 0, 0)


@pytest.mark.parametrize(
    ("peer", "header", "want"),
    [
        (LB, b"PROXY TCP4 192.0.2.7 198.51.100.1 5 6\r\n", ("192.0.2.7", 5)),
        (LB, b"PROXY TCP6 2001:db8::7 ::1 5 6\r\n", ("2001:db8::7", 5)),
        (LB6, b"PROXY TCP4 192.0.2.7 198.51.100.1 5 6\r\n", ("192.0.2.7", 5, 0, 0)),
        (LB6, b"PROXY TCP6 2001:db8::7 ::1 5 6\r\n", ("2001:db8::7", 5, 0, 0)),
        (LB, v2(), ("192.0.2.7", 51234)),
        (LB6, v2(), ("192.0.2.7", 51234, 0, 0)),
    ],
)
def test_one_address_shape_per_listener_family(peer: tuple, header: bytes, want: tuple) -> None:  # type: ignore[type-arg]
    """The client address has the shape accept() gives on the listener's family, whatever the client's family."""
    d = Proxy(trusted=("127.0.0.0/8", "::1/128")).peer_session(peer).check(header + REQ, False)
    assert d.verdict is A and d.info["client_address"] == want
    host, port, *_ = d.info["client_address"]
    assert (host, port) == want[:2]


def test_end_to_end_address_shape_on_both_listener_families(core: str) -> None:
    """An IPv6 client behind an IPv4 listener is a 2-tuple; an IPv4 client behind an IPv6 listener a 4-tuple."""
    for family, host, header, want in (
        (socket.AF_INET, "127.0.0.1", b"PROXY TCP6 2001:db8::7 ::1 5 6\r\n", ("2001:db8::7", 5)),
        (socket.AF_INET6, "::1", b"PROXY TCP4 192.0.2.7 198.51.100.1 5 6\r\n", ("192.0.2.7", 5, 0, 0)),
    ):
        ls = socket.create_server((host, 0), family=family)
        with wrap(ls, ["proxy:trusted=127.0.0.1/32|::1/128", "httpready"], core=core, timeout=3) as listener:
            listener.settimeout(5)
            with socket.create_connection(ls.getsockname()[:2]) as c:
                c.sendall(header + REQ)
                sock, addr = listener.accept()
                sock.close()
            assert addr == want


def test_local_with_an_address_family_and_no_address_block_is_accepted() -> None:
    """The spec: a receiver ignores LOCAL's addresses; HAProxy's health checks send LOCAL."""
    for fam, addr in ((0x11, b""), (0x21, b""), (0x11, b"\x01\x02"), (0x11, bytes(12)), (0x00, b"")):
        d = flt().check(v2(cmd=0, fam=fam, addr=addr) + REQ, False)
        assert d.verdict is A and d.info["command"] == "LOCAL", (fam, addr)
        assert "client_address" not in d.info
        assert d.consume == 16 + len(addr)
    assert flt().check(v2(cmd=1, fam=0x11, addr=b""), False).verdict is R  # PROXY still needs its addresses


def _ssl_tlv(client: int = 0x07, verify: int = 0, subs: dict[int, bytes] | None = None) -> bytes:
    subs = {0x21: b"TLSv1.3", 0x22: b"client.example", 0x23: b"TLS_AES_256_GCM_SHA384", 0x24: b"RSA-SHA256",
            0x25: b"RSA2048"} if subs is None else subs
    value = bytes([client]) + struct.pack("!I", verify) + b"".join(bytes([k]) + struct.pack("!H", len(v)) + v for k, v in subs.items())
    return b"\x20" + struct.pack("!H", len(value)) + value


def test_ssl_tlv_sub_tlvs_in_info() -> None:
    d = flt().check(v2(tlvs=_ssl_tlv()) + REQ, False)
    assert d.verdict is A
    assert d.info["ssl"] == {"client": 7, "verify": 0, "tls": True, "client_cert": True, "version": "TLSv1.3",
                             "cn": "client.example", "cipher": "TLS_AES_256_GCM_SHA384", "sig_alg": "RSA-SHA256",
                             "key_alg": "RSA2048"}
    plain = flt().check(v2(tlvs=_ssl_tlv(client=0, subs={})), False)
    assert plain.info["ssl"] == {"client": 0, "verify": 0, "tls": False, "client_cert": False}
    for bad in (b"\x20\x00\x02\x01\x00", b"\x20\x00\x07\x01\x00\x00\x00\x00\x21\x00"):  # short; a sub-TLV cut
        d = flt().check(v2(tlvs=bad), False)
        assert d.verdict is A and d.info["ssl"] == {"malformed": True}  # the header is sound: reported, not rejected
    assert Proxy(trusted=("127.0.0.0/8",), verify_crc=True).peer_matcher(LB) is None  # the matcher cannot check a CRC
    assert Proxy(trusted=("127.0.0.0/8",)).peer_matcher(LB) is not None


def _with_crc(header: bytes, *, corrupt: bool = False) -> bytes:
    from acceptfilter.filters.proxy import crc32c

    blank = v2(tlvs=b"\x03\x00\x04\x00\x00\x00\x00")
    assert header == blank
    crc = crc32c(blank) ^ (1 if corrupt else 0)
    return blank[:-4] + struct.pack("!I", crc)


def test_crc32c_verification() -> None:
    from acceptfilter.filters.proxy import crc32c

    assert crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value (RFC 3720)
    blank = v2(tlvs=b"\x03\x00\x04\x00\x00\x00\x00")
    good, bad = _with_crc(blank), _with_crc(blank, corrupt=True)
    checked = flt(verify_crc=True).check(good + REQ, False)
    assert checked.verdict is A and checked.info["crc32c"] == "ok"
    assert flt(verify_crc=True).check(bad, False).verdict is R
    assert "CRC32C mismatch" in flt(verify_crc=True).check(bad, False).reason
    assert flt().check(bad, False).verdict is A  # not asked to verify
    assert flt(verify_crc=True).check(v2(), False).verdict is A  # no CRC TLV: optional
    assert load_filter("proxy:trusted=127.0.0.1,verify_crc=1").verify_crc is True


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
                    assert "5" in info["tlvs"]  # UNIQUE_ID
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


def _self_signed(tmp_path: Path, name: str) -> tuple[Path, Path]:
    key, crt = tmp_path / f"{name}.key", tmp_path / f"{name}.crt"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(crt),
                    "-days", "1", "-subj", f"/CN={name}"], check=True, capture_output=True)
    return key, crt


def test_haproxy_ssl_tlv_and_crc32c(core: str, listen_sock: socket.socket, tmp_path: Path) -> None:
    """HAProxy terminates TLS (with a client certificate) and sends PROXY v2 with the SSL TLV and a CRC32C."""
    import ssl

    exe = shutil.which("haproxy")
    if exe is None:
        pytest.skip("haproxy is not installed (requirements/apt-test.txt)")
    skey, scrt = _self_signed(tmp_path, "balancer.test")
    ckey, ccrt = _self_signed(tmp_path, "client.example")
    pem = tmp_path / "balancer.pem"
    pem.write_bytes(scrt.read_bytes() + skey.read_bytes())
    port = _free_port()
    cfg = tmp_path / "haproxy-ssl.cfg"
    cfg.write_text(
        "defaults\n  mode tcp\n  timeout connect 2s\n  timeout client 5s\n  timeout server 5s\n"
        f"frontend fe\n  bind 127.0.0.1:{port} ssl crt {pem} ca-file {ccrt} verify optional\n  default_backend be\n"
        f"backend be\n  server s1 127.0.0.1:{listen_sock.getsockname()[1]} send-proxy-v2 "
        "proxy-v2-options ssl,cert-cn,ssl-cipher,cert-sig,cert-key,crc32c\n"
    )
    proc = subprocess.Popen([exe, "-f", str(cfg), "-db"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.load_cert_chain(ccrt, ckey)
    try:
        with wrap(listen_sock, ["proxy:trusted=127.0.0.1/32,verify_crc=1", "httpready"], core=core, timeout=3) as listener:
            listener.settimeout(10)
            deadline = time.monotonic() + 10
            while True:
                try:
                    raw = socket.create_connection(("127.0.0.1", port), timeout=5)
                    break
                except OSError:
                    assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.stderr else b""
                    time.sleep(0.05)
            with ctx.wrap_socket(raw) as client:
                client.sendall(REQ)
                sock, addr, info = listener.accept_with_info()
                with sock:
                    assert info.reason == "ready" and info["method"] == "GET"
                    assert info["crc32c"] == "ok"
                    ssl_info = info["ssl"]
                    assert ssl_info["tls"] and ssl_info["client_cert"] and ssl_info["verify"] == 0
                    assert ssl_info["cn"] == "client.example"
                    assert ssl_info["version"] == client.version()
                    assert ssl_info["cipher"] == client.cipher()[0]  # type: ignore[index]
                    assert ssl_info["key_alg"].startswith("RSA") and "SHA256" in ssl_info["sig_alg"]
                    assert addr == client.getsockname()
    finally:
        proc.terminate()
        proc.wait(5)


def test_haproxy_check_send_proxy_health_checks_are_aborted_not_rejected(core: str, listen_sock: socket.socket,
                                                                        tmp_path: Path) -> None:
    """HAProxy's TCP checks with check-send-proxy: a 16-byte PROXY v2 LOCAL header, then an RST, every `inter`."""
    exe = shutil.which("haproxy")
    if exe is None:
        pytest.skip("haproxy is not installed (requirements/apt-test.txt)")
    port = _free_port()
    cfg = tmp_path / "haproxy-check.cfg"
    cfg.write_text(
        "defaults\n  mode tcp\n  timeout connect 2s\n  timeout client 5s\n  timeout server 5s\n"
        f"frontend fe\n  bind 127.0.0.1:{port}\n  default_backend be\n"
        f"backend be\n  server s1 127.0.0.1:{listen_sock.getsockname()[1]} send-proxy-v2 check check-send-proxy "
        "inter 100 fall 1000 rise 1\n"
    )
    with wrap(listen_sock, ["proxy:trusted=127.0.0.1/32", "httpready"], core=core, timeout=3) as listener:
        proc = subprocess.Popen([exe, "-f", str(cfg), "-db"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 20
            while listener.stats()["accepted"] < 10:
                assert time.monotonic() < deadline and proc.poll() is None, listener.stats()
                time.sleep(0.05)
        finally:
            proc.terminate()
            proc.wait(5)
        stats = listener.stats()
    assert stats["rejected"] == 0, stats  # a health check is not a hostile client
    assert stats["aborted"] >= 1 and stats["failed"] == 0, stats  # the peer's reset, not our fault
