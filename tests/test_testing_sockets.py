"""The real-socket harness on both I/O cores: bytes read = bytes sent - consume; outcomes add up."""

from __future__ import annotations

import pytest

from acceptfilter.registry import available_filters
from acceptfilter.testing import check_sockets
from acceptfilter.testing.sockets import send_and_check

BUILTIN_NAMES = [info.name for info in available_filters() if info.distribution.startswith("acceptfilter ")]


@pytest.mark.parametrize("spec", BUILTIN_NAMES)
def test_builtin_over_real_sockets(spec: str) -> None:
    check_sockets(spec, max_examples=8)


@pytest.mark.parametrize(
    ("spec", "chunks"),
    [
        ("httpready", [b"GET / HTTP/1.1\r\n", b"Host: x\r\n", b"\r\n"]),
        ("httpready", [b"GET / HTTP/1.1\r\n"]),  # incomplete at EOF: rejected, counted
        ("httpready", [b"\x16\x03\x01\x00\x05hello"]),  # not HTTP: passed through
        ("dataready", []),  # closed having sent nothing
        ("dataready:min_bytes=4", [b"a", b"b", b"cd", b"efg"]),
    ],
)
def test_known_cases(core: str, spec: str, chunks: list[bytes]) -> None:
    send_and_check(spec, chunks, core=core)
