"""Which arcs of a filter's own source one input reaches: ``sys.monitoring`` on 3.12+, ``sys.settrace`` before.

Only code in the filter's module files is recorded (other frames are switched off on
first sight), so the cost is paid where the feedback comes from. An *arc* is a line pair
or a jump between instructions (``settrace`` with opcode events), or a line or a branch
(``sys.monitoring``). A *feature* is an arc with how often one input took it, in AFL's
buckets (1, 2, 3, 4-7, 8-15, 16-31, 32-127, 128+): so an input where two of four fields
pass a check is new next to one where one passed, and the search has a gradient to
follow towards "all four". New features are what the guided fuzzer keeps an input for.

When another tracer already owns the hook (coverage.py, a debugger), :func:`available`
says so and the fuzzer runs unguided rather than steal it.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import CodeType, FrameType
from typing import Any

__all__ = ["Feature", "Tracer", "available"]

Feature = tuple[str, int, int, int]
Arc = tuple[str, int, int]


def bucket(count: int) -> int:
    """AFL's hit-count bucket of ``count``."""
    if count <= 3:
        return count
    return 4 if count < 8 else 8 if count < 16 else 16 if count < 32 else 32 if count < 128 else 128

_MONITORING = sys.version_info >= (3, 12)


def available() -> bool:
    """True when nothing else traces this thread (guidance would displace it)."""
    if _MONITORING:
        mon: Any = getattr(sys, "monitoring")  # noqa: B009 (3.12+ only; keeps mypy on 3.11 quiet)
        return any(mon.get_tool(i) is None for i in range(6))
    return sys.gettrace() is None


class Tracer:
    """Records the features that code from ``files`` reaches, into the set :meth:`recording` yields.

    The hook is installed once for a whole fuzzing phase (:meth:`installed`); between
    recordings the features land in a scratch set nobody reads.
    """

    def __init__(self, files: set[str]) -> None:
        self.files = frozenset(files)
        self._out: list[dict[Arc, int]] = [{}]

    @contextmanager
    def installed(self) -> Iterator[None]:
        """Install the hook for a whole phase (``sys.monitoring``; ``settrace`` goes in per recording)."""
        if _MONITORING:
            with self._monitoring():
                yield
        else:
            yield

    @contextmanager
    def recording(self) -> Iterator[set[Feature]]:
        """Collect into a fresh set, yielded; the set is complete when the block ends."""
        counts: dict[Arc, int] = {}
        features: set[Feature] = set()
        self._out[0] = counts
        try:
            if _MONITORING:
                yield features
            else:  # only around the filter's calls: a global tracer costs every other Python call too
                with self._settrace():
                    yield features
        finally:
            self._out[0] = {}
            features.update((*arc, bucket(n)) for arc, n in counts.items())

    @contextmanager
    def _settrace(self) -> Iterator[None]:
        files, holder = self.files, self._out

        def local_for(code: CodeType) -> Callable[[FrameType, str, Any], Any]:
            last = -code.co_firstlineno
            offset = -1
            name = f"{code.co_filename}:{code.co_firstlineno}"

            def local(frame: FrameType, event: str, arg: Any) -> Any:
                nonlocal last, offset
                out = holder[0]
                if event == "opcode":
                    at = frame.f_lasti
                    if at != offset + 2:  # a jump: which way a branch went, on this line or another
                        arc = (name, offset, at)
                        out[arc] = out.get(arc, 0) + 1
                    offset = at
                    return local
                if event == "line":
                    arc = (name, -last, frame.f_lineno)
                    last = frame.f_lineno
                elif event == "return":
                    arc = (name, -last, 0)
                else:
                    arc = (name, -last, -1)
                out[arc] = out.get(arc, 0) + 1
                return local

            return local

        def global_(frame: FrameType, event: str, arg: Any) -> Any:
            if event != "call" or frame.f_code.co_filename not in files:
                return None
            frame.f_trace_opcodes = True
            return local_for(frame.f_code)

        previous = sys.gettrace()
        sys.settrace(global_)
        try:
            yield
        finally:
            sys.settrace(previous)

    @contextmanager
    def _monitoring(self) -> Iterator[None]:  # pragma: no cover - exercised on 3.12+ only
        mon: Any = getattr(sys, "monitoring")  # noqa: B009
        tool = next(i for i in range(6) if mon.get_tool(i) is None)
        files, holder, disable = self.files, self._out, mon.DISABLE

        def line(code: CodeType, lineno: int) -> Any:
            if code.co_filename not in files:
                return disable
            arc = (code.co_filename, -1, lineno)
            out = holder[0]
            out[arc] = out.get(arc, 0) + 1
            return None

        def branch(code: CodeType, offset: int, dest: int) -> Any:
            if code.co_filename not in files:
                return disable
            arc = (f"{code.co_filename}:{code.co_firstlineno}", offset, dest)
            out = holder[0]
            out[arc] = out.get(arc, 0) + 1
            return None

        events = mon.events
        mon.use_tool_id(tool, "acceptfilter-fuzz")
        try:
            mon.register_callback(tool, events.LINE, line)
            mon.register_callback(tool, events.BRANCH, branch)
            mon.set_events(tool, events.LINE | events.BRANCH)
            mon.restart_events()
            yield
        finally:
            mon.set_events(tool, 0)
            mon.register_callback(tool, events.LINE, None)
            mon.register_callback(tool, events.BRANCH, None)
            mon.free_tool_id(tool)
