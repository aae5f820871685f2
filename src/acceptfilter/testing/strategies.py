"""Hypothesis strategies for filter inputs: bytes, TCP chunkings, protocol heads and their mutations.

The generators are written from the protocol specs (RFC 9112, RFC 8446, RFC 1035/7766,
haproxy's proxy-protocol.txt), not from any filter's code, so they test filters rather
than mirror them. Almost-well-formed inputs come from :func:`mutated`.
"""

from __future__ import annotations

import struct

from hypothesis import strategies as st

__all__ = [
    "any_bytes",
    "broken_off",
    "chunked",
    "chunkings",
    "dns_queries",
    "h2_prefaces",
    "http_requests",
    "mutated",
    "padded",
    "payloads",
    "proxy_headers",
    "proxy_v1_headers",
    "proxy_v2_headers",
    "tls_client_hellos",
    "well_formed",
]

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
PROXY_V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"

_TOKEN_CHARS = "!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_METHODS = ["GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH", "CONNECT", "TRACE", "PRI", "get"]


def any_bytes(max_size: int = 512) -> st.SearchStrategy[bytes]:
    """Arbitrary bytes, biased towards a few interesting values by hypothesis itself."""
    return st.binary(max_size=max_size)


def chunkings(data: bytes, max_cuts: int = 32) -> st.SearchStrategy[tuple[int, ...]]:
    """Cut offsets (sorted, unique, strictly inside ``data``): one way TCP could split it."""
    if len(data) < 2:
        return st.just(())
    return st.lists(st.integers(1, len(data) - 1), unique=True, max_size=min(max_cuts, len(data) - 1)).map(
        lambda cuts: tuple(sorted(cuts))
    )


def chunked(payload: st.SearchStrategy[bytes], max_cuts: int = 32) -> st.SearchStrategy[tuple[bytes, tuple[int, ...]]]:
    """A payload together with a chunking of it."""
    return payload.flatmap(lambda data: st.tuples(st.just(data), chunkings(data, max_cuts)))


def _token(min_size: int = 1, max_size: int = 12) -> st.SearchStrategy[str]:
    return st.text(_TOKEN_CHARS, min_size=min_size, max_size=max_size)


_visible = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=0, max_size=24)


@st.composite
def http_requests(draw: st.DrawFn) -> bytes:
    """HTTP/1.x request heads (any method, headers, line endings), HTTP/0.9 lines, optional body/pipelining."""
    method = draw(st.one_of(st.sampled_from(_METHODS), _token()))
    target = "/" + draw(_visible)
    if draw(st.booleans()) and method == "OPTIONS":
        target = "*"
    eol = draw(st.sampled_from(["\r\n", "\n"]))
    leading = draw(st.sampled_from(["", "", "\r\n", "\n"]))
    version = draw(st.sampled_from(["HTTP/1.1", "HTTP/1.0", "HTTP/1.1", None]))
    if version is None:  # HTTP/0.9: the request line is the whole request
        return f"{leading}{method} {target}{eol}".encode("latin-1")
    headers = draw(
        st.lists(
            st.tuples(
                st.one_of(
                    st.sampled_from(["Host", "host", "HOST", "Content-Length", "User-Agent", "Accept", "Expect"]),
                    _token(),
                ),
                st.sampled_from([":", ": ", " : ", ":\t"]),
                st.one_of(st.sampled_from(["100-continue", "100-Continue", "5"]),
                          st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40)),
            ),
            max_size=8,
        )
    )
    head = f"{leading}{method} {target} {version}{eol}"
    head += "".join(f"{name}{sep}{value}{eol}" for name, sep, value in headers)
    end = draw(st.sampled_from([eol, "\r\n", "\n"]))
    body = draw(st.sampled_from([b"", b"", b"hello=world", b"GET /next HTTP/1.1\r\nHo"]))
    return (head + end).encode("latin-1") + body


@st.composite
def h2_prefaces(draw: st.DrawFn) -> bytes:
    """The HTTP/2 prior-knowledge preface, optionally followed by a SETTINGS frame."""
    settings = draw(st.lists(st.tuples(st.integers(1, 6), st.integers(0, 2**32 - 1)), max_size=4))
    payload = b"".join(struct.pack("!HI", k, v) for k, v in settings)
    frame = struct.pack("!I", len(payload))[1:] + b"\x04\x00\x00\x00\x00\x00" + payload
    return H2_PREFACE + (frame if draw(st.booleans()) else b"")


def _u8_vec(data: bytes) -> bytes:
    return bytes([len(data)]) + data


def _u16_vec(data: bytes) -> bytes:
    return struct.pack("!H", len(data)) + data


_hostname = st.lists(
    st.text("abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=20), min_size=1, max_size=4
).map(lambda labels: ".".join(labels))


@st.composite
def tls_client_hellos(draw: st.DrawFn) -> bytes:
    """TLS ClientHellos (RFC 8446 4.1.2) with random SNI/ALPN/extensions, possibly split across records."""
    extensions: list[tuple[int, bytes]] = []
    if draw(st.booleans()):
        name = draw(_hostname).encode()
        extensions.append((0, _u16_vec(b"\x00" + _u16_vec(name))))
    if draw(st.booleans()):
        protos = draw(st.lists(st.sampled_from([b"h2", b"http/1.1", b"acme-tls/1", b"x"]), min_size=1, max_size=3))
        extensions.append((16, _u16_vec(b"".join(_u8_vec(p) for p in protos))))
    if draw(st.booleans()):
        extensions.append((43, _u8_vec(b"\x03\x04\x03\x03")))
    if draw(st.booleans()):  # key_share; a post-quantum one makes the hello ~1.2 KB bigger
        size = draw(st.sampled_from([32, 32, 1216 + 32]))
        share = struct.pack("!H", 0x11EC if size > 32 else 0x001D) + _u16_vec(
            draw(st.binary(min_size=size, max_size=size))
        )
        extensions.append((51, _u16_vec(share)))
    for ext_type, ext_data in draw(st.lists(st.tuples(st.integers(0, 0xFFFF), st.binary(max_size=40)), max_size=4)):
        extensions.append((ext_type, ext_data))
    order = draw(st.permutations(range(len(extensions)))) if extensions else []
    ext_bytes = b"".join(struct.pack("!HH", extensions[i][0], len(extensions[i][1])) + extensions[i][1] for i in order)
    body = b"\x03\x03" + draw(st.binary(min_size=32, max_size=32))
    body += _u8_vec(draw(st.sampled_from([b"", bytes(32)])))
    suites = draw(st.lists(st.integers(0, 0xFFFF), min_size=1, max_size=16))
    body += _u16_vec(b"".join(struct.pack("!H", s) for s in suites))
    body += _u8_vec(b"\x00")
    empty_extensions_block: bool = draw(st.booleans())
    if extensions or empty_extensions_block:
        body += _u16_vec(ext_bytes)
    handshake = b"\x01" + struct.pack("!I", len(body))[1:] + body
    # Split the handshake message over one or more records (RFC 8446 5.1 allows any fragmentation).
    n_records = draw(st.integers(1, 3))
    cuts = sorted(
        draw(
            st.lists(
                st.integers(1, max(1, len(handshake) - 1)), min_size=n_records - 1, max_size=n_records - 1, unique=True
            )
        )
    )
    pieces = [handshake[a:b] for a, b in zip([0, *cuts], [*cuts, len(handshake)], strict=True)]
    record_version = draw(st.sampled_from([b"\x03\x01", b"\x03\x03", b"\x03\x00"]))
    return b"".join(b"\x16" + record_version + _u16_vec(piece) for piece in pieces if piece)


@st.composite
def dns_queries(draw: st.DrawFn) -> bytes:
    """DNS-over-TCP queries (RFC 7766): 2-byte length prefix + one message, maybe a second one after it."""

    def message() -> bytes:
        header = struct.pack(
            "!HHHHHH", draw(st.integers(0, 0xFFFF)), draw(st.sampled_from([0x0100, 0x0000, 0x0120])), 1, 0, 0, 0
        )
        labels = draw(_hostname).split(".")
        qname = b"".join(_u8_vec(label.encode()) for label in labels) + b"\x00"
        question = qname + struct.pack("!HH", draw(st.sampled_from([1, 28, 15, 16, 255, 252])), 1)
        return header + question

    out = _u16_vec(message())
    if draw(st.booleans()):
        out += _u16_vec(message())
    return out


_ipv4 = st.tuples(*[st.integers(0, 255)] * 4)
_port = st.integers(0, 65535)


@st.composite
def proxy_v1_headers(draw: st.DrawFn) -> bytes:
    """PROXY protocol v1 text headers (TCP4, TCP6, UNKNOWN), followed by some application bytes."""
    kind = draw(st.sampled_from(["TCP4", "TCP6", "UNKNOWN"]))
    if kind == "TCP4":
        src, dst = (".".join(map(str, draw(_ipv4))) for _ in range(2))
        line = f"PROXY TCP4 {src} {dst} {draw(_port)} {draw(_port)}\r\n"
    elif kind == "TCP6":
        src, dst = (":".join(f"{x:x}" for x in draw(st.tuples(*[st.integers(0, 0xFFFF)] * 8))) for _ in range(2))
        line = f"PROXY TCP6 {src} {dst} {draw(_port)} {draw(_port)}\r\n"
    else:
        line = "PROXY UNKNOWN\r\n"
    return line.encode() + draw(st.sampled_from([b"", b"GET / HTTP/1.1\r\n\r\n", b"\x16\x03\x01"]))


@st.composite
def proxy_v2_headers(draw: st.DrawFn) -> bytes:
    """PROXY protocol v2 binary headers (PROXY/LOCAL, inet/inet6/unix, TLVs), then application bytes."""
    command = draw(st.sampled_from([0x21, 0x20]))
    family = draw(st.sampled_from([0x11, 0x12, 0x21, 0x22, 0x31, 0x00]))
    sizes = {0x1: 12, 0x2: 36, 0x3: 216, 0x0: 0}
    addresses = draw(st.binary(min_size=sizes[family >> 4], max_size=sizes[family >> 4]))
    tlvs = b"".join(
        bytes([t]) + _u16_vec(v)
        for t, v in draw(
            st.lists(
                st.tuples(st.sampled_from([0x01, 0x02, 0x04, 0x05, 0x20, 0xE0]), st.binary(max_size=20)), max_size=3
            )
        )
    )
    body = addresses + tlvs
    header = PROXY_V2_SIGNATURE + bytes([command, family]) + _u16_vec(body)
    return header + draw(st.sampled_from([b"", b"GET / HTTP/1.1\r\n\r\n", b"\x16\x03\x01\x00\x05hello"]))


def proxy_headers() -> st.SearchStrategy[bytes]:
    return st.one_of(proxy_v1_headers(), proxy_v2_headers())


def well_formed() -> st.SearchStrategy[bytes]:
    """Well-formed inputs for every built-in protocol (and ones being written)."""
    return st.one_of(http_requests(), h2_prefaces(), tls_client_hellos(), dns_queries(), proxy_headers())


@st.composite
def _mutate(draw: st.DrawFn, data: bytes) -> bytes:
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["truncate", "flip", "insert", "delete", "extend"]))
        if op == "truncate":
            data = data[: draw(st.integers(0, len(data)))]
        elif op == "flip" and data:
            i = draw(st.integers(0, len(data) - 1))
            data = data[:i] + bytes([data[i] ^ (1 << draw(st.integers(0, 7)))]) + data[i + 1 :]
        elif op == "insert":
            i = draw(st.integers(0, len(data)))
            data = data[:i] + draw(st.binary(min_size=1, max_size=8)) + data[i:]
        elif op == "delete" and data:
            i = draw(st.integers(0, len(data) - 1))
            data = data[:i] + data[i + draw(st.integers(1, 8)) :]
        elif op == "extend":
            data += draw(st.binary(min_size=1, max_size=16))
    return data


def mutated(base: st.SearchStrategy[bytes]) -> st.SearchStrategy[bytes]:
    """Almost-well-formed inputs: truncations, bit flips, insertions, deletions and extensions of ``base``."""
    return base.flatmap(_mutate)


def broken_off(base: st.SearchStrategy[bytes]) -> st.SearchStrategy[bytes]:
    """A prefix of ``base`` cut anywhere, then a few random bytes: valid, then suddenly not.

    A filter that decides early (on a command name, a method) must keep that decision
    whatever follows; this is the input that shows whether it does.
    """
    return base.flatmap(
        lambda data: st.tuples(st.integers(0, len(data)), st.binary(min_size=1, max_size=8)).map(
            lambda t: data[: t[0]] + t[1]
        )
    )


def padded(base: st.SearchStrategy[bytes], size: int) -> st.SearchStrategy[bytes]:
    """Inputs of about ``size`` bytes (a filter's cap, give or take two) starting like ``base``.

    A filter that waits for a length its input declared must stop waiting at its cap:
    these are the inputs that show whether it does.
    """
    filler = st.sampled_from([b"a", b" ", b"\x00", b"\r\n"])
    return st.tuples(base, filler, st.sampled_from([0, 1, -1, 2, -2])).map(
        lambda t: (t[0] + t[1] * (size // len(t[1]) + 4))[: max(0, size + t[2])]
    )


def payloads(max_bytes: int | None = None) -> st.SearchStrategy[bytes]:
    """The default input mix of check_filter: random, well-formed, mutated, and cap-sized inputs."""
    options = [any_bytes(), well_formed(), mutated(well_formed())]
    if max_bytes is not None and max_bytes <= 1 << 20:
        options.append(padded(st.one_of(any_bytes(32), well_formed()), max_bytes))
    return st.one_of(options)
