"""Deliberately broken filters: each breaks exactly one rule of the filter contract.

tests/test_testing_check.py proves check_filter catches every one of them; the CLI test
fuzzes them with ``acceptfilter fuzz --import tests/broken_filters.py NAME``.
"""

from __future__ import annotations

import itertools
import time

from acceptfilter.filter import ACCEPT, REJECT, WAIT, Checker, Decision, Filter
from acceptfilter.matcher import Builder, Program


class Raises(Filter):
    """Unpacks the request line without checking it: 'never raises on any bytes'."""

    name = "broken-raises"

    def check(self, data: bytes, final: bool) -> Decision:
        if b"\n" not in data:
            return REJECT if final or len(data) >= self.max_bytes else WAIT
        method, _target, _version = data.split(b"\n", 1)[0].split(b" ")  # ValueError on most lines
        return Decision.accept({"method": method.decode("latin-1")})


class _NewBytesOnly:
    def __init__(self) -> None:
        self.seen = 0

    def check(self, data: bytes, final: bool) -> Decision:
        new, self.seen = data[self.seen :], len(data)  # bug: a "\n\n" split across arrivals is missed
        if b"\n\n" in new:
            return ACCEPT
        return REJECT if final or len(data) >= 16384 else WAIT


class ChunkingDependent(Filter):
    """Looks only at the newly arrived bytes: 'independent of chunking'."""

    name = "broken-chunking"

    def session(self) -> Checker:
        return _NewBytesOnly()

    def check(self, data: bytes, final: bool) -> Decision:
        return _NewBytesOnly().check(data, final)


class TailCheck(Filter):
    """Accepts while the buffer *ends* with a newline (accf_http's tail check): 'same decision on extension'."""

    name = "broken-extension"

    def check(self, data: bytes, final: bool) -> Decision:
        if data.endswith(b"\n"):
            return ACCEPT
        return REJECT if final or len(data) >= self.max_bytes else WAIT


class WaitsWhenFinal(Filter):
    """Ignores ``final`` on short input: 'final=True never WAIT'."""

    name = "broken-final"

    def check(self, data: bytes, final: bool) -> Decision:
        return ACCEPT if len(data) >= 3 else WAIT


class WaitsPastCap(Filter):
    """Waits for an empty line however long the head grows: 'never WAIT at or past max_bytes'."""

    name = "broken-maxbytes"

    def __init__(self, *, max_bytes: int = 64, timeout: float | None = None) -> None:
        super().__init__(max_bytes=max_bytes, timeout=timeout)

    def check(self, data: bytes, final: bool) -> Decision:
        if b"\r\n\r\n" in data:
            return ACCEPT
        return REJECT if final else WAIT


class BadConsume(Filter):
    """Assumes a PROXY v1 header is always 108 bytes: '0 <= consume <= len(data)'."""

    name = "broken-consume"

    def check(self, data: bytes, final: bool) -> Decision:
        if data.startswith(b"PROXY"):
            return Decision.accept(consume=108)
        return ACCEPT if data else REJECT


_counter = itertools.count()


class NondeterministicInfo(Filter):
    """Stamps a connection id into info: 'info deterministic'."""

    name = "broken-info"

    def check(self, data: bytes, final: bool) -> Decision:
        if data:
            return Decision.accept({"id": next(_counter)})
        return REJECT


class Slow(Filter):
    """Stalls on a NUL byte (think: a DNS lookup): 'per-call time bounded'."""

    name = "broken-slow"

    def check(self, data: bytes, final: bool) -> Decision:
        if b"\x00" in data:
            time.sleep(0.08)
        return ACCEPT if data else REJECT


class UnsoundMatcher(Filter):
    """Declares a matcher for a line ending in LF, but the check wants CRLF: 'matcher => check'."""

    name = "broken-matcher"

    def check(self, data: bytes, final: bool) -> Decision:
        if b"\r\n" in data:
            return ACCEPT
        return REJECT if final or len(data) >= self.max_bytes else WAIT

    def matcher(self) -> Program:
        return Builder(self.max_bytes).search([b"\n"]).ready().build()  # bug: a bare LF is certified too


class SharedLastLine(Filter):
    """Keeps the last complete line on the instance, which every connection shares: 'connections are isolated'."""

    name = "broken-isolation"

    def __init__(self, *, max_bytes: int = 16384, timeout: float | None = None) -> None:
        super().__init__(max_bytes=max_bytes, timeout=timeout)
        self.line = b""

    def check(self, data: bytes, final: bool) -> Decision:
        if not self.line and b"\n" in data:
            self.line = data.split(b"\n", 1)[0]  # bug: set once, never per connection
        if self.line:
            return Decision.accept({"line": self.line.decode("latin-1")}) if data.startswith(self.line) else REJECT
        return REJECT if final or len(data) >= self.max_bytes else WAIT


class BytesInfo(Filter):
    """Puts raw bytes into info: 'info is plain JSON data'."""

    name = "broken-infotype"

    def check(self, data: bytes, final: bool) -> Decision:
        return Decision.accept({"first": data[:1]}) if data else REJECT


BROKEN: dict[str, tuple[type[Filter], str]] = {
    "broken-raises": (Raises, "raises"),
    "broken-chunking": (ChunkingDependent, "chunking"),
    "broken-extension": (TailCheck, "extension"),
    "broken-final": (WaitsWhenFinal, "final-wait"),
    "broken-maxbytes": (WaitsPastCap, "max-bytes"),
    "broken-consume": (BadConsume, "consume"),
    "broken-info": (NondeterministicInfo, "deterministic"),
    "broken-slow": (Slow, "slow"),
    "broken-matcher": (UnsoundMatcher, "matcher"),
    "broken-isolation": (SharedLastLine, "isolation"),
    "broken-infotype": (BytesInfo, "info"),
}
