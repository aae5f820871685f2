"""The real-socket harness on both I/O cores: bytes read = bytes sent - consume; outcomes add up."""

from __future__ import annotations

import pytest

from acceptfilter import REJECT, WAIT, Decision, Filter
from acceptfilter.registry import available_filters
from acceptfilter.testing import check_filter, check_sockets
from acceptfilter.testing.sockets import send_and_check

BUILTIN_NAMES = [info.name for info in available_filters() if info.distribution.startswith("acceptfilter ")]
REQUIRED_ARGS = {"proxy": "proxy:trusted=127.0.0.0/8"}


@pytest.mark.parametrize("name", BUILTIN_NAMES)
def test_builtin_over_real_sockets(name: str) -> None:
    check_sockets(REQUIRED_ARGS.get(name, name), max_examples=8)


@pytest.mark.parametrize(
    ("spec", "chunks"),
    [
        ("httpready", [b"GET / HTTP/1.1\r\n", b"Host: x\r\n", b"\r\n"]),
        ("httpready", [b"GET / HTTP/1.1\r\n"]),  # incomplete at EOF: rejected, counted
        ("httpready", [b"\x16\x03\x01\x00\x05hello"]),  # not HTTP: rejected (non_http=reject, the default)
        ("dataready", []),  # closed having sent nothing
        ("dataready:min_bytes=4", [b"a", b"b", b"cd", b"efg"]),
    ],
)
def test_known_cases(core: str, spec: str, chunks: list[bytes]) -> None:
    send_and_check(spec, chunks, core=core)


class StripFirstLine(Filter):
    """A correct consuming filter (PROXY v1 style): the first line is stripped before the application reads."""

    name = "strip-first-line"

    def check(self, data: bytes, final: bool) -> Decision:
        nl = data.find(b"\n", 0, self.max_bytes)
        if nl >= 0:
            return Decision.accept({"line": data[:nl].decode("latin-1")}, consume=nl + 1)
        return REJECT if final or len(data) >= self.max_bytes else WAIT


def test_consuming_filter_keeps_contract() -> None:
    check_filter(StripFirstLine(max_bytes=128), max_examples=100)


def test_consume_over_real_sockets(core: str) -> None:
    send_and_check(StripFirstLine(), [b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r", b"\nGET / HTTP/1.1\r\n\r\n"], core=core)
    check_sockets(StripFirstLine(), max_examples=6, cores=(core,))


def test_check_sockets_takes_a_list_of_payloads_like_check_filter() -> None:
    """Issue 15, item 4: a list crashed with AttributeError: 'list' object has no attribute 'filter'."""
    seeds = [b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\nGET / HTTP/1.1\r\n\r\n", b"hello\n"]
    check_sockets(StripFirstLine(), seeds, max_examples=4, cores=("c",))
    check_filter(StripFirstLine(max_bytes=128), seeds, max_examples=50)
