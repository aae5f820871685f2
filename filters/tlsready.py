"""tlsready: surface a connection once it has sent a complete TLS ClientHello.

FreeBSD's accf_tls(9) waits for one TLS record and does not parse it. A
post-quantum ClientHello (X25519MLKEM768 key shares) is ~2 KB and may span
several TCP segments, and a padded one several records, so this filter
reassembles the handshake message across records and segments and parses it.

``info``: ``protocol`` (``"tls"``), ``sni`` (or None), ``alpn`` (list),
``versions`` (offered, e.g. ``["TLSv1.3", "TLSv1.2"]``), ``ciphers`` (cipher
suite count, GREASE excluded) and ``ja4`` (the FoxIO JA4 fingerprint).

* First bytes that are not a TLS handshake record pass at once with
  ``{"protocol": "unknown"}`` (like FreeBSD), or are rejected with
  ``non_tls=reject``.
* ``sni=a.example|*.example.org`` rejects a ClientHello whose SNI is missing
  or matches none of the names (case-insensitive; ``*.x`` matches any name
  ending in ``.x``, not ``x`` itself).
* A ClientHello that cannot fit in ``max_bytes`` (default 16 KiB; records
  included) is rejected with a reason saying so, as soon as its length is
  known. A malformed record or message is rejected; at the end (EOF,
  deadline) an incomplete ClientHello is rejected. A rejected hello is closed
  as ``on_reject`` says: ``close`` (the default) reads what is unread first, so
  the client sees a clean FIN (an unexpected EOF to OpenSSL), ``reset`` an RST.
"""

from __future__ import annotations

import hashlib
from typing import Any

from acceptfilter.filter import DEFAULT_MAX_BYTES, WAIT, Decision, Filter
from acceptfilter.matcher import Builder, Program

_RECORD_MAX = 16384 + 2048  # TLSCiphertext bound; a ClientHello record is plaintext (2^14)
_VERSION_NAMES = {0x0304: "TLSv1.3", 0x0303: "TLSv1.2", 0x0302: "TLSv1.1", 0x0301: "TLSv1.0", 0x0300: "SSLv3"}
_JA4_VERSIONS = {0x0304: "13", 0x0303: "12", 0x0302: "11", 0x0301: "10", 0x0300: "s3", 0x0002: "s2"}


class TlsReady(Filter):
    """Wait for a complete TLS ClientHello (any number of records); SNI, ALPN, JA4."""

    name = "tlsready"

    def __init__(
        self,
        *,
        non_tls: str = "accept",
        sni: tuple[str, ...] = (),
        max_bytes: int = DEFAULT_MAX_BYTES,
        timeout: float | None = None,
    ) -> None:
        super().__init__(max_bytes=max_bytes, timeout=timeout)
        if non_tls not in ("accept", "reject"):
            raise ValueError(f"non_tls must be 'accept' or 'reject', not {non_tls!r}")
        self.non_tls = non_tls
        self.sni = tuple(s.lower().rstrip(".") for s in sni)

    def check(self, data: bytes, final: bool) -> Decision:
        if len(data) > self.max_bytes:
            data = data[: self.max_bytes]
        decision = self._scan(data)
        if decision is WAIT and len(data) >= self.max_bytes:
            return Decision.reject(f"ClientHello larger than max_bytes={self.max_bytes}")
        if decision is WAIT and final:
            return Decision.reject("incomplete ClientHello")
        return decision

    def _non_tls(self) -> Decision:
        if self.non_tls == "reject":
            return Decision.reject("not TLS")
        return Decision.pass_through({"protocol": "unknown"}, reason="not TLS, passed")

    def _scan(self, data: bytes) -> Decision:
        if not data:
            return WAIT
        if data[0] != 0x16 or (len(data) > 1 and data[1] != 0x03):
            return self._non_tls()
        hs = bytearray()
        need = -1  # handshake message length (header included) once known
        pos = 0
        records = 0
        while need < 0 or len(hs) < need:
            head = data[pos : pos + 2]
            if head[:1] not in (b"", b"\x16") or head[1:] not in (b"", b"\x03"):
                return Decision.reject("non-handshake record inside the ClientHello")
            if pos + 5 > len(data):
                return WAIT
            length = int.from_bytes(data[pos + 3 : pos + 5], "big")
            if length == 0 or length > _RECORD_MAX:
                return Decision.reject(f"bad TLS record length {length}")
            pos += 5
            records += 1
            hs += data[pos : pos + length]
            pos += length
            if need < 0 and len(hs) >= 4:
                if hs[0] != 0x01:
                    return Decision.reject(f"handshake type {hs[0]} is not a ClientHello")
                need = 4 + int.from_bytes(hs[1:4], "big")
                # Fewest bytes it can take: every record carries a 5-byte header.
                if need + 5 * records > self.max_bytes:
                    return Decision.reject(f"ClientHello of {need} bytes larger than max_bytes={self.max_bytes}")
            if pos > len(data):
                return WAIT
        info = _parse_client_hello(bytes(hs[4:need]))
        if info is None:
            return Decision.reject("malformed ClientHello")
        if self.sni and not _sni_allowed(info["sni"], self.sni):
            return Decision.reject(f"SNI {info['sni']!r} not allowed")
        return Decision.accept(info)

    def matcher(self) -> Program | None:
        """Compiled: a ClientHello in ONE record whose structure ``_parse`` accepts; None with ``sni=``.

        The check rejects a malformed ClientHello, so the matcher walks the same structure:
        record header, handshake header, the fixed fields, the extension block exactly,
        and inside the extensions the check parses (server_name, ALPN,
        supported_versions, signature_algorithms) the vectors it reads. A ClientHello
        spread over several records, and every SNI allow-list, is left to :meth:`check`.
        """
        if self.sni:
            return None
        b = Builder(self.max_bytes)
        b.eq(0, 1, 0x16).eq(1, 1, 0x03)
        b.push(3, 2, adjust=5, lo=1, hi=_RECORD_MAX).skip(5)  # frame 1: the record
        b.eq(0, 1, 0x01)  # a ClientHello
        b.push(1, 3, adjust=4)  # frame 2: the handshake message, inside this one record
        # Only now wait for the whole message: the check decides on the type and length before
        # it is complete, and the matcher must not say MORE (no Python) where the check decides.
        b.need_frame().skip(4)
        b.skip(2 + 32).vec(1).vec(2).vec(1)  # version, random, session id, cipher suites, compression
        b.jge_end("hello_end")
        b.push(0, 2, adjust=2).skip(2)  # frame 3: the extension block
        b.label("ext").jge_end("ext_end")
        b.jeq(0, 2, 0, "sni").jeq(0, 2, 16, "alpn").jeq(0, 2, 43, "versions").jeq(0, 2, 13, "sigalgs")
        b.skip(2).vec(2).jump("ext")  # any other extension: type, opaque data
        # server_name: data (frame 4) holding a list (frame 5) of (type, vec2) up to its end
        b.label("sni").skip(2).push(0, 2, adjust=2).skip(2).push(0, 2, adjust=2).skip(2)
        b.label("sni_item").jge_end("list_end").skip(1).vec(2).jump("sni_item")
        # ALPN: data (frame 4) holding a list (frame 5) of vec1 up to its end
        b.label("alpn").skip(2).push(0, 2, adjust=2).skip(2).push(0, 2, adjust=2).skip(2)
        b.label("alpn_item").jge_end("list_end").vec(1).jump("alpn_item")
        b.label("list_end").pop().pop(exact=False).jump("ext")
        b.label("versions").skip(2).push(0, 2, adjust=2).skip(2).vec(1).pop(exact=False).jump("ext")
        b.label("sigalgs").skip(2).push(0, 2, adjust=2).skip(2).vec(2).pop(exact=False).jump("ext")
        b.label("ext_end").pop()  # the block ends exactly at its length
        b.label("hello_end").pop()  # no trailing bytes after the extensions
        return b.pop(exact=False).ready().build()  # the whole record is there


def _sni_allowed(sni: str | None, allowed: tuple[str, ...]) -> bool:
    if not sni:
        return False
    name = sni.lower().rstrip(".")
    for pattern in allowed:
        if pattern.startswith("*."):
            if name.endswith(pattern[1:]) and len(name) > len(pattern) - 1:
                return True
        elif name == pattern:
            return True
    return False


def _grease(value: int) -> bool:
    """RFC 8701 GREASE values (0x0a0a, 0x1a1a, ... 0xfafa) are ignored, as JA4 says."""
    return value & 0x0F0F == 0x0A0A and value >> 8 == value & 0xFF


def _u16_list(buf: bytes) -> list[int]:
    return [int.from_bytes(buf[i : i + 2], "big") for i in range(0, len(buf) - 1, 2)]


class _Reader:
    """Bounds-checked reads; any overrun raises IndexError, caught by the parser."""

    def __init__(self, buf: bytes) -> None:
        self.buf = buf
        self.pos = 0

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.buf):
            raise IndexError(n)
        out = self.buf[self.pos : self.pos + n]
        self.pos += n
        return out

    def num(self, n: int) -> int:
        return int.from_bytes(self.take(n), "big")

    def vec(self, n: int) -> bytes:
        return self.take(self.num(n))

    @property
    def left(self) -> int:
        return len(self.buf) - self.pos


def _parse_client_hello(body: bytes) -> dict[str, Any] | None:
    try:
        return _parse(body)
    except (IndexError, ValueError):
        return None


def _parse(body: bytes) -> dict[str, Any]:
    r = _Reader(body)
    legacy_version = r.num(2)
    r.take(32)  # random
    r.vec(1)  # legacy_session_id
    ciphers = [c for c in _u16_list(r.vec(2)) if not _grease(c)]
    r.vec(1)  # compression methods
    extensions: list[int] = []
    sni: str | None = None
    alpn: list[str] = []
    versions: list[int] = []
    sigalgs: list[int] = []
    if r.left:
        ext = _Reader(r.vec(2))
        while ext.left:
            etype = ext.num(2)
            edata = _Reader(ext.vec(2))
            if _grease(etype):
                continue
            extensions.append(etype)
            if etype == 0:  # server_name
                names = _Reader(edata.vec(2))
                while names.left:
                    kind, name = names.num(1), names.vec(2)
                    if kind == 0 and sni is None:
                        sni = name.decode("ascii", "replace")
            elif etype == 16:  # ALPN
                protos = _Reader(edata.vec(2))
                while protos.left:
                    alpn.append(protos.vec(1).decode("latin-1"))
            elif etype == 43:  # supported_versions
                versions = [v for v in _u16_list(edata.vec(1)) if not _grease(v)]
            elif etype == 13:  # signature_algorithms
                sigalgs = [s for s in _u16_list(edata.vec(2)) if not _grease(s)]
    if r.left:
        raise ValueError("trailing bytes")
    offered = versions or [legacy_version]
    return {
        "protocol": "tls",
        "sni": sni,
        "alpn": alpn,
        "versions": [_VERSION_NAMES.get(v, f"0x{v:04x}") for v in offered],
        "ciphers": len(ciphers),
        "ja4": ja4(max(offered), sni is not None, ciphers, extensions, alpn, sigalgs),
    }


def ja4(version: int, has_sni: bool, ciphers: list[int], extensions: list[int], alpn: list[str], sigalgs: list[int]) -> str:
    """The JA4 TLS client fingerprint (FoxIO, technical_details/JA4.md), for TCP.

    ``a_b_c``: a = "t", version, "d"/"i" (SNI or not), cipher and extension
    counts (GREASE excluded, capped at 99), first+last character of the first
    ALPN value ("00" if none; hex digits when not alphanumeric); b = sha256[:12]
    of the sorted cipher hex codes; c = sha256[:12] of the sorted extension codes
    without SNI and ALPN, then "_" and the signature algorithms in order.
    """
    ciphers = [c for c in ciphers if not _grease(c)]
    extensions = [e for e in extensions if not _grease(e)]
    sigalgs = [s for s in sigalgs if not _grease(s)]
    if alpn and alpn[0]:
        first = alpn[0]
        if first[0].isascii() and first[0].isalnum() and first[-1].isascii() and first[-1].isalnum():
            alpn_chars = first[0] + first[-1]
        else:
            hexed = first.encode("latin-1").hex()
            alpn_chars = hexed[0] + hexed[-1]
    else:
        alpn_chars = "00"
    a = (
        f"t{_JA4_VERSIONS.get(version, '00')}{'d' if has_sni else 'i'}"
        f"{min(len(ciphers), 99):02d}{min(len(extensions), 99):02d}{alpn_chars}"
    )
    b = _hash12(",".join(f"{c:04x}" for c in sorted(ciphers))) if ciphers else "000000000000"
    ext_list = ",".join(f"{e:04x}" for e in sorted(extensions) if e not in (0x0000, 0x0010))
    if sigalgs:
        ext_list += "_" + ",".join(f"{s:04x}" for s in sigalgs)
    c = _hash12(ext_list) if ext_list else "000000000000"
    return f"{a}_{b}_{c}"


def _hash12(text: str) -> str:
    return hashlib.sha256(text.encode("ascii")).hexdigest()[:12]
