"""Connections must not see each other: fresh filters for one-connection rules, and the isolation rule.

The engine builds one filter per listener and calls ``session()`` once per connection, on
that one instance. State kept on the instance (a filter that is its own session) or in a
mutable class attribute (``buf = bytearray()`` in a class body, then ``self.buf += ...``)
is therefore shared by every connection. Two things follow for the fuzzer:

* the one-connection rules must not see that sharing, or the answers depend on which
  examples ran before and hypothesis blames its own data generation ("Flaky"): every
  connection they simulate gets a :class:`Pristine` world -- class attributes restored to
  their import-time values and, for a filter that is its own session, a copy of the
  filter as it was built;
* :func:`check_interleaved` then shows the sharing on purpose: several connections' chunks
  interleaved on one instance (and on instances of the same class with other options),
  each decision compared with the same connection alone on a pristine filter.
"""

from __future__ import annotations

import collections
import copy
from collections.abc import Callable, Sequence
from typing import Any

from ..filter import Checker, Decision, Filter

__all__ = ["ClassState", "Pristine", "check_interleaved"]

_PLAIN = (list, dict, set, bytearray, collections.deque, int, float, bool, str, bytes, tuple, type(None))
_BASES = ("builtins", "acceptfilter.filter", "abc", "typing")


class ClassState:
    """The plain-data class attributes of a filter's classes (and its sessions'), saved and restorable."""

    def __init__(self) -> None:
        self._saved: dict[tuple[type, str], Any] = {}
        self._seen: set[type] = set()

    def watch(self, cls: type) -> None:
        """Save ``cls``'s (and its bases') class attributes as they are now, the first time it is seen."""
        for klass in cls.__mro__:
            if klass in self._seen or klass.__module__ in _BASES:
                continue
            self._seen.add(klass)
            for name, value in vars(klass).items():
                if name.startswith("__") or not isinstance(value, _PLAIN):
                    continue
                try:
                    self._saved[klass, name] = copy.deepcopy(value)
                except Exception:  # not copyable: leave it alone
                    continue

    def restore(self) -> None:
        """Put every saved attribute back (a copy, so the saved one stays clean)."""
        for (klass, name), value in self._saved.items():
            try:
                setattr(klass, name, copy.deepcopy(value))
            except Exception:  # a read-only class (extension type): nothing to restore
                continue


class Pristine:
    """Makes filters and sessions as a fresh process would: per connection, nothing left from others."""

    def __init__(self, flt: Filter) -> None:
        self.flt = flt
        self.classes = ClassState()
        self.classes.watch(type(flt))
        self._templates: dict[int, Filter | None] = {}
        self.template(flt)

    def template(self, flt: Filter) -> Filter | None:
        """A copy of ``flt`` as built, or None when it cannot be copied (then the instance itself is used)."""
        key = id(flt)
        if key not in self._templates:
            try:
                self._templates[key] = copy.deepcopy(flt)
            except Exception:
                self._templates[key] = None
        return self._templates[key]

    def instance(self, flt: Filter) -> Filter:
        """A filter equal to ``flt`` as built: a copy of the template, or ``flt`` itself if none."""
        template = self.template(flt)
        if template is None:
            return flt
        try:
            return copy.deepcopy(template)
        except Exception:
            return flt

    def variant(self) -> Filter | None:
        """The same class with other options (another ``max_bytes``), or None if the filter cannot be copied."""
        template = self.template(self.flt)
        if template is None:
            return None
        other = copy.deepcopy(template)
        other.max_bytes = max(1, self.flt.max_bytes // 2) if self.flt.max_bytes > 1 else 2
        self._templates[id(other)] = copy.deepcopy(other)
        return other

    def session(self, open_session: Callable[[Filter], Checker], flt: Filter | None = None) -> Checker:
        """A session for one simulated connection in a pristine world."""
        self.classes.restore()
        base = self.flt if flt is None else flt
        session = open_session(base)
        if session is base:  # the filter is its own session: give it a copy as built, not a used one
            session = open_session(self.instance(base))
        self.classes.watch(type(session))
        return session


#: One step of an interleaving: (connection index, data so far, final).
Step = tuple[int, bytes, bool]


def interleave(conns: Sequence[tuple[bytes, Sequence[int]]], order: Sequence[int]) -> list[Step]:
    """The engine's calls for ``conns`` (payload, cuts) when chunks arrive in ``order``, then the rest, then EOFs.

    Each entry of ``order`` is a connection index: its next chunk arrives (or, all chunks in,
    its EOF). Connections not finished by then get their remaining chunks and EOF in turn.
    """
    prefixes = []
    for data, cuts in conns:
        ends = sorted({c for c in cuts if 0 < c < len(data)} | {len(data)})
        prefixes.append([data[:e] for e in ends if e > 0])
    pos = [0] * len(conns)
    ended = [False] * len(conns)
    steps: list[Step] = []

    def advance(i: int) -> None:
        if ended[i]:
            return
        if pos[i] < len(prefixes[i]):
            steps.append((i, prefixes[i][pos[i]], False))
            pos[i] += 1
        else:
            steps.append((i, conns[i][0], True))
            ended[i] = True

    for i in order:
        advance(i % len(conns))
    for i in range(len(conns)):
        while not ended[i]:
            advance(i)
    return steps


def run_steps(
    steps: Sequence[Step],
    sessions: Callable[[int], Checker],
    call: Callable[[Checker, bytes, bool], Decision],
) -> dict[int, Decision]:
    """Feed ``steps`` as the engine would (a decided connection is not asked again); the decision per step index."""
    live: dict[int, Checker] = {}
    done: set[int] = set()
    out: dict[int, Decision] = {}
    for n, (conn, data, final) in enumerate(steps):
        if conn in done:
            continue
        if conn not in live:
            live[conn] = sessions(conn)
        d = call(live[conn], data, final)
        out[n] = d
        if d.decided:
            done.add(conn)
    return out


def check_interleaved(
    steps: Sequence[Step],
    owners: Sequence[Filter],
    pristine: Pristine,
    open_session: Callable[[Filter], Checker],
    call: Callable[[Checker, bytes, bool], Decision],
    same: Callable[[Decision, Decision], bool],
    show: Callable[[Decision], str],
) -> tuple[str, str] | None:
    """(rule, description) of the first decision that differs from the connection alone, or None.

    ``owners[i]`` is the (shared) filter connection ``i`` belongs to. Each connection alone
    runs on a pristine copy of its owner; together they run on the owners themselves.
    """
    alone: dict[int, Decision] = {}
    for conn in sorted({c for c, _, _ in steps}):
        mine = [(n, s) for n, s in enumerate(steps) if s[0] == conn]
        runs = []
        for _ in range(2):  # twice: a connection that differs from itself alone is not a leak between two
            owner = pristine.instance(owners[conn])  # its own filter, as built
            pristine.classes.restore()
            got = run_steps([s for _, s in mine], lambda _c, o=owner: _watched(pristine, open_session, o), call)  # type: ignore[misc]
            runs.append({mine[k][0]: d for k, d in got.items()})
        for n in runs[0]:
            if n in runs[1] and not same(runs[0][n], runs[1][n]):
                return "deterministic", (
                    f"same bytes, two answers: {show(runs[0][n])} then {show(runs[1][n])} for {steps[n][1]!r} "
                    "on two fresh filters"
                )
        alone.update(runs[0])
    pristine.classes.restore()
    built = {id(o): pristine.instance(o) for o in owners}  # the listener's filters, as built, then shared
    together = run_steps(steps, lambda c: _watched(pristine, open_session, built[id(owners[c])]), call)
    pristine.classes.restore()
    for n in sorted(together):
        if n in alone and not same(together[n], alone[n]):
            conn, data, final = steps[n]
            trail = ", ".join(
                f"c{c}{' EOF' if f else ''} {d[-24:]!r}" for c, d, f in steps[: n + 1]
            )
            kind = "this filter" if owners[conn] is owners[0] else "another instance of the class"
            return "isolation", (
                f"state leaks between connections: connection c{conn} got {show(together[n])} on {data!r}"
                f"{' at EOF' if final else ''} after other connections used {kind}, but {show(alone[n])} alone; "
                f"interleaving (connection, last bytes): {trail}"
            )
    return None


def _watched(pristine: Pristine, open_session: Callable[[Filter], Checker], owner: Filter) -> Checker:
    session = open_session(owner)
    pristine.classes.watch(type(session))
    return session
