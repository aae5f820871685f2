"""dataready and httpready as sans-IO units: bytes in, decision out."""

from __future__ import annotations

import pytest
from acceptfilter.filters.dataready import DataReady
from acceptfilter.filters.httpready import HttpReady

from acceptfilter import Verdict, load_filter

A, R, W = Verdict.ACCEPT, Verdict.REJECT, Verdict.WAIT


def feed(flt: HttpReady | DataReady, data: bytes, step: int) -> list[Verdict]:
    """Feed growing prefixes to one session, as the engine does."""
    session = flt.session()
    return [session.check(data[:end], False).verdict for end in range(step, len(data) + step, step)]


@pytest.mark.parametrize(
    ("data", "verdict"),
    [
        (b"", W),
        (b"G", W),
        (b"GET / HTTP/1.1\r\nHost: a\r\n", W),
        (b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", A),
        (b"GET / HTTP/1.1\nHost: a\n\n", A),
        (b"GET / HTTP/1.1\r\nHost: a\n\r\n", A),
        (b"DELETE /x HTTP/1.1\r\n\r\n", A),
        (b"GET /x\r\n", A),  # HTTP/0.9
        (b"HEAD /x\r\n", R),  # HTTP/0.9 is GET only (RFC 1945)
        (b"EHLO x\r\n", R),  # ...so an SMTP client's greeting is not a request
        (b"SSH-2.0-OpenSSH_9.2p1 Debian-2+deb12u10\r\n", R),  # nor Debian's OpenSSH line
        (b"SSH-2.0-OpenSSH_9.2p1 Debian-2+deb12u10", W),  # (a GET-less line is decided at its end)
        (b"\x00", R),  # one garbage byte: rejected by default, not passed
        (b"\r\nGET / HTTP/1.0\r\n\r\n", A),  # leading empty line tolerated
        (b"PRI * HTTP/2.0\r\n\r\nSM\r\n", W),
        (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", A),
        (b"\x16\x03\x01", R),  # TLS: not HTTP, rejected (non_http=accept passes it like FreeBSD)
        (b"SSH-2.0-OpenSSH", W),  # could still be a method token... until the '-' run ends
        (b"SSH-2.0-OpenSSH_9.6\r\n", R),  # ...then it is not HTTP
        (b"GET /a\x01b HTTP/1.1", R),  # control byte: cannot be HTTP
        (b"A" * 40, R),  # a method longer than any real one
    ],
)
def test_httpready_verdicts(data: bytes, verdict: Verdict) -> None:
    assert HttpReady().check(data, False).verdict is verdict


def test_httpready_info() -> None:
    d = HttpReady().check(b"POST /p?q=1 HTTP/1.1\r\nhOsT:  example.org:8080 \r\nX: y\r\n\r\nbody", False)
    assert dict(d.info) == {
        "protocol": "http/1",
        "method": "POST",
        "target": "/p?q=1",
        "version": "HTTP/1.1",
        "host": "example.org:8080",
    }
    assert d.consume == 0
    assert HttpReady().check(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", False).info["protocol"] == "h2"
    assert HttpReady().check(b"GET /x\r\n", False).info["version"] == "HTTP/0.9"


def test_httpready_terminator_anywhere_not_only_at_the_tail() -> None:
    # FreeBSD's tail check holds a GET with a body; the whole head is here.
    assert HttpReady().check(b"GET / HTTP/1.1\r\nContent-Length: 5\r\n\r\nab", False).verdict is A


def test_httpready_non_http_accept_is_freebsds_pass_through() -> None:
    d = HttpReady(non_http="accept").check(b"\x16\x03\x01\x02", False)
    assert d.verdict is A and d.passed  # surfaced alone, no match behind a router
    assert not HttpReady(non_http="accept").check(b"GET / HTTP/1.0\r\n\r\n", False).passed
    assert HttpReady(non_http="accept").check(b"EHLO x\r\n", False).passed


def test_httpready_rejects_non_http_by_default() -> None:
    """One NUL byte must not get a connection past the filter (issue 14, item 2)."""
    for garbage in (b"\x00", b"\x16\x03\x01\x02", b"EHLO x\r\n"):
        d = HttpReady().check(garbage, False)
        assert d.verdict is R and "not HTTP" in d.reason, garbage


def test_httpready_final_and_cap() -> None:
    flt = HttpReady(max_bytes=64)
    assert flt.check(b"GET / HTTP/1.1\r\nHost", True).verdict is R  # incomplete at EOF/deadline
    assert flt.check(b"", True).verdict is R
    big = b"GET / HTTP/1.1\r\nX: " + b"a" * 100
    assert flt.check(big, False).verdict is R  # never WAIT at or past max_bytes
    assert "max_bytes" in flt.check(big, False).reason
    assert HttpReady(max_bytes=64, oversize="accept").check(big, False).verdict is A
    # A terminator past the cap does not count, however the bytes arrived.
    late = b"GET / HTTP/1.1\r\nX: " + b"a" * 50 + b"\r\n\r\n"
    assert flt.check(late, False).verdict is R


@pytest.mark.parametrize(
    "data",
    [
        b"GET /index.html HTTP/1.1\r\nHost: example.test\r\nAccept: */*\r\n\r\n",
        b"PUT /x HTTP/1.0\n\n",
        b"GET /old\r\n",
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
        b"\x16\x03\x01\x00\x05hello",
    ],
)
@pytest.mark.parametrize("step", [1, 2, 3, 7])
def test_httpready_is_chunking_independent(data: bytes, step: int) -> None:
    one_shot = HttpReady().check(data, False)
    verdicts = feed(HttpReady(), data, step)
    assert verdicts[-1] is one_shot.verdict
    decided = [v for v in verdicts if v is not W]
    assert len(set(decided)) <= 1  # once decided, the same on every extension
    session = HttpReady().session()
    for end in range(1, len(data) + 1):
        last = session.check(data[:end], False)
    assert last == one_shot


def test_httpready_scans_incrementally(monkeypatch: pytest.MonkeyPatch) -> None:
    """A head trickled in pieces is searched from where the last search stopped, not from the start."""
    import acceptfilter.filters.httpready as module

    starts: list[tuple[int, int]] = []
    real = module._find_head_end

    def spy(data: bytes, pos: int) -> int:
        starts.append((pos, len(data)))
        return real(data, pos)

    monkeypatch.setattr(module, "_find_head_end", spy)
    head = b"GET / HTTP/1.1\r\n" + b"X-Pad: " + b"a" * 12000 + b"\r\n"
    session = HttpReady().session()
    step = 16
    for end in range(40, len(head), step):
        assert session.check(head[:end], False).verdict is W
    for (pos, _), (_, previous_len) in zip(starts[1:], starts, strict=False):
        assert pos >= previous_len - 2  # only the new bytes (and a possible split terminator)
    assert session.check(head + b"\r\n", False).verdict is A


def test_dataready() -> None:
    assert DataReady().check(b"", False).verdict is W
    assert DataReady().check(b"x", False).verdict is A
    assert DataReady().check(b"", True).verdict is R
    flt = DataReady(min_bytes=4)
    assert flt.check(b"abc", False).verdict is W
    assert flt.check(b"abcd", False).verdict is A
    assert flt.check(b"ab", True).verdict is A  # whatever arrived before EOF/deadline is surfaced
    assert load_filter("dataready:min_bytes=4").min_bytes == 4  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="min_bytes"):
        DataReady(min_bytes=0)
