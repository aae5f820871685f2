"""Property tests for the new filters: total, never WAIT when final or at the cap, chunking-independent."""

from __future__ import annotations

from acceptfilter.filters.dnsready import DnsReady
from acceptfilter.filters.httpready import HttpReady
from acceptfilter.filters.proxy import V2_SIGNATURE, Proxy
from acceptfilter.filters.tlsready import TlsReady
from hypothesis import given, settings
from hypothesis import strategies as st

from acceptfilter.filter import Filter, Verdict

from .test_dnsready import query
from .test_proxy import V1, v2

SEEDS = [
    query("www.example.org", 28),
    V1 + b"GET / HTTP/1.1\r\n\r\n",
    v2(tlvs=b"\x02\x00\x01a"),
    V2_SIGNATURE,
    b"\x16\x03\x01\x00\x30\x01\x00\x00\x2c\x03\x03" + bytes(40),
    b"POST / HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc",
]


def filters() -> list[Filter]:
    proxy = Proxy(trusted=("127.0.0.0/8",), max_bytes=200)
    proxy.session = lambda: proxy.peer_session(("127.0.0.1", 1))  # type: ignore[method-assign]
    return [DnsReady(max_bytes=300), TlsReady(max_bytes=300), HttpReady(body=50, max_bytes=300), proxy]


@st.composite
def inputs(draw: st.DrawFn) -> bytes:
    seed = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(0, 3))):
        if seed:
            seed[draw(st.integers(0, len(seed) - 1))] = draw(st.integers(0, 255))
    cut = draw(st.integers(0, len(seed)))
    return bytes(seed[:cut]) + draw(st.binary(max_size=40))


@settings(max_examples=150, deadline=None)
@given(data=st.one_of(inputs(), st.binary(max_size=400)), cuts=st.lists(st.integers(0, 400), max_size=4))
def test_total_final_and_chunking_independent(data: bytes, cuts: list[int]) -> None:
    for flt in filters():
        whole = flt.session().check(data, False)
        session = flt.session()
        for end in sorted({min(c, len(data)) for c in cuts}):
            early = session.check(data[:end], False)
            if early.decided:
                assert (early.verdict, dict(early.info)) == (whole.verdict, dict(whole.info))
        got = session.check(data, False)
        assert (got.verdict, dict(got.info), got.consume) == (whole.verdict, dict(whole.info), whole.consume)
        if len(data) >= flt.max_bytes:
            assert whole.verdict is not Verdict.WAIT
        assert flt.session().check(data, True).verdict is not Verdict.WAIT
        assert 0 <= whole.consume <= len(data)
