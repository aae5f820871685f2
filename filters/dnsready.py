"""dnsready: surface a connection once it has sent one whole DNS-over-TCP message.

FreeBSD's accf_dns(9) waits for the 2-byte big-endian length and that many
bytes. This one does the same and also reads the header and first question,
so ``info`` carries ``id`` (query id), ``qname`` (dotted, as sent, trailing dot),
``qtype`` (a name such as ``"A"``/``"AAAA"``, else the number) and ``length``.

``strict`` (default on) rejects a length of 0 or a message whose 12-byte
header cannot be there (length < 12), a response (QR bit set), or a question
section that cannot be parsed: a DNS server never wants those. With
``strict=0`` any complete message is surfaced, like FreeBSD.

At the end (EOF, deadline) an incomplete message is rejected; a message
longer than ``max_bytes - 2`` is rejected as soon as its length is known.
"""

from __future__ import annotations

from typing import Any

from acceptfilter.filter import WAIT, Decision, Filter
from acceptfilter.matcher import Builder, Program, length_prefixed

#: DNS-over-TCP messages are at most 65535 bytes, plus the 2-byte length.
DNS_MAX_BYTES = 65537

QTYPES = {
    1: "A", 2: "NS", 5: "CNAME", 6: "SOA", 12: "PTR", 15: "MX", 16: "TXT", 28: "AAAA", 33: "SRV",
    35: "NAPTR", 43: "DS", 46: "RRSIG", 47: "NSEC", 48: "DNSKEY", 52: "TLSA", 64: "SVCB", 65: "HTTPS",
    99: "SPF", 251: "IXFR", 252: "AXFR", 255: "ANY", 257: "CAA",
}  # fmt: skip


class DnsReady(Filter):
    """Wait for one whole DNS-over-TCP message (2-byte length + message)."""

    name = "dnsready"

    def __init__(self, *, strict: bool = True, max_bytes: int = 2 + 512 * 4, timeout: float | None = None) -> None:
        super().__init__(max_bytes=min(max_bytes, DNS_MAX_BYTES), timeout=timeout)
        self.strict = strict

    def check(self, data: bytes, final: bool) -> Decision:
        if len(data) > self.max_bytes:
            data = data[: self.max_bytes]
        if len(data) < 2:
            return Decision.reject("incomplete DNS length") if final or len(data) >= self.max_bytes else WAIT
        length = int.from_bytes(data[:2], "big")
        if self.strict and length < 12:
            return Decision.reject(f"DNS message length {length} is shorter than a header")
        if 2 + length > self.max_bytes:
            return Decision.reject(f"DNS message of {length} bytes larger than max_bytes={self.max_bytes}")
        if len(data) < 2 + length:
            return Decision.reject("incomplete DNS message") if final else WAIT
        msg = data[2 : 2 + length]
        info, problem = _parse(msg)
        if problem and self.strict:
            return Decision.reject(f"malformed DNS message: {problem}")
        return Decision.accept(info)

    def matcher(self) -> Program:
        """Compiled: one whole length-prefixed message; with ``strict`` also what ``_parse`` demands.

        strict: length >= 12, QR clear, QDCOUNT >= 1, and the first question's labels
        (uncompressed, each inside the message) plus type and class inside the message.
        Anything else is left to :meth:`check`.
        """
        if not self.strict:
            return length_prefixed(self.max_bytes, width=2, adjust=2)
        b = Builder(self.max_bytes)
        b.push(0, 2, adjust=2, lo=12).need_frame().skip(2)  # the message frame (2 + length <= max_bytes), all of it
        b.field(2, 1, mask=0x80, lo=0, hi=0)  # QR clear: a query
        b.field(4, 2, lo=1, hi=0xFFFF)  # QDCOUNT >= 1
        b.skip(12)
        b.label("label").jeq(0, 1, 0, "root")
        b.field(0, 1, mask=0xC0, lo=0, hi=0).vec(1).jump("label")  # a plain label inside the message
        b.label("root").skip(1 + 4)  # the root label, QTYPE and QCLASS
        return b.pop(exact=False).ready().build()


def _parse(msg: bytes) -> tuple[dict[str, Any], str]:
    """Header and first question; returns (info, problem) with problem "" when fine."""
    info: dict[str, Any] = {"length": len(msg)}
    if len(msg) < 12:
        return info, "no header"
    info["id"] = int.from_bytes(msg[0:2], "big")
    if msg[2] & 0x80:
        return info, "a response, not a query"
    qdcount = int.from_bytes(msg[4:6], "big")
    if qdcount == 0:
        return info, "no question"
    labels: list[str] = []
    pos = 12
    while True:
        if pos >= len(msg):
            return info, "question name runs past the message"
        n = msg[pos]
        pos += 1
        if n == 0:
            break
        if n & 0xC0:
            return info, "compressed or extended label in the question"
        if pos + n > len(msg):
            return info, "label runs past the message"
        labels.append(msg[pos : pos + n].decode("latin-1"))
        pos += n
    if pos + 4 > len(msg):
        return info, "question type/class missing"
    qtype = int.from_bytes(msg[pos : pos + 2], "big")
    info["qname"] = ".".join(labels) + "."
    info["qtype"] = QTYPES.get(qtype, qtype)
    return info, ""
