"""dataready: surface a connection as soon as it has sent something.

FreeBSD's accf_data(9), with SO_RCVLOWAT as an argument: ``min_bytes``.
At EOF or deadline whatever arrived is surfaced; a connection that sent
nothing is left to the engine's policy.
"""

from __future__ import annotations

from acceptfilter.filter import ACCEPT, DEFAULT_MAX_BYTES, REJECT, WAIT, Decision, Filter
from acceptfilter.matcher import Program, min_bytes


class DataReady(Filter):
    """Wait for any data (at least min_bytes bytes), like FreeBSD's dataready."""

    name = "dataready"

    def __init__(
        self,
        *,
        min_bytes: int = 1,
        max_bytes: int = DEFAULT_MAX_BYTES,
        timeout: float | None = None,
    ) -> None:
        super().__init__(max_bytes=max_bytes, timeout=timeout)
        if not 1 <= min_bytes <= max_bytes:
            raise ValueError(f"min_bytes must be between 1 and max_bytes ({max_bytes}), not {min_bytes}")
        self.min_bytes = min_bytes

    def check(self, data: bytes, final: bool) -> Decision:
        if len(data) >= self.min_bytes:
            return ACCEPT
        if final:
            return ACCEPT if data else REJECT
        return WAIT

    def matcher(self) -> Program:
        """Compiled: ready at ``min_bytes`` bytes (the check ACCEPTs exactly there)."""
        return min_bytes(self.min_bytes, self.max_bytes)
