"""A third-party filter as a plugin author would write it (not installed, not registered).

Fuzzed with one call in tests/test_testing_thirdparty.py and with one command:
``acceptfilter fuzz --import tests/thirdparty_filter.py helloready``.
"""

from __future__ import annotations

from acceptfilter import REJECT, WAIT, Decision, Filter

GREETING = b"HELLO "


class HelloReady(Filter):
    """Wait for a 'HELLO <name>' line; surface it with the name in info."""

    name = "helloready"

    def check(self, data: bytes, final: bool) -> Decision:
        head = data[: self.max_bytes]
        if not GREETING.startswith(head[: len(GREETING)]):
            return REJECT
        nl = head.find(b"\n")
        if nl >= 0:
            return Decision.accept({"name": head[len(GREETING) : nl].strip().decode("latin-1")})
        if final or len(head) >= self.max_bytes:
            return REJECT
        return WAIT
