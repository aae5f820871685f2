"""Compiled readiness matchers: declarations, their compiler, and the pure-Python interpreter.

A *matcher* is an optimisation a filter may declare (:meth:`Filter.matcher`): a small
program that says "these bytes are certainly ready, consume N" without running the
filter's Python check. The check stays the definition of the filter; the matcher is
proven against it by the fuzz contract (``check_filter``'s ``matcher`` invariant:
whenever the matcher certifies a prefix, ``check(prefix, final=False)`` ACCEPTs it with
the same ``consume``). Anything the matcher cannot certify goes to Python as before.

Design: a tiny bytecode, not a DFA
----------------------------------
The issue offered two shapes: a DFA compiled from a declaration, or generic primitives.
A DFA handles the HTTP head (token, space, target, version, then a terminator search)
well, but not framing: a DNS length or a TLS record length is a counter up to 65535,
which a DFA can only express with one state per value. So the matcher is a small
instruction set interpreted by C (``csrc/afmatch.c``) and, identically, by
:class:`MatchState` here:

* ``NEED n`` (a minimum byte count; or the whole current frame), ``LIT`` (exact bytes), ``RUN`` (a greedy run of a
  256-bit byte set, min..max long) -- the *shape* of a line;
* ``SEARCH`` -- the first of several terminators (``\\r\\n\\r\\n``; a bare ``\\n\\n`` found
  first can mean "never certain"), resumable, ``memchr``-driven in C;
* ``FIELD``, ``PUSH``/``POP``, ``VEC`` -- length-prefixed framing (offset, width, byte
  order, adjustment, allowed range), nested frames (a TLS record carrying a handshake
  carrying an extension block), vectors;
* ``JEQ``, ``JGE_END``, ``JUMP`` -- dispatch on a type field, loops over a list;
* ``READY`` (consume 0 or everything up to the cursor) and ``FAIL``.

Protocol knowledge stays in ``filters/*.py`` as declarations built with
:class:`Builder`; the interpreter knows none. Per connection the state is one fixed
record (program counter, cursor, an 8-deep frame stack, a progress counter): constant
size, and resumable -- each arrival continues where the last stopped, so a growing
prefix is scanned once. It never looks at a byte past ``max_bytes``, never moves past
the innermost frame's end, and runs at most ``len(code) * (max_bytes + 1)`` instructions:
:meth:`Program.check` (and afm_check in C) is a verifier in the way BPF's is -- every loop
must consume input (each cycle of the program holds an instruction that always moves the
cursor forward, and no instruction moves it back), and a program with a loop that might
not is refused when built, naming the jump that closes it. The interpreters still cut off
at ``len(code) * (max_bytes + 2)`` instructions, a second line that a verified program
never reaches.

Answers: :data:`DONE` (certain; ``consume``), :data:`MORE` (not sure yet; ``need`` is a
lower bound on the further bytes before the answer can change -- for ``SO_RCVLOWAT``: exact
for a length field or a frame, 1 while a literal, run or search is in progress) or :data:`NO`
(never certain on any extension: ask the Python check). MORE and NO both mean "run the
filter as today".

This module is pure Python (filters import it to declare matchers);
:mod:`acceptfilter.cmatcher` runs the same programs in C.
"""

from __future__ import annotations

import enum
import functools
import itertools
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import NamedTuple

__all__ = [
    "DONE",
    "LE",
    "MAX_DEPTH",
    "MORE",
    "NO",
    "TERM_FAIL",
    "Builder",
    "Match",
    "MatchState",
    "Op",
    "Program",
    "byte_range",
    "byteset",
    "length_prefixed",
    "min_bytes",
]

#: Results (the same numbers as AFM_MORE / AFM_DONE / AFM_NO in afmatch.h).
MORE = 0
DONE = 1
NO = 2
#: OR into a field width for little-endian (AFM_LE).
LE = 0x100
#: Frames that may be open at once (AFM_MAX_DEPTH).
MAX_DEPTH = 8
#: A SEARCH terminator's length byte ORed with this: found first, the answer is NO (AFM_TERM_FAIL).
TERM_FAIL = 0x80
MAX_CODE = 4096
MAX_TERM = 16
_U32 = 0xFFFFFFFF


class Op(enum.IntEnum):
    """The instruction set; see afmatch.h for each instruction's operands."""

    NEED = 1
    SKIP = 2
    LIT = 3
    RUN = 4
    FIELD = 5
    PUSH = 6
    POP = 7
    VEC = 8
    JEQ = 9
    JGE_END = 10
    JUMP = 11
    SEARCH = 12
    READY = 13
    FAIL = 14


Insn = tuple[int, int, int, int, int, int]
#: A compiled SEARCH table: (terminator, fail) pairs, shortest and longest length, one regex.
_SearchTable = tuple[list[tuple[bytes, bool]], int, int, "re.Pattern[bytes]"]

# Plain ints for the interpreter loop (IntEnum comparisons cost more).
_NEED, _SKIP, _LIT, _RUN, _FIELD, _PUSH, _POP, _VEC, _JEQ, _JGE_END, _JUMP, _SEARCH, _READY = range(1, 14)


class Match(NamedTuple):
    """One answer: ``status`` (MORE, DONE, NO), ``consume`` (DONE), ``need`` (MORE)."""

    status: int
    consume: int = 0
    need: int = 0

    @property
    def ready(self) -> bool:
        """Certainly ready: surface with ``consume`` without asking the filter."""
        return self.status == DONE


def byteset(members: Iterable[int] | bytes) -> bytes:
    """A 256-bit byte set (32 bytes, bit ``b & 7`` of byte ``b >> 3``)."""
    bits = bytearray(32)
    for b in members:
        bits[b >> 3] |= 1 << (b & 7)
    return bytes(bits)


def byte_range(lo: int, hi: int) -> range:
    """The bytes lo..hi inclusive, for :func:`byteset`."""
    return range(lo, hi + 1)


def _members(bits: bytes) -> set[int]:
    return {b for b in range(256) if bits[b >> 3] >> (b & 7) & 1}


def _width_ok(w: int) -> bool:
    return w & ~(LE | 7) == 0 and 1 <= w & 7 <= 4


def _u32(v: int) -> bool:
    return 0 <= v <= _U32


@dataclass(frozen=True)
class Program:
    """A compiled matcher: instructions, byte sets, literals and the byte cap. Immutable, hashable."""

    code: tuple[Insn, ...]
    sets: tuple[bytes, ...]
    lits: bytes
    max_bytes: int

    def __post_init__(self) -> None:
        bad = self.check()
        if bad is not None:
            raise ValueError(f"bad matcher program: {bad}")

    def check(self) -> str | None:
        """What afm_check() would refuse, or None (mirrors it, so C never sees a bad program)."""
        if not 1 <= len(self.code) <= MAX_CODE or not 1 <= self.max_bytes <= _U32:
            return "empty or too long, or max_bytes out of range"
        if any(len(s) != 32 for s in self.sets):
            return "a byte set is not 32 bytes"
        n = len(self.code)
        for i, (op, a, b, c, d, e) in enumerate(self.code):
            ok = True
            if op == Op.NEED:
                ok = _u32(a) and b in (0, 1)
            elif op == Op.SKIP:
                ok = _u32(a)
            elif op == _LIT:
                ok = _u32(a) and 1 <= b <= MAX_TERM * 16 and a + b <= len(self.lits)
            elif op == Op.RUN:
                ok = 0 <= a < len(self.sets) and _u32(b) and _u32(c) and b <= c
            elif op == _FIELD:
                ok = _u32(a) and _width_ok(b) and _u32(c) and _u32(d) and _u32(e)
            elif op == _PUSH:
                ok = _u32(a) and _width_ok(b) and -_U32 <= c <= _U32 and _u32(d) and _u32(e)
            elif op in (Op.POP, Op.READY):
                ok = a in (0, 1)
            elif op == _VEC:
                ok = _width_ok(a)
            elif op == _JEQ:
                ok = _u32(a) and _width_ok(b) and _u32(c) and 0 <= d < n
            elif op in (Op.JGE_END, Op.JUMP):
                ok = 0 <= a < n
            elif op == _SEARCH:
                ok = _u32(a) and 1 <= b <= 8 and 0 <= c <= MAX_TERM
                off = a
                for _ in range(b if ok else 0):
                    if off >= len(self.lits):
                        ok = False
                        break
                    tl = self.lits[off] & ~TERM_FAIL
                    ok = 1 <= tl <= MAX_TERM and off + 1 + tl <= len(self.lits)
                    if not ok:
                        break
                    off += 1 + tl
                # The cursor never moves back: back is at most the shortest terminator.
                ok = ok and c <= min(len(t) for t, _ in self.terms(a, b))
            elif op != Op.FAIL:
                ok = False
            if not ok:
                return f"instruction {i} {self.code[i]!r}"
        loop = self._loop_without_input()
        if loop is not None:
            i, target = loop
            return (f"instruction {i} {self.code[i]!r} jumps back to instruction {target} in a loop that may "
                    "consume no input (every loop must move the cursor forward: it could run forever)")
        return None

    def _consumes(self, insn: Insn) -> bool:
        """Whether the instruction always moves the cursor forward by at least one byte."""
        op, a, b, c, _d, _e = insn
        if op == _SKIP:
            return a >= 1
        if op == _RUN:
            return b >= 1
        if op == _SEARCH:
            return min(len(t) for t, _ in self.terms(a, b)) > c
        return op in (_LIT, _VEC)

    def _successors(self, i: int) -> tuple[int, ...]:
        op, a, _b, _c, d, _e = self.code[i]
        after = (i + 1,) if i + 1 < len(self.code) else ()
        if op == _JUMP:
            return (a,)
        if op == _JEQ:
            return (*after, d)
        if op == _JGE_END:
            return (*after, a)
        if op in (Op.READY, Op.FAIL):
            return ()
        return after

    def _loop_without_input(self) -> tuple[int, int] | None:
        """The verifier's loop rule (afmatch.c's loop_without_input, step for step): a depth-first
        search over the instructions that do not consume finds a cycle among them if there is
        one; returns (the instruction on it that jumps back, its target), or None."""
        n = len(self.code)
        color = [3 if self._consumes(insn) else 0 for insn in self.code]  # 0 unseen, 1 on the stack, 2 done
        for root in range(n):
            if color[root]:
                continue
            stack = [root]
            tried = [0]
            color[root] = 1
            while stack:
                u = stack[-1]
                successors = self._successors(u)
                if tried[-1] >= len(successors):
                    color[u] = 2
                    stack.pop()
                    tried.pop()
                    continue
                v = successors[tried[-1]]
                tried[-1] += 1
                if color[v] in (2, 3):
                    continue
                if color[v] == 1:  # a cycle: the stack from v, then back to v; name its backward jump
                    cycle = [*stack[stack.index(v):], v]
                    return next((x, y) for x, y in itertools.pairwise(cycle) if y <= x)
                color[v] = 1
                stack.append(v)
                tried.append(0)
        return None

    def start(self) -> MatchState:
        """A fresh per-connection state."""
        return MatchState(self)

    def match(self, data: bytes) -> Match:
        """One-shot: run a fresh state on ``data``."""
        return MatchState(self).run(data)

    @functools.cached_property
    def _run_patterns(self) -> tuple[re.Pattern[bytes], ...]:
        """One ``[set]*`` regex per byte set: RUN scans at C speed in the mirror too."""
        out = []
        for bits in self.sets:
            members = sorted(_members(bits))
            body = b"".join(re.escape(bytes([m])) for m in members)
            out.append(re.compile(b"[" + body + b"]*" if members else b""))
        return tuple(out)

    @functools.cached_property
    def _search_tables(self) -> dict[tuple[int, int], _SearchTable]:
        """Per SEARCH table: the terminators (with fail flags), their lengths, and one regex for all of them.

        A regex alternation finds the leftmost position where a terminator matches, trying
        them in order there: SEARCH's rule, for every position where all of them fit.
        """
        out = {}
        for op, a, b, *_ in self.code:
            if op == _SEARCH:
                terms = self.terms(a, b)
                rx = re.compile(b"|".join(b"(" + re.escape(t) + b")" for t, _ in terms))
                out[a, b] = (terms, min(len(t) for t, _ in terms), max(len(t) for t, _ in terms), rx)
        return out

    def terms(self, offset: int, count: int) -> list[tuple[bytes, bool]]:
        """The SEARCH terminator table at ``lits[offset]``: (terminator, found first means NO)."""
        out = []
        for _ in range(count):
            n = self.lits[offset] & ~TERM_FAIL
            out.append((self.lits[offset + 1 : offset + 1 + n], bool(self.lits[offset] & TERM_FAIL)))
            offset += 1 + n
        return out


def _read(data: bytes, q: int, w: int) -> int:
    return int.from_bytes(data[q : q + (w & 7)], "little" if w & LE else "big")


class MatchState:
    """One connection's matcher state; :meth:`run` is the Python mirror of afm_run()."""

    __slots__ = ("aux", "consume", "depth", "ends", "need", "pc", "pos", "program", "status", "steps")

    def __init__(self, program: Program) -> None:
        self.program = program
        self.pc = 0
        self.pos = 0
        self.aux = 0
        self.depth = 0
        self.ends = [0] * MAX_DEPTH
        self.status = MORE
        self.consume = 0
        self.need = 0
        self.steps = 0

    def _result(self) -> Match:
        return Match(self.status, self.consume, self.need if self.status == MORE else 0)

    def _finish(self, status: int) -> Match:
        self.status = status
        return self._result()

    def _more(self, need: int) -> Match:
        self.need = min(need, _U32)
        return self._result()

    def run(self, data: bytes) -> Match:
        """Continue on ``data`` (the whole prefix so far, as peeked). Same answers as the C matcher."""
        if self.status != MORE:
            return self._result()
        p = self.program
        code = p.code
        avail = min(len(data), p.max_bytes)
        budget = len(code) * (p.max_bytes + 2)
        self.need = 0
        while True:
            if self.pc >= len(code) or self.steps > budget:
                return self._finish(NO)
            op, a, b, c, d, e = code[self.pc]
            pos = self.pos
            limit = self.ends[self.depth - 1] if self.depth else p.max_bytes
            next_pc = self.pc + 1
            if op == _NEED:
                q = limit if b else pos + a
                if q > limit:
                    return self._finish(NO)
                if q > avail:
                    return self._more(q - avail)
            elif op == _SKIP:
                q = pos + a
                if q > limit:
                    return self._finish(NO)
                self.pos = q
            elif op == _LIT:
                if pos + b > limit:
                    return self._finish(NO)
                have = min(max(avail - pos, 0), b)
                if data[pos : pos + have] != p.lits[a : a + have]:
                    return self._finish(NO)
                if have < b:  # need 1: the next byte may already mismatch
                    return self._more(1)
                self.pos = pos + b
            elif op == _RUN:
                # As afm_run's byte loop: stop at max, then at the limit, then wait at avail.
                q = pos + self.aux
                stop = min(pos + c, limit, avail)
                if q < stop:
                    q = p._run_patterns[a].match(data, q, stop).end()  # type: ignore[union-attr]  # `*` always matches
                if q >= stop and q < pos + c and q < limit:
                    self.aux = q - pos
                    return self._more(1)
                if q - pos < b:
                    return self._finish(NO)
                self.aux = 0
                self.pos = q
            elif op in (_FIELD, _JEQ, _PUSH, _VEC):
                off, w = (0, a) if op == _VEC else (a, b)
                q = pos + off
                end = q + (w & 7)
                if end > limit:
                    return self._finish(NO)
                if end > avail:
                    return self._more(end - avail)
                v = _read(data, q, w)
                if op == _FIELD:
                    if not d <= v & c <= e:
                        return self._finish(NO)
                elif op == _JEQ:
                    if v == c:
                        next_pc = d
                elif op == _VEC:
                    np = pos + (w & 7) + v
                    if np > limit:
                        return self._finish(NO)
                    self.pos = np
                else:
                    if not d <= v <= e or self.depth >= MAX_DEPTH:
                        return self._finish(NO)
                    frame_end = pos + v + c
                    if frame_end < pos or frame_end > limit:
                        return self._finish(NO)
                    self.ends[self.depth] = frame_end
                    self.depth += 1
            elif op == _POP:
                if self.depth == 0 or (a == 0 and pos != limit) or pos > limit:
                    return self._finish(NO)
                self.pos = limit
                self.depth -= 1
            elif op == _JGE_END:
                if pos >= limit:
                    next_pc = a
            elif op == _JUMP:
                next_pc = a
            elif op == _SEARCH:
                found = self._search(data, avail, limit, p._search_tables[a, b], c)
                if found is not None:
                    return found
            elif op == _READY:
                if pos > avail:
                    return self._more(pos - avail)
                self.consume = pos if a else 0
                return self._finish(DONE)
            else:
                return self._finish(NO)
            self.pc = next_pc
            self.steps += 1

    def _search(
        self,
        data: bytes,
        avail: int,
        limit: int,
        table: _SearchTable,
        back: int,
    ) -> Match | None:
        """The first position where a terminator matches; None when found (pos moved), else the answer.

        At one position the terminators are tried in order and an earlier one that may still
        match (cut off by ``avail``) is waited for: the answer never depends on the chunking.
        """
        terms, min_len, max_len, rx = table
        pos = self.pos
        if back > pos:
            return self._finish(NO)
        i = self.aux - 1 if self.aux else pos - back
        # Where every terminator fits before both avail and limit, each one matches or not:
        # the regex decides those positions at once (C walks them with memchr).
        end = min(avail, limit)
        if i + max_len <= end:
            m = rx.search(data, i, end)
            if m is not None and m.start() + max_len <= end:
                if terms[m.lastindex - 1][1]:  # type: ignore[operator]  # one group per terminator
                    return self._finish(NO)
                self.aux = 0
                self.pos = m.end()
                return None
            i = max(i, end - max_len + 1)  # no terminator starts before this one
        while True:  # the last few positions, byte by byte as in C
            if i + min_len > limit:
                return self._finish(NO)
            for term, fail in terms:
                n = len(term)
                if i + n > limit:
                    continue
                have = min(max(avail - i, 0), n)
                if data[i : i + have] != term[:have]:
                    continue
                if have < n:  # need 1: a shorter terminator at a later position may complete first
                    self.aux = i + 1
                    return self._more(1)
                if fail:
                    return self._finish(NO)
                self.aux = 0
                self.pos = i + n
                return None
            i += 1


class Builder:
    """Assemble a :class:`Program` with labels; each method emits one instruction.

    Widths are 1..4 bytes, big-endian unless ``le=True``. A label may be used before it is
    placed. :meth:`build` also checks that every variable-length ``run`` is followed by a
    ``run`` or ``lit`` that cannot start with one of its bytes, so the greedy run is the
    only way to match (the shape means what a regular expression would).
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._code: list[tuple[int, int | str, int, int, int | str, int]] = []
        self._labels: dict[str, int] = {}
        self._sets: list[bytes] = []
        self._lits = bytearray()

    def _emit(self, op: Op, a: int | str = 0, b: int = 0, c: int = 0, d: int | str = 0, e: int = 0) -> Builder:
        self._code.append((int(op), a, b, c, d, e))  # labels (str) are resolved in build()
        return self

    def _lit(self, data: bytes) -> int:
        off = self._lits.find(data)
        if off < 0:
            off = len(self._lits)
            self._lits += data
        return off

    def _set(self, members: bytes) -> int:
        if members not in self._sets:
            self._sets.append(members)
        return self._sets.index(members)

    @staticmethod
    def _w(width: int, le: bool) -> int:
        return width | (LE if le else 0)

    def label(self, name: str) -> Builder:
        if name in self._labels:
            raise ValueError(f"label {name!r} placed twice")
        self._labels[name] = len(self._code)
        return self

    def need(self, n: int) -> Builder:
        """Wait until ``n`` bytes from the cursor are there."""
        return self._emit(Op.NEED, n)

    def need_frame(self) -> Builder:
        """Wait until the whole innermost frame is there: ``need`` is then the rest of it (SO_RCVLOWAT)."""
        return self._emit(Op.NEED, 0, 1)

    def skip(self, n: int) -> Builder:
        return self._emit(Op.SKIP, n)

    def lit(self, data: bytes) -> Builder:
        """Exactly these bytes at the cursor."""
        return self._emit(Op.LIT, self._lit(data), len(data))

    def run(self, members: Iterable[int] | bytes, lo: int, hi: int) -> Builder:
        """A greedy run of ``lo..hi`` bytes from ``members``."""
        return self._emit(Op.RUN, self._set(byteset(members)), lo, hi)

    def field(self, off: int, width: int, *, lo: int, hi: int, mask: int = _U32, le: bool = False) -> Builder:
        """``lo <= (field & mask) <= hi`` for the field at cursor + off."""
        return self._emit(Op.FIELD, off, self._w(width, le), mask, lo, hi)

    def eq(self, off: int, width: int, value: int, *, le: bool = False) -> Builder:
        return self.field(off, width, lo=value, hi=value, le=le)

    def push(self, off: int, width: int, *, adjust: int, lo: int = 0, hi: int = _U32, le: bool = False) -> Builder:
        """Open a frame ending at cursor + value + adjust (value at cursor + off, within lo..hi)."""
        return self._emit(Op.PUSH, off, self._w(width, le), adjust, lo, hi)

    def pop(self, *, exact: bool = True) -> Builder:
        """Close the innermost frame: the cursor must be at its end (exact) or moves there."""
        return self._emit(Op.POP, 0 if exact else 1)

    def vec(self, width: int, *, le: bool = False) -> Builder:
        """Skip a length-prefixed vector."""
        return self._emit(Op.VEC, self._w(width, le))

    def jeq(self, off: int, width: int, value: int, target: str, *, le: bool = False) -> Builder:
        return self._emit(Op.JEQ, off, self._w(width, le), value, target)

    def jge_end(self, target: str) -> Builder:
        """Jump when the cursor is at (or past) the innermost frame's end: a loop's exit."""
        return self._emit(Op.JGE_END, target)

    def jump(self, target: str) -> Builder:
        return self._emit(Op.JUMP, target)

    def search(self, terms: Iterable[bytes], *, back: int = 0, fail: Iterable[bytes] = ()) -> Builder:
        """Move past the first terminator found from cursor - back (it may overlap the shape).

        ``fail`` are terminators that, found first, make the answer NO: ends the filter
        accepts but the matcher does not certify. At one position ``terms`` are tried
        before ``fail``, each in order.
        """
        items = [(bytes(t), 0) for t in terms] + [(bytes(t), TERM_FAIL) for t in fail]
        table = b"".join(bytes([len(t) | flag]) + t for t, flag in items)
        return self._emit(Op.SEARCH, self._lit(table), len(items), back)

    def ready(self, *, consume: bool = False) -> Builder:
        """Certain once the bytes up to the cursor are there; consume them or nothing."""
        return self._emit(Op.READY, 1 if consume else 0)

    def fail(self) -> Builder:
        return self._emit(Op.FAIL)

    def build(self) -> Program:
        def resolve(v: int | str) -> int:
            if isinstance(v, str):
                if v not in self._labels:
                    raise ValueError(f"label {v!r} used but never placed")
                return self._labels[v]
            return v

        code: list[Insn] = []
        for op, a, b, c, d, e in self._code:
            code.append((op, resolve(a), b, c, resolve(d), e))
        program = Program(tuple(code), tuple(self._sets), bytes(self._lits), self.max_bytes)
        self._check_runs(program)
        return program

    @staticmethod
    def _check_runs(p: Program) -> None:
        for i, (op, a, b, c, _d, _e) in enumerate(p.code):
            if op != Op.RUN or b == c or i + 1 >= len(p.code):
                continue
            mine = _members(p.sets[a])
            nop, na, *_ = p.code[i + 1]
            follow = _members(p.sets[na]) if nop == Op.RUN else {p.lits[na]} if nop == Op.LIT else None
            if follow is not None and mine & follow:
                raise ValueError(f"run at {i} is not followed by a disjoint run or literal: the shape is ambiguous")


def min_bytes(n: int, max_bytes: int) -> Program:
    """Ready once ``n`` bytes are there (dataready's SO_RCVLOWAT)."""
    return Builder(max_bytes).need(n).ready().build()


def length_prefixed(
    max_bytes: int, *, off: int = 0, width: int = 2, adjust: int = 2, lo: int = 0, hi: int = _U32, le: bool = False
) -> Program:
    """Ready once one whole length-prefixed message is there (value at ``off``, frame = value + adjust)."""
    return Builder(max_bytes).push(off, width, adjust=adjust, lo=lo, hi=hi, le=le).pop(exact=False).ready().build()
