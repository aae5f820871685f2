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
        (b"\r\nGET / HTTP/1.0\r\n\r\n", A),  # leading empty line tolerated
        (b"PRI * HTTP/2.0\r\n\r\nSM\r\n", W),
        (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", A),
        (b"\x16\x03\x01", A),  # TLS: passed like FreeBSD
        (b"SSH-2.0-OpenSSH", W),  # could still be a method token... until the '-' run ends
        (b"SSH-2.0-OpenSSH_9.6\r\n", A),  # ...then it is not HTTP: passed
        (b"GET /a\x01b HTTP/1.1", A),  # control byte: cannot be HTTP
        (b"A" * 40, A),  # a method longer than any real one
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


def test_httpready_non_http_reject_option() -> None:
    d = HttpReady(non_http="reject").check(b"\x16\x03\x01\x02", False)
    assert d.verdict is R and "not HTTP" in d.reason


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


def test_httpready_scans_incrementally() -> None:
    """A head trickled byte by byte is not rescanned from the start each time."""
    import time

    head = b"GET / HTTP/1.1\r\n" + b"X-Pad: " + b"a" * 12000 + b"\r\n"
    session = HttpReady().session()
    start = time.perf_counter()
    for end in range(1, len(head), 16):
        assert session.check(head[:end], False).verdict is W
    incremental = time.perf_counter() - start
    start = time.perf_counter()
    for end in range(1, len(head), 16):
        HttpReady().check(head[:end], False)
    rescanning = time.perf_counter() - start
    assert incremental < rescanning  # same work minus the rescans


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
