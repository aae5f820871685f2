"""The C matcher (``csrc/afmatch.c`` in ``acceptfilter._core``): same programs, same answers.

:func:`compile_program` turns a :class:`~acceptfilter.matcher.Program` into the C
``afm_prog`` (cached per program, kept alive by the returned object); a
:class:`CMatchState` runs it on peeked bytes. The engine's fast path passes
``CProgram.ptr`` (an ``afm_prog *``) to the core and keeps one ``afm_state`` per held
connection; from Python it is::

    cprog = compile_program(flt.matcher())     # once per filter
    state = cprog.start()                      # once per connection
    m = state.run(peeked)                      # each arrival: Match(status, consume, need)
    if m.ready: surface, consuming m.consume bytes

Keep the :class:`CProgram` referenced for as long as C code holds ``ptr`` (the cache may
drop it): the arrays it points into are owned by that object.

The filters never import this module: they stay sans-IO and C-free.
"""

from __future__ import annotations

import functools
from typing import Any

from .matcher import Match, Program

__all__ = ["CMatchState", "CProgram", "available", "compile_program"]


def _lib() -> tuple[Any, Any]:
    from . import _core

    return _core.ffi, _core.lib


def available() -> bool:
    """Whether the C core (with the matcher) is built."""
    try:
        _, lib = _lib()
    except ImportError:
        return False
    return hasattr(lib, "afm_run")


class CProgram:
    """A program laid out for C; ``ptr`` is the ``afm_prog *`` (valid while this object lives)."""

    __slots__ = ("_keep", "ffi", "lib", "program", "ptr")

    def __init__(self, program: Program) -> None:
        ffi, lib = _lib()
        self.ffi, self.lib, self.program = ffi, lib, program
        code = ffi.new("afm_insn[]", len(program.code))
        for i, insn in enumerate(program.code):
            c = code[i]
            c.op, c.a, c.b, c.c, c.d, c.e = insn
        sets = ffi.new("uint8_t[]", b"".join(program.sets) or b"\0")
        lits = ffi.new("uint8_t[]", program.lits or b"\0")
        ptr = ffi.new("afm_prog *")
        ptr.code, ptr.ncode = code, len(program.code)
        ptr.sets, ptr.nsets = sets, len(program.sets)
        ptr.lits, ptr.nlits = lits, len(program.lits)
        ptr.max_bytes = program.max_bytes
        self._keep = (code, sets, lits)
        self.ptr = ptr
        bad = lib.afm_check(ptr)
        if bad != 0:  # Program.check() mirrors afm_check(): this is a bug in one of them
            raise ValueError(f"afm_check refused a program Program.check() accepted: {bad}")

    def start(self) -> CMatchState:
        return CMatchState(self)

    def match(self, data: bytes) -> Match:
        """One-shot on a fresh state."""
        return CMatchState(self).run(data)


class CMatchState:
    """One connection's ``afm_state``."""

    __slots__ = ("_prog", "_state")

    def __init__(self, prog: CProgram) -> None:
        self._prog = prog
        self._state = prog.ffi.new("afm_state *")
        prog.lib.afm_init(self._state)

    def run(self, data: bytes) -> Match:
        """Continue on the whole prefix seen so far (the C twin of MatchState.run)."""
        p = self._prog
        buf = p.ffi.from_buffer("uint8_t[]", data) if data else p.ffi.NULL
        status = p.lib.afm_run(p.ptr, self._state, buf, len(data))
        s = self._state
        return Match(status, s.consume, s.need if status == 0 else 0)


@functools.lru_cache(maxsize=256)
def compile_program(program: Program) -> CProgram:
    """The C form of ``program`` (cached: filters are configuration, built once)."""
    return CProgram(program)
