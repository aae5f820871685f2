"""Helpers shared by the filter tests: split-point independence over one session."""

from __future__ import annotations

from acceptfilter.filter import Decision, Filter


def one_shot(flt: Filter, data: bytes, final: bool = False) -> Decision:
    return flt.session().check(data, final)


def assert_split_independent(flt: Filter, data: bytes, final: bool = False) -> Decision:
    """Every split of ``data`` into two arrivals (and byte-by-byte) gives the one-shot decision."""
    expected = one_shot(flt, data, final)
    for cut in range(len(data) + 1):
        session = flt.session()
        first = session.check(data[:cut], False)
        if first.decided:
            # Decided early: must be the same on the whole input.
            assert (first.verdict, dict(first.info)) == (expected.verdict, dict(expected.info)), cut
        got = session.check(data, final)
        assert (got.verdict, dict(got.info), got.consume) == (expected.verdict, dict(expected.info), expected.consume), cut
    session = flt.session()
    for end in range(1, len(data) + 1):
        got = session.check(data[:end], final and end == len(data))
    if data:
        assert (got.verdict, dict(got.info)) == (expected.verdict, dict(expected.info))
    return expected
