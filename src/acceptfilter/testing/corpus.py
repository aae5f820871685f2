"""Real first flights: what real clients of many protocols send first on a new TCP connection.

A filter that classifies connections (or a router of several) must say the
right thing about each of these: one port in front of SSH, SMTP, Redis and
HTTP sees them all. Each entry is the exact first flight of a real client
(or a byte-exact rendering of what the protocol's spec makes clients send),
so a filter author can run their filter over the lot::

    from acceptfilter.testing.corpus import FIRST_FLIGHTS
    for flight in FIRST_FLIGHTS.values():
        print(flight.name, my_filter.check(flight.data, False).verdict)

TLS hellos are made by this machine's OpenSSL (:func:`tls_client_hello`),
so they carry the key shares a current client sends. ``data == b""`` marks
a server-first protocol (MySQL, and SSH/SMTP clients before the banner in
some setups): the client says nothing until the server greets it.
"""

from __future__ import annotations

import ssl
import struct
from dataclasses import dataclass

__all__ = ["FIRST_FLIGHTS", "FirstFlight", "tls_client_hello"]


@dataclass(frozen=True)
class FirstFlight:
    """One protocol's first bytes; ``protocol`` is the family a router should recognise."""

    name: str
    protocol: str
    data: bytes
    note: str = ""


def tls_client_hello(*, version: ssl.TLSVersion = ssl.TLSVersion.TLSv1_3, sni: str = "example.test",
                     alpn: tuple[str, ...] = ("h2", "http/1.1")) -> bytes:
    """The ClientHello this machine's OpenSSL sends (no socket: a memory BIO)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.maximum_version = version
    if alpn:
        ctx.set_alpn_protocols(list(alpn))
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname=sni)
    try:
        obj.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


def _dns_query(name: str, qtype: int = 1, qid: int = 0x1234) -> bytes:
    question = b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\x00" + struct.pack(">HH", qtype, 1)
    msg = struct.pack(">HHHHHH", qid, 0x0100, 1, 0, 0, 0) + question
    return struct.pack(">H", len(msg)) + msg


def _mqtt_connect(client_id: bytes = b"sensor-1") -> bytes:
    var = b"\x00\x04MQTT\x04\x02\x00\x3c"  # protocol name, level 4 (3.1.1), clean session, keep-alive 60
    payload = struct.pack(">H", len(client_id)) + client_id
    body = var + payload
    return b"\x10" + bytes([len(body)]) + body


def _pg_startup() -> bytes:
    params = b"user\x00alice\x00database\x00shop\x00application_name\x00psql\x00\x00"
    body = struct.pack(">I", 196608) + params  # protocol 3.0
    return struct.pack(">I", len(body) + 4) + body


def _proxy_v2(payload: bytes) -> bytes:
    addr = bytes([203, 0, 113, 7, 10, 0, 0, 1]) + struct.pack(">HH", 5555, 443)
    return b"\r\n\r\n\x00\r\nQUIT\n" + bytes([0x21, 0x11]) + struct.pack(">H", len(addr)) + addr + payload


_H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_H2_SETTINGS = b"\x00\x00\x0c\x04\x00\x00\x00\x00\x00\x00\x03\x00\x00\x00\x64\x00\x04\x00\x10\x00\x00"
# A HEADERS frame for POST /helloworld.Greeter/SayHello with content-type application/grpc (HPACK, literal).
_GRPC_HEADERS_BLOCK = (
    b"\x83\x86"  # :method POST, :scheme http
    b"\x44\x1c/helloworld.Greeter/SayHello"  # :path (literal, incremental indexing, name index 4)
    b"\x41\x0elocalhost:50051"  # :authority
    b"\x5f\x10application/grpc"  # content-type
    b"\x40\x02te\x08trailers"  # te: trailers
)
_GRPC_HEADERS = struct.pack(">I", len(_GRPC_HEADERS_BLOCK))[1:] + b"\x01\x04" + struct.pack(">I", 1) + _GRPC_HEADERS_BLOCK


def _flights() -> dict[str, FirstFlight]:
    items = [
        FirstFlight("ssh-debian", "ssh", b"SSH-2.0-OpenSSH_9.2p1 Debian-2+deb12u10\r\n",
                    "Debian/Ubuntu OpenSSH: a comment after a space, so it looks like 'token SP word CRLF'"),
        FirstFlight("ssh-plain", "ssh", b"SSH-2.0-OpenSSH_9.6\r\n"),
        FirstFlight("ssh-putty", "ssh", b"SSH-2.0-PuTTY_Release_0.81\r\n"),
        FirstFlight("smtp-ehlo", "smtp", b"EHLO client.example\r\n", "after the banner; SMTP is server-first"),
        FirstFlight("smtp-helo", "smtp", b"HELO client.example\r\n"),
        FirstFlight("imap-capability", "imap", b"a001 CAPABILITY\r\n", "after the greeting"),
        FirstFlight("imap-login", "imap", b"a001 LOGIN alice secret\r\n"),
        FirstFlight("pop3-capa", "pop3", b"CAPA\r\n"),
        FirstFlight("pop3-user", "pop3", b"USER alice\r\n"),
        FirstFlight("redis-inline", "redis", b"PING\r\n"),
        FirstFlight("redis-inline-get", "redis", b"GET key\r\n",
                    "an inline GET: 'GET SP word CRLF' is also an HTTP/0.9 request; nothing can tell them apart"),
        FirstFlight("redis-array", "redis", b"*2\r\n$3\r\nGET\r\n$3\r\nkey\r\n"),
        FirstFlight("memcached-text", "memcached", b"get foo\r\n"),
        FirstFlight("memcached-binary", "memcached",
                    b"\x80\x00\x00\x03\x00\x00\x00\x00\x00\x00\x00\x03\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00foo"),
        FirstFlight("postgres-sslrequest", "postgres", b"\x00\x00\x00\x08\x04\xd2\x16\x2f"),
        FirstFlight("postgres-startup", "postgres", _pg_startup()),
        FirstFlight("mysql", "mysql", b"", "server-first: the client waits for the server's handshake"),
        FirstFlight("mqtt-connect", "mqtt", _mqtt_connect()),
        FirstFlight("socks4", "socks", b"\x04\x01\x00\x50\x7f\x00\x00\x01alice\x00"),
        FirstFlight("socks5", "socks", b"\x05\x02\x00\x02"),
        FirstFlight("rdp", "rdp", b"\x03\x00\x00\x13\x0e\xe0\x00\x00\x00\x00\x00\x01\x00\x08\x00\x03\x00\x00\x00",
                    "TPKT + X.224 Connection Request with an RDP negotiation request"),
        FirstFlight("tls12-hello", "tls", tls_client_hello(version=ssl.TLSVersion.TLSv1_2)),
        FirstFlight("tls13-hello", "tls", tls_client_hello()),
        FirstFlight("http11-get", "http", b"GET / HTTP/1.1\r\nHost: example.test\r\nUser-Agent: curl/7.88.1\r\nAccept: */*\r\n\r\n"),
        FirstFlight("http10-head", "http", b"HEAD /index.html HTTP/1.0\r\n\r\n"),
        FirstFlight("http09-get", "http", b"GET /\r\n"),
        FirstFlight("websocket-upgrade", "http",
                    b"GET /chat HTTP/1.1\r\nHost: example.test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"),
        FirstFlight("h2-preface", "http", _H2_PREFACE + _H2_SETTINGS),
        FirstFlight("grpc-h2c", "http", _H2_PREFACE + _H2_SETTINGS + _GRPC_HEADERS),
        FirstFlight("proxy-v1", "proxy", b"PROXY TCP4 203.0.113.7 10.0.0.1 5555 80\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n"),
        FirstFlight("proxy-v2", "proxy", _proxy_v2(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")),
        FirstFlight("dns-query", "dns", _dns_query("example.test")),
        FirstFlight("garbage-nul", "garbage", b"\x00"),
    ]
    return {f.name: f for f in items}


#: Every flight by name, in a stable order.
FIRST_FLIGHTS: dict[str, FirstFlight] = _flights()
