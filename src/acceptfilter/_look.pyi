# Types for the CPython extension acceptfilter._look (csrc/pylook.c).
from typing import Any

Address = tuple[str, int] | tuple[str, int, int, int] | str

class Looker:
    """One look at a listen socket's next connection: accept4, a peek, the compiled matcher."""

    def __new__(cls, program: int, cap: int, owner: Any) -> Looker: ...
    def look(self, listen_fd: int, /) -> tuple[int, Address, bytes | None, bool, int] | None: ...
