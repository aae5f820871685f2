"""A RESP (Redis) filter that declares its examples, and five copies of it with one planted bug each.

tests/test_planted_bugs.py runs a plain ``acceptfilter fuzz --import tests/planted_filters.py NAME``
on each and expects the bug found within 30 s: the goal of issue 15, item 3. These are the
bugs a first RESP filter really had: its examples are what lets the fuzzer reach them (the
built-in inputs are HTTP, TLS, DNS and PROXY bytes, which a RESP parser rejects at byte 0).
"""

from __future__ import annotations

from acceptfilter import REJECT, WAIT, Decision, Filter
from acceptfilter.filter import Checker

EXAMPLES = (
    b"PING\r\n",
    b"*1\r\n$4\r\nPING\r\n",
    b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$5\r\nhello\r\n",
    b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n*1\r\n$4\r\nPING\r\n",
    b"*3\r\n$3\r\nSET\r\n$3\r\nbig\r\n$20000\r\n",
)


def _header(buf: bytes, pos: int, mark: bytes, *, trusting: bool = False) -> tuple[str, int, int]:
    """Read ``<mark><digits>\\r\\n`` at ``pos``: (state, value, position after it)."""
    if pos >= len(buf):
        return "partial", 0, pos
    end = buf.find(b"\r\n", pos)
    if trusting and buf[pos : pos + 1] == mark:  # planted: waits for the line end, then trusts the digits
        return ("partial", 0, pos) if end < 0 else ("ok", int(buf[pos + 1 : end]), end + 2)
    digits = buf[pos + 1 : end if end >= 0 else len(buf)]
    if end < 0 and digits.endswith(b"\r"):
        digits = digits[:-1]
    if buf[pos : pos + 1] != mark or len(digits) > 9 or (digits and not digits.isdigit()):
        return "malformed", 0, pos
    if end < 0:
        return "partial", 0, pos
    if not digits:
        return "malformed", 0, pos
    return "ok", int(digits), end + 2


def parse(buf: bytes, *, trusting: bool = False) -> tuple[str, str]:
    """("complete" | "partial" | "malformed", command) for the first RESP array in ``buf``."""
    state, count, pos = _header(buf, 0, b"*", trusting=trusting)
    if state != "ok":
        return state, ""
    if count == 0:
        return "malformed", ""
    name = ""
    for _ in range(count):
        state, size, pos = _header(buf, pos, b"$", trusting=trusting)
        if state != "ok":
            return state, name
        start, pos = pos, pos + size + 2
        if buf[pos - 2 : pos] != b"\r\n"[: max(0, len(buf) - pos + 2)]:
            return "malformed", name
        if len(buf) < pos:
            return "partial", name
        name = name or buf[start : pos - 2].decode("latin-1").upper()
    return "complete", name


class RespReady(Filter):
    """Wait for one complete RESP array command (what redis-cli sends)."""

    name = "respready"
    examples = EXAMPLES

    def decide(self, state: str, command: str, data: bytes, final: bool) -> Decision:
        if state == "complete":
            return Decision.accept({"command": command})
        if state == "malformed":
            return Decision.reject("not RESP")
        if final or len(data) >= self.max_bytes:
            return REJECT
        return WAIT

    def check(self, data: bytes, final: bool) -> Decision:
        return self.decide(*parse(data[: self.max_bytes]), data, final)


class _ScansNewBytes:
    """Planted: looks for a line end only in the bytes that arrived since the last call."""

    def __init__(self, flt: RespReady) -> None:
        self.flt = flt
        self.seen = 0

    def check(self, data: bytes, final: bool) -> Decision:
        new, self.seen = data[self.seen :], len(data)
        if b"\r\n" not in new and not final and len(data) < self.flt.max_bytes:
            return WAIT  # a CRLF split across two arrivals is never seen
        return RespReady.check(self.flt, data, final)


class ChunkingBug(RespReady):
    """Planted: its CRLF scan depends on how TCP split the bytes."""

    name = "planted-chunking"

    def session(self) -> Checker:
        return _ScansNewBytes(self)

    def check(self, data: bytes, final: bool) -> Decision:
        return _ScansNewBytes(self).check(data, final)


class FinalWaitBug(RespReady):
    """Planted: WAITs on an incomplete command even when no more bytes will come."""

    name = "planted-final"

    def decide(self, state: str, command: str, data: bytes, final: bool) -> Decision:
        if state == "partial" and len(data) < self.max_bytes:
            return WAIT
        return super().decide(state, command, data, final)


class LengthBug(RespReady):
    """Planted: int() on the peer's length digits, unchecked."""

    name = "planted-length"

    def check(self, data: bytes, final: bool) -> Decision:
        return self.decide(*parse(data[: self.max_bytes], trusting=True), data, final)


class ExtensionBug(RespReady):
    """Planted: ACCEPTs once the command name is in, then REJECTs when a later argument is malformed."""

    name = "planted-extension"

    def check(self, data: bytes, final: bool) -> Decision:
        state, command = parse(data[: self.max_bytes])
        if state == "partial" and command:
            return Decision.accept({"command": command})
        return self.decide(state, command, data, final)


class CapBug(RespReady):
    """Planted: keeps WAITing for a declared bulk length past max_bytes."""

    name = "planted-cap"

    def check(self, data: bytes, final: bool) -> Decision:
        state, command = parse(data)
        if state == "partial":
            return REJECT if final else WAIT
        return self.decide(state, command, data, final)


#: name -> the invariant a plain `acceptfilter fuzz NAME` must report.
PLANTED = {
    "planted-chunking": "chunking",
    "planted-final": "final-wait",
    "planted-length": "raises",
    "planted-extension": "extension",
    "planted-cap": "max-bytes",
}
