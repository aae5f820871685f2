"""dnsready: whole DNS-over-TCP messages, sans-IO and end to end."""

from __future__ import annotations

import socket
import struct

import pytest
from acceptfilter.filters.dnsready import DnsReady

from acceptfilter import Verdict, load_filter
from acceptfilter.listener import wrap

from .filterutil import assert_split_independent

A, R, W = Verdict.ACCEPT, Verdict.REJECT, Verdict.WAIT


def query(name: str, qtype: int = 1, qid: int = 0x1234, flags: int = 0x0100) -> bytes:
    qname = b"".join(bytes([len(p)]) + p.encode() for p in name.rstrip(".").split(".")) + b"\0"
    msg = struct.pack("!HHHHHH", qid, flags, 1, 0, 0, 0) + qname + struct.pack("!HH", qtype, 1)
    return struct.pack("!H", len(msg)) + msg


def test_info_and_split_independence() -> None:
    data = query("www.Example.org", 28, 0xBEEF)
    d = assert_split_independent(DnsReady(), data)
    assert d.verdict is A
    assert dict(d.info) == {"length": len(data) - 2, "id": 0xBEEF, "qname": "www.Example.org.", "qtype": "AAAA"}
    assert DnsReady().check(query("a.b", 4242), False).info["qtype"] == 4242
    # Bytes after the message (a pipelined second query) do not matter.
    assert DnsReady().check(data + b"\x00", False).info == d.info


@pytest.mark.parametrize(
    ("data", "strict", "verdict"),
    [
        (b"", True, W),
        (b"\x00", True, W),
        (b"\x00\x00", True, R),  # length 0
        (b"\x00\x00", False, A),
        (b"\x00\x05hello", True, R),  # shorter than a header
        (b"\x00\x05hello", False, A),
        (query("x.org", flags=0x8180), True, R),  # a response
        (query("x.org")[:-1], True, W),
        (b"\x00\x0e" + b"\x00" * 12 + b"\x05ab", True, R),  # label runs past
    ],
)
def test_verdicts(data: bytes, strict: bool, verdict: Verdict) -> None:
    assert DnsReady(strict=strict).check(data, False).verdict is verdict


def test_final_and_cap() -> None:
    flt = load_filter("dnsready:max_bytes=100")
    assert flt.check(query("x.org")[:-1], True).verdict is R
    assert flt.check(b"", True).verdict is R
    big = b"\x01\x00" + b"\x00" * 50  # announces 256 bytes > max_bytes
    d = flt.check(big, False)
    assert d.verdict is R and "max_bytes" in d.reason


def test_end_to_end(core: str, listen_sock: socket.socket) -> None:
    addr = listen_sock.getsockname()
    with wrap(listen_sock, "dnsready", core=core, timeout=2) as listener:
        listener.settimeout(3)
        data = query("example.com", 1, 7)
        with socket.create_connection(addr) as client:
            client.sendall(data[:5])
            with pytest.raises(TimeoutError):
                listener.settimeout(0.2)
                listener.accept()
            listener.settimeout(3)
            client.sendall(data[5:])
            sock, _, info = listener.accept_with_info()
            with sock:
                assert info.info == {"length": len(data) - 2, "id": 7, "qname": "example.com.", "qtype": "A"}
                assert sock.recv(100) == data  # peeked, not read
        with socket.create_connection(addr) as bad:
            bad.sendall(b"\x00\x00")
            bad.settimeout(3)
            assert bad.recv(10) == b""  # rejected: closed
