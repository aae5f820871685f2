"""A beanstalkd filter with NO examples, and copies of it with one planted bug each (issue 27).

Each bug is one the random and protocol-shaped inputs of issue 15 never reach: the
beanstalkd protocol is in no built-in corpus, so only the guided phase (the words in this
module's source, coverage feedback, boundary lengths) or the isolation rule finds them.
tests/test_planted_guided.py runs ``acceptfilter fuzz --import tests/planted_guided.py NAME``
and ``check_filter`` at their defaults on each.
"""

from __future__ import annotations

from typing import ClassVar

from acceptfilter import REJECT, WAIT, Decision, Filter
from acceptfilter.filter import Checker

#: The longest command line beanstalkd takes (its LINE_BUF_SIZE, less CRLF).
MAX_LINE = 224
NO_ARGS = frozenset(["reserve", "stats", "list-tubes", "list-tube-used", "peek-ready", "peek-delayed", "quit"])
#: Commands that take numbers, and how many.
NUMBERS = {"delete": 1, "touch": 1, "peek": 1, "kick": 1, "bury": 2, "release": 3, "reserve-with-timeout": 1}
TUBES = frozenset(["use", "watch", "ignore"])


class BeanReady(Filter):
    """Wait for one complete beanstalkd command (a `put` with its job body)."""

    name = "beanready"

    def check(self, data: bytes, final: bool) -> Decision:
        head = data[: self.max_bytes]
        end = head.find(b"\r\n", 0, MAX_LINE + 2)
        if end < 0:
            if final or len(head) >= min(self.max_bytes, MAX_LINE + 2):
                return Decision.reject("no command line")
            return WAIT
        return self.command(head, end, final)

    def command(self, head: bytes, end: int, final: bool) -> Decision:
        words = head[:end].decode("latin-1").split(" ")
        command, args = words[0], words[1:]
        if command == "put":
            return self.put(head, end, args, final)
        if command in NO_ARGS:
            return Decision.accept({"command": command}) if not args else REJECT
        if command in NUMBERS:
            return self.numbers(command, args)
        if command in TUBES:
            ok = len(args) == 1 and 0 < len(args[0]) <= 200
            return Decision.accept({"command": command, "tube": args[0]}) if ok else REJECT
        return Decision.reject("unknown command")

    def number(self, text: str) -> int | None:
        return int(text) if text.isascii() and text.isdigit() and len(text) <= 10 else None

    def numbers(self, command: str, args: list[str]) -> Decision:
        values = [self.number(a) for a in args]
        if len(values) != NUMBERS[command] or None in values:
            return REJECT
        return Decision.accept({"command": command, "id": values[0]})

    def put(self, head: bytes, end: int, args: list[str], final: bool) -> Decision:
        values = [self.number(a) for a in args]
        if len(values) != 4 or None in values:
            return Decision.reject("bad put")
        size = int(args[3])
        body_end = end + 2 + size + 2
        if body_end > self.max_bytes:
            return Decision.reject("job larger than max_bytes")
        return self.body(head, body_end, size, final)

    def body(self, head: bytes, body_end: int, size: int, final: bool) -> Decision:
        if len(head) < body_end:
            return REJECT if final else WAIT
        if head[body_end - 2 : body_end] != b"\r\n":
            return Decision.reject("job body not followed by CRLF")
        return Decision.accept({"command": "put", "bytes": size})


class UncheckedInt(BeanReady):
    """Planted: int() on put's fields, checked only for their count."""

    name = "planted-int"

    def put(self, head: bytes, end: int, args: list[str], final: bool) -> Decision:
        if len(args) != 4:
            return Decision.reject("bad put")
        _pri, _delay, _ttr, size = (int(a) for a in args)
        body_end = end + 2 + size + 2
        if body_end > self.max_bytes:
            return Decision.reject("job larger than max_bytes")
        return self.body(head, body_end, size, final)


class WaitPastCap(BeanReady):
    """Planted: waits for the job body whatever size the put line declares."""

    name = "planted-cap-length"

    def put(self, head: bytes, end: int, args: list[str], final: bool) -> Decision:
        values = [self.number(a) for a in args]
        if len(values) != 4 or None in values:
            return Decision.reject("bad put")
        size = int(args[3])
        return self.body(head, end + 2 + size + 2, size, final)


class ForgetsReturn(BeanReady):
    """Planted: the `kick` branch computes its decision and forgets to return it."""

    name = "planted-none"

    def command(self, head: bytes, end: int, final: bool) -> Decision:
        words = head[:end].decode("latin-1").split(" ")
        if words[0] == "kick":
            self.numbers("kick", words[1:])  # the missing `return`
        else:
            return super().command(head, end, final)
        return None  # type: ignore[return-value]


class InstanceState(BeanReady):
    """Planted: remembers how far it scanned on the filter instance, which every connection shares."""

    name = "planted-instance-state"

    def __init__(self, *, max_bytes: int = 16384, timeout: float | None = None) -> None:
        super().__init__(max_bytes=max_bytes, timeout=timeout)
        self.scanned = 0

    def check(self, data: bytes, final: bool) -> Decision:
        head = data[: self.max_bytes]
        # Resume the CRLF scan where the last call stopped (one byte back, a CR may end it).
        end = head.find(b"\r\n", max(0, self.scanned - 1), MAX_LINE + 2)
        self.scanned = len(head) if end < 0 else self.scanned
        if end < 0:
            if final or len(head) >= min(self.max_bytes, MAX_LINE + 2):
                return Decision.reject("no command line")
            return WAIT
        return self.command(head, end, final)


class _Scan:
    """One connection's scan state; ``seen`` is meant to be per session, but is a class attribute."""

    seen: ClassVar[bytearray] = bytearray()  # planted: `self.seen += ...` extends this one shared buffer

    def __init__(self, flt: BeanReady) -> None:
        self.flt = flt

    def check(self, data: bytes, final: bool) -> Decision:
        head = data[: self.flt.max_bytes]
        self.seen += head[len(self.seen) :]
        end = bytes(self.seen).find(b"\r\n", 0, MAX_LINE + 2)
        if end < 0:
            if final or len(self.seen) >= min(self.flt.max_bytes, MAX_LINE + 2):
                return Decision.reject("no command line")
            return WAIT
        return self.flt.command(bytes(self.seen), end, final)


class ClassState(BeanReady):
    """Planted: its sessions keep their bytes in a mutable class attribute."""

    name = "planted-class-state"

    def session(self) -> Checker:
        return _Scan(self)

    def check(self, data: bytes, final: bool) -> Decision:
        return self.session().check(data, final)


class UnicodeDigit(BeanReady):
    """Planted: trusts str.isdigit(), which says yes to '²' (int() then raises)."""

    name = "planted-isdigit"

    def number(self, text: str) -> int | None:
        return int(text) if text.isdigit() and len(text) <= 10 else None


#: name -> the invariant a plain `acceptfilter fuzz NAME` must report.
PLANTED = {
    "planted-int": "raises",
    "planted-cap-length": "max-bytes",
    "planted-none": "raises",
    "planted-instance-state": "isolation",
    "planted-class-state": "isolation",
    "planted-isdigit": "raises",
}
