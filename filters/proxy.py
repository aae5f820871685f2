"""proxy: read (and consume) a PROXY protocol v1 or v2 header from a trusted balancer.

The PROXY protocol spec forbids guessing: a header is accepted only from the
configured ``trusted`` source networks (required, e.g.
``proxy:trusted=127.0.0.0/8|::1/128``), and from them it is required. So the
filter needs the connection's peer address: it sets ``needs_peer`` and the
engine hands the address to :meth:`Proxy.peer_session` (still no socket here).

On ACCEPT the whole header is **consumed** (the application, and the next
filter of a chain, see the stream after it), ``accept()`` returns the real
client address and ``info`` carries:

* ``proxy_version`` (1 or 2), ``command`` (``"PROXY"`` or ``"LOCAL"``/``"UNKNOWN"``),
* ``client_address`` and ``server_address`` (absent for LOCAL, UNKNOWN and
  non-IP families), ``transport`` (``"tcp4"``, ``"tcp6"``, ...),
* ``balancer`` (the TCP peer that sent the header),
* ``tlvs`` (v2: ``{"type": "hex of the value"}``, plain JSON like all info), plus ``authority`` and ``proxy_alpn``
  when the TLVs carry them, and ``ssl`` for the SSL TLV (0x20; ``{"malformed": True}``
  when it cannot be parsed, the header being sound otherwise): a dict with
  ``client`` (the PP2_CLIENT_* bit field), ``verify`` (0: the client
  certificate verified), ``tls`` (the connection used TLS), ``client_cert``
  (a certificate was presented, on this connection or its session) and its
  sub-TLVs ``version``, ``cn``, ``cipher``, ``sig_alg``, ``key_alg`` when
  sent (HAProxy's ``proxy-v2-options ssl,cert-cn,ssl-cipher,cert-sig,cert-key``).
* With ``verify_crc=1`` a header carrying the CRC32C TLV (0x03) is checked
  (the checksum of the whole header with that field zeroed) and rejected
  when it does not match; a header without one is accepted, since the TLV is
  optional. ``info["crc32c"]`` says ``"ok"`` when it was checked.

The address shape follows the listener's family, like ``socket.accept()``
would give it there, whichever family the client has: on an ``AF_INET``
listener ``(host, port)`` (an IPv6 client too: ``("2001:db8::7", 5)``), on
an ``AF_INET6`` listener ``(host, port, flowinfo, scope_id)`` (an IPv4 client
too: ``("192.0.2.7", 5, 0, 0)``). So ``host, port = addr`` works on an IPv4
listener and ``host, port, *_ = addr`` on both; ``host`` is the address as the
header gives it (dotted IPv4, compressed IPv6).

A LOCAL command (a balancer's own health check) is accepted whatever its
address family, with or without an address block: the spec says the
receiver ignores the addresses of LOCAL and uses the connection's own.

Rejected: a connection from an untrusted peer (or an unknown one), a
malformed header, a missing header — unless ``allow_missing=1``, which lets
a trusted peer connect without a header (then ``proxy_version`` is None).
At the end (EOF, deadline) an incomplete header is rejected.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any

from acceptfilter.filter import WAIT, Decision, Filter
from acceptfilter.matcher import Builder, Program

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V1_PREFIX = b"PROXY "
V1_MAX = 107  # the spec's longest v1 line, CRLF included

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
_V1 = re.compile(
    rb"PROXY (?:(TCP4|TCP6) ([0-9a-fA-F.:]+) ([0-9a-fA-F.:]+) ([0-9]{1,5}) ([0-9]{1,5})|UNKNOWN[^\r\n]*)\r\n"
)
_FAMILIES = {0x11: "tcp4", 0x12: "udp4", 0x21: "tcp6", 0x22: "udp6", 0x31: "unix-stream", 0x32: "unix-dgram", 0x00: "unspec"}


class Proxy(Filter):
    """Consume a PROXY protocol v1/v2 header from trusted balancers; real client address."""

    name = "proxy"
    needs_peer = True

    def __init__(
        self,
        *,
        trusted: tuple[str, ...] = (),
        allow_missing: bool = False,
        verify_crc: bool = False,
        max_bytes: int = 4096,
        timeout: float | None = None,
    ) -> None:
        super().__init__(max_bytes=max_bytes, timeout=timeout)
        if not trusted:
            raise ValueError("proxy needs trusted=NETWORK[|NETWORK...] (the balancers allowed to send a header)")
        self.trusted: tuple[Network, ...] = tuple(ipaddress.ip_network(n, strict=False) for n in trusted)
        self.allow_missing = allow_missing
        #: Check the CRC32C TLV when a v2 header carries one.
        self.verify_crc = verify_crc

    def is_trusted(self, peer: Any) -> bool:
        """Whether a socket address (``(host, port, ...)``) is in a trusted network."""
        if not isinstance(peer, tuple) or not peer:
            return False
        try:
            ip = ipaddress.ip_address(str(peer[0]).split("%")[0])
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip in net for net in self.trusted)

    def peer_session(self, peer: Any) -> _ProxySession:
        return _ProxySession(self, peer)

    def session(self) -> _ProxySession:
        return _ProxySession(self, None)  # without a peer nobody is trusted

    def check(self, data: bytes, final: bool) -> Decision:
        return self.session().check(data, final)

    def peer_matcher(self, peer: Any) -> Program | None:
        """Compiled, for trusted peers only (the check rejects everyone else): see :meth:`matcher`.

        None with ``verify_crc=1``: the check then rejects a header whose
        CRC32C is wrong, which the matcher cannot compute.
        """
        return self._matcher() if self.is_trusted(peer) and not self.verify_crc else None

    def matcher(self) -> Program | None:
        """None: without a peer nobody is trusted; the engine asks :meth:`peer_matcher`."""
        return None

    def _matcher(self) -> Program:
        """v2 PROXY over TCP4/TCP6 (address block, TLVs exactly to the end) and v1 UNKNOWN; consumed.

        v2 LOCAL, other families and v1 TCP4/TCP6 (whose addresses need ``ipaddress``) are
        left to :meth:`check`, so the matcher stays sound whatever those rules become.
        """
        b = Builder(self.max_bytes)
        b.jeq(0, 1, ord("P"), "v1")
        b.lit(V2_SIGNATURE).eq(0, 1, 0x21)  # version 2, command PROXY
        b.jeq(1, 1, 0x11, "tcp4").jeq(1, 1, 0x21, "tcp6").fail()
        b.label("tcp4").push(2, 2, adjust=4).need_frame().skip(4 + 12).jump("tlv")  # frame: 16 + length
        b.label("tcp6").push(2, 2, adjust=4).need_frame().skip(4 + 36)
        b.label("tlv").jge_end("end").skip(1).vec(2).jump("tlv")  # (type, vec2) exactly to the end
        b.label("end").pop().ready(consume=True)
        no_crlf = [c for c in range(256) if c not in (0x0D, 0x0A)]
        b.label("v1").lit(b"PROXY UNKNOWN").run(no_crlf, 0, V1_MAX - 15).lit(b"\r\n")
        return b.ready(consume=True).build()


class _ProxySession:
    __slots__ = ("_filter", "_peer", "_trusted")

    def __init__(self, flt: Proxy, peer: Any) -> None:
        self._filter = flt
        self._peer = peer
        self._trusted = flt.is_trusted(peer)

    def check(self, data: bytes, final: bool) -> Decision:
        if not self._trusted:
            return Decision.reject(f"PROXY header source {self._peer!r} is not trusted")
        if len(data) > self._filter.max_bytes:
            data = data[: self._filter.max_bytes]
        decision = self._scan(data)
        if decision is WAIT and len(data) >= self._filter.max_bytes:
            return Decision.reject(f"PROXY header larger than max_bytes={self._filter.max_bytes}")
        if decision is WAIT and final:
            if not data:
                return self._missing()
            return Decision.reject("incomplete PROXY header")
        return decision

    def _missing(self) -> Decision:
        if self._filter.allow_missing:
            return Decision.accept({"proxy_version": None, "balancer": self._peer}, reason="no PROXY header (allowed)")
        return Decision.reject("no PROXY header")

    def _scan(self, data: bytes) -> Decision:
        n = min(len(data), len(V2_SIGNATURE))
        if data[:n] == V2_SIGNATURE[:n] and n:
            return WAIT if n < len(V2_SIGNATURE) else self._v2(data)
        n = min(len(data), len(V1_PREFIX))
        if data[:n] == V1_PREFIX[:n] and n:
            return WAIT if n < len(V1_PREFIX) else self._v1(data)
        return WAIT if not data else self._missing()

    def _v1(self, data: bytes) -> Decision:
        end = data.find(b"\r\n", 0, V1_MAX)
        if end < 0:
            if len(data) >= V1_MAX or b"\n" in data[:V1_MAX]:
                return Decision.reject("malformed PROXY v1 header: no CRLF within 107 bytes")
            return WAIT
        match = _V1.fullmatch(data, 0, end + 2)
        if match is None:
            return Decision.reject("malformed PROXY v1 header")
        info: dict[str, Any] = {"proxy_version": 1, "balancer": self._peer}
        if match.group(1) is None:
            info["command"] = "UNKNOWN"
            return Decision.accept(info, consume=end + 2)
        proto, src, dst, sport, dport = (g.decode("ascii") for g in match.groups())
        try:
            src_ip, dst_ip = ipaddress.ip_address(src), ipaddress.ip_address(dst)
        except ValueError:
            return Decision.reject("malformed PROXY v1 address")
        version = 4 if proto == "TCP4" else 6
        ports = [int(sport), int(dport)]
        bad_port = any(p > 65535 or (len(s) > 1 and s[0] == "0") for p, s in zip(ports, (sport, dport), strict=True))
        if src_ip.version != version or dst_ip.version != version or bad_port:
            return Decision.reject("malformed PROXY v1 address or port")
        info.update(
            command="PROXY",
            transport=proto.lower(),
            client_address=_sockaddr(str(src_ip), ports[0], self._peer),
            server_address=_sockaddr(str(dst_ip), ports[1], self._peer),
        )
        return Decision.accept(info, consume=end + 2)

    def _v2(self, data: bytes) -> Decision:
        if len(data) < 16:
            return WAIT if len(data) < 13 or data[12] >> 4 == 2 else Decision.reject("PROXY v2: bad version")
        ver_cmd, fam = data[12], data[13]
        length = int.from_bytes(data[14:16], "big")
        if ver_cmd >> 4 != 2 or ver_cmd & 0x0F > 1:
            return Decision.reject("PROXY v2: bad version or command")
        if fam not in _FAMILIES:
            return Decision.reject(f"PROXY v2: unknown address family 0x{fam:02x}")
        total = 16 + length
        if total > self._filter.max_bytes:
            return Decision.reject(f"PROXY v2 header of {total} bytes larger than max_bytes={self._filter.max_bytes}")
        if len(data) < total:
            return WAIT
        body = data[16:total]
        info: dict[str, Any] = {"proxy_version": 2, "balancer": self._peer, "transport": _FAMILIES[fam]}
        addr_len = {0x1: 12, 0x2: 36, 0x3: 216}.get(fam >> 4, 0)
        if ver_cmd & 0x0F == 0:
            # LOCAL: the addresses (if any) are to be ignored; so is a short block.
            info["command"] = "LOCAL"
            addr_len = min(addr_len, len(body))
        elif len(body) < addr_len:
            return Decision.reject("PROXY v2: address block shorter than its family")
        else:
            info["command"] = "PROXY"
            if fam >> 4 in (1, 2):
                size = 4 if fam >> 4 == 1 else 16
                src = ipaddress.ip_address(body[:size])
                dst = ipaddress.ip_address(body[size : 2 * size])
                sport = int.from_bytes(body[2 * size : 2 * size + 2], "big")
                dport = int.from_bytes(body[2 * size + 2 : 2 * size + 4], "big")
                info["client_address"] = _sockaddr(str(src), sport, self._peer)
                info["server_address"] = _sockaddr(str(dst), dport, self._peer)
        tlvs = _tlvs(body, addr_len)
        if tlvs is None:
            return Decision.reject("PROXY v2: truncated TLV or TLV running past the header")
        info["tlvs"] = {str(kind): value.hex() for kind, value in tlvs.items()}  # info is plain JSON data
        if 0x02 in tlvs:
            info["authority"] = tlvs[0x02].decode("utf-8", "replace")
        if 0x01 in tlvs:
            info["proxy_alpn"] = tlvs[0x01].decode("latin-1")
        if 0x20 in tlvs:
            # A malformed SSL TLV is reported, not rejected: the header itself is
            # well formed (the compiled matcher accepts it), only its TLS details are lost.
            ssl = _ssl_info(tlvs[0x20])
            info["ssl"] = ssl if ssl is not None else {"malformed": True}
        if self._filter.verify_crc and 0x03 in tlvs:
            if len(tlvs[0x03]) != 4:
                return Decision.reject("PROXY v2: CRC32C TLV is not 4 bytes")
            pos = _tlv_offset(body, addr_len, 0x03)
            zeroed = data[: 16 + pos + 3] + b"\0\0\0\0" + data[16 + pos + 7 : total]
            if crc32c(zeroed) != int.from_bytes(tlvs[0x03], "big"):
                return Decision.reject("PROXY v2: CRC32C mismatch")
            info["crc32c"] = "ok"
        return Decision.accept(info, consume=total)


# PP2_SUBTYPE_SSL_*: the sub-TLVs of the SSL TLV.
_SSL_SUBTYPES = {0x21: "version", 0x22: "cn", 0x23: "cipher", 0x24: "sig_alg", 0x25: "key_alg"}


def _tlvs(body: bytes, pos: int) -> dict[int, bytes] | None:
    """Type -> value from ``pos`` to the end of ``body``; None when a TLV is truncated."""
    tlvs: dict[int, bytes] = {}
    while pos < len(body):
        if pos + 3 > len(body):
            return None
        kind, size = body[pos], int.from_bytes(body[pos + 1 : pos + 3], "big")
        if pos + 3 + size > len(body):
            return None
        tlvs[kind] = body[pos + 3 : pos + 3 + size]
        pos += 3 + size
    return tlvs


def _tlv_offset(body: bytes, pos: int, wanted: int) -> int:
    """Offset in ``body`` of the (last) TLV of type ``wanted``; the TLVs are known to be well formed."""
    found = -1
    while pos < len(body):
        if body[pos] == wanted:
            found = pos
        pos += 3 + int.from_bytes(body[pos + 1 : pos + 3], "big")
    return found


def _ssl_info(value: bytes) -> dict[str, Any] | None:
    """PP2_TYPE_SSL: client (1 byte), verify (4 bytes), then sub-TLVs."""
    if len(value) < 5:
        return None
    client = value[0]
    out: dict[str, Any] = {
        "client": client,
        "verify": int.from_bytes(value[1:5], "big"),
        "tls": bool(client & 0x01),
        "client_cert": bool(client & 0x06),
    }
    subs = _tlvs(value, 5)
    if subs is None:
        return None
    for kind, raw in subs.items():
        if kind in _SSL_SUBTYPES:
            out[_SSL_SUBTYPES[kind]] = raw.decode("utf-8", "replace")
    return out


def _crc32c_table() -> list[int]:
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_CRC32C = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli), as the PROXY v2 CRC32C TLV carries it; headers are small, a table is enough."""
    crc = 0xFFFFFFFF
    table = _CRC32C
    for byte in data:
        crc = (crc >> 8) ^ table[(crc ^ byte) & 0xFF]
    return crc ^ 0xFFFFFFFF


def _sockaddr(ip: str, port: int, peer: Any) -> tuple[str, int] | tuple[str, int, int, int]:
    """The client address in the shape of the listener's family (the balancer's address shows it).

    ``socket.accept()`` gives 2-tuples on an AF_INET listener and 4-tuples on
    an AF_INET6 one; code written for the listener keeps working whatever
    family the proxied client has. Without a known peer: by the client's family.
    """
    if isinstance(peer, tuple) and len(peer) in (2, 4):
        return (ip, port) if len(peer) == 2 else (ip, port, 0, 0)
    return (ip, port) if ":" not in ip else (ip, port, 0, 0)
