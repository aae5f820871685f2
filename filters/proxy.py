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
* ``client_address`` and ``server_address`` (``(ip, port)``; absent for LOCAL,
  UNKNOWN and non-IP families), ``transport`` (``"tcp4"``, ``"tcp6"``, ...),
* ``balancer`` (the TCP peer that sent the header),
* ``tlvs`` (v2: ``{type: bytes}``), plus ``authority`` and ``proxy_alpn``
  when the TLVs carry them (the CRC32C TLV is not verified).

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
        max_bytes: int = 4096,
        timeout: float | None = None,
    ) -> None:
        super().__init__(max_bytes=max_bytes, timeout=timeout)
        if not trusted:
            raise ValueError("proxy needs trusted=NETWORK[|NETWORK...] (the balancers allowed to send a header)")
        self.trusted: tuple[Network, ...] = tuple(ipaddress.ip_network(n, strict=False) for n in trusted)
        self.allow_missing = allow_missing

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
        """Compiled, for trusted peers only (the check rejects everyone else): see :meth:`matcher`."""
        return self._matcher() if self.is_trusted(peer) else None

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
            client_address=_sockaddr(str(src_ip), ports[0]),
            server_address=_sockaddr(str(dst_ip), ports[1]),
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
        if len(body) < addr_len:
            return Decision.reject("PROXY v2: address block shorter than its family")
        if ver_cmd & 0x0F == 0:
            info["command"] = "LOCAL"
        else:
            info["command"] = "PROXY"
            if fam >> 4 in (1, 2):
                size = 4 if fam >> 4 == 1 else 16
                src = ipaddress.ip_address(body[:size])
                dst = ipaddress.ip_address(body[size : 2 * size])
                sport = int.from_bytes(body[2 * size : 2 * size + 2], "big")
                dport = int.from_bytes(body[2 * size + 2 : 2 * size + 4], "big")
                info["client_address"] = _sockaddr(str(src), sport)
                info["server_address"] = _sockaddr(str(dst), dport)
        tlvs: dict[int, bytes] = {}
        pos = addr_len
        while pos < len(body):
            if pos + 3 > len(body):
                return Decision.reject("PROXY v2: truncated TLV")
            kind, size = body[pos], int.from_bytes(body[pos + 1 : pos + 3], "big")
            if pos + 3 + size > len(body):
                return Decision.reject("PROXY v2: TLV runs past the header")
            tlvs[kind] = body[pos + 3 : pos + 3 + size]
            pos += 3 + size
        info["tlvs"] = tlvs
        if 0x02 in tlvs:
            info["authority"] = tlvs[0x02].decode("utf-8", "replace")
        if 0x01 in tlvs:
            info["proxy_alpn"] = tlvs[0x01].decode("latin-1")
        return Decision.accept(info, consume=total)


def _sockaddr(ip: str, port: int) -> tuple[str, int] | tuple[str, int, int, int]:
    """The address tuple ``socket.accept()`` would give for this client."""
    return (ip, port) if ":" not in ip else (ip, port, 0, 0)
