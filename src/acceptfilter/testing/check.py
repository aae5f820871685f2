"""check_filter(): property-based proof that a filter keeps the contract in filter.py.

Every example feeds one payload to the filter in two ways -- one-shot on fresh sessions
and chunk by chunk to a single session, as the engine does -- and compares. A broken
contract raises :class:`ContractViolation` (an AssertionError, so pytest shows it as a
test failure) naming the invariant, and hypothesis shrinks to a minimal counterexample.

Before hypothesis runs, a coverage-guided phase (:mod:`.guided`) searches for inputs that
reach new arcs of the filter's module; they seed hypothesis. Several connections are then
interleaved on one filter (:mod:`.isolation`). Every simulated connection otherwise gets a
pristine filter, so a filter whose answers depend on earlier calls is reported as a
contract violation, never as hypothesis' own flakiness.
"""

from __future__ import annotations

import json
import math
import random
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, cast

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.database import DirectoryBasedExampleDatabase
from hypothesis.errors import Flaky
from hypothesis.stateful import RuleBasedStateMachine, initialize, precondition, rule, run_state_machine_as_test

from ..filter import Checker, Decision, Filter, Verdict
from ..matcher import DONE, MORE, Match, MatchState, Program
from ..registry import load_filter
from . import dictionary, guided, strategies, tracing
from .budget import DEFAULT_EXAMPLES, DEFAULT_GUIDED_SECONDS, cache_dir
from .corpus import FIRST_FLIGHTS
from .isolation import Pristine, check_interleaved, interleave

# Some hypothesis releases leave this untyped; a typed alias keeps mypy --strict quiet either way.
_run_machine: Callable[..., None] = run_state_machine_as_test

__all__ = [
    "DEFAULT_EXAMPLES",
    "DEFAULT_TIME_LIMIT",
    "ContractViolation",
    "cache_dir",
    "check_cap",
    "check_filter",
    "check_payload",
    "check_tails",
    "filter_state_machine",
    "input_strategy",
    "seeded",
]

#: Characters info's JSON may take beyond the length of the input it describes.
INFO_LIMIT = 4096

#: Seconds one check() call may take. Generous: a filter is on the hot path, but CI machines stall.
DEFAULT_TIME_LIMIT = 0.25

#: The peer address sessions are made for, when a filter has ``peer_session(peer)``.
DEFAULT_PEER: tuple[Any, ...] = ("127.0.0.1", 40000)

#: The invariants, by the names used in ContractViolation.invariant.
INVARIANTS = (
    "raises",
    "chunking",
    "extension",
    "final-wait",
    "max-bytes",
    "consume",
    "deterministic",
    "slow",
    "sockets",
    "matcher",
    "isolation",
    "info",
)


class ContractViolation(AssertionError):
    """A filter broke the contract; ``invariant`` names which rule (one of INVARIANTS)."""

    def __init__(self, invariant: str, message: str) -> None:
        super().__init__(f"[{invariant}] {message}")
        self.invariant = invariant


def _key(d: Decision) -> tuple[Verdict, tuple[tuple[str, Any], ...], int, str | None]:
    """What must agree between two decisions: everything except the free-text reason."""
    return (d.verdict, tuple(sorted(dict(d.info).items(), key=lambda kv: kv[0])), d.consume, d.route)


def _show(d: Decision) -> str:
    """A decision as a counterexample shows it: only the fields that differ from their defaults.

    ``ACCEPT(info={}, consume=0, route=None)`` buries what matters; ``ACCEPT`` or
    ``ACCEPT(info={'command': 'SET'})`` does not.
    """
    parts = []
    if d.info:
        parts.append(f"info={dict(d.info)!r}")
    if d.consume:
        parts.append(f"consume={d.consume}")
    if d.route is not None:
        parts.append(f"route={d.route!r}")
    return f"{d.verdict.name}({', '.join(parts)})" if parts else d.verdict.name


_PRISTINE: weakref.WeakKeyDictionary[Filter, Pristine] = weakref.WeakKeyDictionary()


def pristine(flt: Filter) -> Pristine:
    """The filter's :class:`Pristine` (made once per filter, while its classes are as imported)."""
    try:
        found = _PRISTINE.get(flt)
        if found is None:
            found = _PRISTINE[flt] = Pristine(flt)
        return found
    except TypeError:  # unhashable or not weak-referenceable: one per runner
        return Pristine(flt)


def _plain(value: Any, depth: int = 0) -> str | None:
    """Why ``value`` is not plain JSON data (str, int, finite float, bool, None, lists, str-keyed dicts), or None."""
    if depth > 8:
        return "nests deeper than 8 levels"
    if value is None or isinstance(value, str | bool | int):
        return None
    if isinstance(value, float):
        return None if math.isfinite(value) else f"holds {value!r}, which JSON cannot carry"
    if isinstance(value, list | tuple):
        return next((p for p in (_plain(v, depth + 1) for v in value) if p), None)
    if isinstance(value, Mapping):
        for k, v in value.items():
            if not isinstance(k, str):
                return f"has the key {k!r}, not a str"
            problem = _plain(v, depth + 1)
            if problem:
                return problem
        return None
    return f"holds {type(value).__name__} {value!r:.60}, not plain JSON data (str, int, float, bool, None, list, dict)"


def info_problem(info: Any, data_length: int) -> str | None:
    """Why a decision's ``info`` breaks the info rule, or None: plain JSON data, bounded in size."""
    if not isinstance(info, Mapping):
        return f"is a {type(info).__name__}, not a mapping"
    problem = _plain(info)
    if problem:
        return problem
    size = len(json.dumps(dict(info), ensure_ascii=False))
    if size > INFO_LIMIT + data_length:
        return f"is {size} characters of JSON for {data_length} bytes of input (limit {INFO_LIMIT} + the input)"
    return None


class _Runner:
    """Calls a filter's checkers, turning exceptions, bad return types and slowness into violations."""

    def __init__(self, flt: Filter, time_limit: float, peer: tuple[Any, ...] | None = DEFAULT_PEER) -> None:
        self.flt = flt
        self.time_limit = time_limit
        self.peer = peer
        self.pristine = pristine(flt)

    def open(self, flt: Filter) -> Checker:
        """``flt``'s session for the peer, as the engine opens one per connection."""
        # Filters that judge the peer (PROXY: trusted balancers) may offer peer_session(peer).
        peer_session = getattr(flt, "peer_session", None)
        try:
            if self.peer is not None and callable(peer_session):
                return cast(Checker, peer_session(self.peer))
            return flt.session()
        except Exception as exc:
            raise ContractViolation("raises", f"session() raised {type(exc).__name__}: {exc}") from exc

    def session(self) -> Checker:
        """A session for one connection, in a world where no other connection has run (see isolation.py)."""
        return self.pristine.session(self.open)

    def call(self, checker: Checker, data: bytes, final: bool) -> Decision:
        start = time.perf_counter()
        try:
            d = checker.check(data, final)
        except Exception as exc:
            raise ContractViolation(
                "raises", f"check({data!r}, final={final}) raised {type(exc).__name__}: {exc}"
            ) from exc
        elapsed = time.perf_counter() - start
        if elapsed > self.time_limit and self._slow_again(data, final):
            raise ContractViolation(
                "slow", f"check() on {len(data)} bytes took {elapsed:.3f}s (limit {self.time_limit}s): {data[:80]!r}"
            )
        if not isinstance(d, Decision):
            raise ContractViolation("raises", f"check({data!r}, final={final}) returned {d!r}, not a Decision")
        self.validate(d, data, final)
        return d

    def _slow_again(self, data: bytes, final: bool, tries: int = 2) -> bool:
        """Confirm slowness on fresh sessions so a GC pause or a busy CI box is not a counterexample."""
        for _ in range(tries):
            start = time.perf_counter()
            try:
                self.session().check(data, final)
            except Exception:
                return True  # the raise itself is reported by the caller's next check
            if time.perf_counter() - start <= self.time_limit:
                return False
        return True

    def validate(self, d: Decision, data: bytes, final: bool) -> None:
        """The per-call rules: no WAIT when final or at the cap, consume within the data."""
        if final and d.verdict is Verdict.WAIT:
            raise ContractViolation("final-wait", f"check({data!r}, final=True) returned WAIT; it must decide")
        if d.verdict is Verdict.WAIT and len(data) >= self.flt.max_bytes:
            raise ContractViolation(
                "max-bytes", f"WAIT on {len(data)} bytes, at or past max_bytes={self.flt.max_bytes}: {data[:80]!r}"
            )
        if not (isinstance(d.consume, int) and 0 <= d.consume <= len(data)):
            raise ContractViolation("consume", f"consume={d.consume!r} outside 0..{len(data)} for {data!r}")
        problem = info_problem(d.info, len(data))
        if problem:
            raise ContractViolation("info", f"info {problem}; in {d.verdict.name} for {data[:80]!r}")

    def matcher(self) -> _MatcherProbe | None:
        """A probe running the filter's matcher for this peer (C and Python), or None when it declares none."""
        try:
            if self.peer is not None and callable(getattr(self.flt, "peer_matcher", None)):
                program = self.flt.peer_matcher(self.peer)
            elif callable(getattr(self.flt, "matcher", None)):
                program = self.flt.matcher()
            else:
                return None
        except Exception as exc:
            raise ContractViolation("matcher", f"matcher() raised {type(exc).__name__}: {exc}") from exc
        if program is None:
            return None
        if not isinstance(program, Program):
            raise ContractViolation("matcher", f"matcher() returned {program!r}, not a Program or None")
        return _MatcherProbe(program)

    def fresh(self, data: bytes, final: bool) -> Decision:
        """One-shot on a new session, twice: the answer must be the same (info included)."""
        first = self.call(self.session(), data, final)
        second = self.call(self.session(), data, final)
        if _key(first) != _key(second):
            raise ContractViolation(
                "deterministic", f"same bytes, two answers: {_show(first)} then {_show(second)} for {data!r}"
            )
        return first


def _c_program(program: Program) -> Any:
    """The C form of ``program``, or None where the C core is not built (pure-Python installs)."""
    from .. import cmatcher

    return cmatcher.compile_program(program) if cmatcher.available() else None


class _MatcherProbe:
    """Runs a filter's matcher along one connection's growing prefix, through BOTH interpreters.

    At every prefix: the C matcher and the Python mirror give the same answer, the
    incremental answer equals the one-shot one (resumability), a ``need`` hint is never
    beaten, and -- the point of it all -- a certified prefix is one the filter's check
    ACCEPTs with the same consume. And the other way round: while the matcher says MORE
    (need k), the core runs no Python and sets SO_RCVLOWAT to k more bytes, so the check
    must WAIT on that prefix and on every longer one short of those k bytes.
    """

    def __init__(self, program: Program) -> None:
        self.program = program
        self.cprog = _c_program(program)
        self.py: MatchState = program.start()
        self.c = self.cprog.start() if self.cprog is not None else None
        self.waiting: tuple[int, Match] | None = None  # (length, MORE answer) of the last step
        self.horizon = 0  # no Python runs on prefixes shorter than this (MORE: length + need)
        self.horizon_from: tuple[int, Match] | None = None

    def step(self, data: bytes, check: Decision, chunks: object) -> None:
        m = self.py.run(data)
        where = f"on {data[:200]!r} (fed in chunks ending at {chunks})"
        if self.c is not None:
            mc = self.c.run(data)
            if mc != m:
                raise ContractViolation("matcher", f"C matcher says {mc}, the Python mirror {m} {where}")
        one_shot = self.program.match(data)
        if one_shot != m:
            raise ContractViolation("matcher", f"matcher fed in chunks says {m}, one-shot {one_shot} {where}")
        if self.cprog is not None:
            c_one_shot = self.cprog.match(data)
            if c_one_shot != m:
                raise ContractViolation("matcher", f"C matcher one-shot says {c_one_shot}, fed in chunks {m} {where}")
        if self.waiting is not None and m.status == DONE:
            length, before = self.waiting
            if len(data) < length + before.need:
                raise ContractViolation(
                    "matcher", f"matcher said {before} at {length} bytes but certified at {len(data)} {where}"
                )
        self.waiting = (len(data), m) if m.status == MORE else None
        if m.status == MORE and len(data) + m.need > self.horizon:
            self.horizon, self.horizon_from = len(data) + m.need, (len(data), m)
        if (m.status == MORE or len(data) < self.horizon) and check.verdict is not Verdict.WAIT:
            said = f"{m} on these bytes" if m.status == MORE else f"{self.horizon_from} at a shorter prefix"
            raise ContractViolation(
                "matcher",
                f"matcher said {said}, so no Python runs yet, but check(final=False) says {_show(check)} {where}",
            )
        if m.ready and not (check.verdict is Verdict.ACCEPT and check.consume == m.consume):
            raise ContractViolation(
                "matcher",
                f"matcher certified {data!r} (consume={m.consume}) but check(final=False) says {_show(check)}",
            )


def check_payload(
    flt: Filter,
    data: bytes,
    cuts: Iterable[int] = (),
    *,
    time_limit: float = DEFAULT_TIME_LIMIT,
    peer: tuple[Any, ...] | None = DEFAULT_PEER,
) -> None:
    """Check every invariant for one payload delivered in chunks ending at ``cuts`` (and at the end).

    Raises ContractViolation. The session is fed growing prefixes like the engine feeds
    peeked bytes and is not asked again once it decided; each answer must equal the
    one-shot answer on the same prefix, and a decided prefix fixes the answer for all
    longer ones.
    """
    run = _Runner(flt, time_limit, peer)
    ends = sorted({c for c in cuts if 0 < c < len(data)} | {len(data)})
    prefixes = [data[:end] for end in ends if end > 0] or [data]
    session = run.session()
    probe = run.matcher()
    decided_at: tuple[bytes, Decision] | None = None
    chunks = [len(p) for p in prefixes]
    for prefix in prefixes:
        one_shot = run.fresh(prefix, False)
        if probe is not None:
            probe.step(prefix, one_shot, chunks)
        if decided_at is not None:
            # Extension rule, on fresh sessions since the engine stops asking a decided one.
            base, d0 = decided_at
            if _key(one_shot) != _key(d0):
                raise ContractViolation(
                    "extension",
                    f"decided {_show(d0)} on {base!r} but {_show(one_shot)} on its extension {prefix!r}",
                )
            continue
        incremental = run.call(session, prefix, False)
        if _key(incremental) != _key(one_shot):
            raise ContractViolation(
                "chunking",
                f"fed in chunks ending at {chunks}: {_show(incremental)} at {prefix!r}, but one-shot says {_show(one_shot)}",
            )
        if incremental.decided:
            decided_at = (prefix, incremental)
    final_one_shot = run.fresh(data, True)
    if decided_at is not None:
        base, d0 = decided_at
        if _key(final_one_shot) != _key(d0):
            raise ContractViolation(
                "extension", f"decided {_show(d0)} on {base!r} but {_show(final_one_shot)} at EOF after {data!r}"
            )
    else:
        final = run.call(session, data, True)
        if _key(final) != _key(final_one_shot):
            raise ContractViolation(
                "chunking",
                f"fed in chunks ending at {chunks} then EOF: {_show(final)}, but one-shot says {_show(final_one_shot)} on {data!r}",
            )


#: What :func:`check_cap` fills an undecided input up to the cap with.
CAP_FILLERS = (b"a", b"\x00")


def check_cap(
    flt: Filter, data: bytes, *, time_limit: float = DEFAULT_TIME_LIMIT, peer: tuple[Any, ...] | None = DEFAULT_PEER
) -> None:
    """An input the filter WAITs on, filled up to ``max_bytes``, must get a decision.

    Random inputs seldom reach the cap while still undecided (a length field announcing
    more than the cap, then that many bytes): this builds that input from any undecided
    one, so a filter that keeps WAITing for a declared length is caught on its first
    partial example.
    """
    if len(data) >= flt.max_bytes or flt.max_bytes > 1 << 20:
        return
    run = _Runner(flt, time_limit, peer)
    if run.fresh(data, False).decided:
        return
    for filler in CAP_FILLERS:
        run.fresh(data + filler * (flt.max_bytes - len(data)), False)


#: What :func:`check_tails` appends to an input the filter has decided on.
TAILS = (b"\x00", b"\r\n", b" x")


def check_tails(
    flt: Filter, data: bytes, *, time_limit: float = DEFAULT_TIME_LIMIT, peer: tuple[Any, ...] | None = DEFAULT_PEER
) -> None:
    """A decision must survive whatever comes next: ``data`` plus a few junk tails decides the same.

    Random extensions of a decided input are mostly more well-formed bytes; the bug a
    filter that decides early has (ACCEPT on a command name, REJECT once a later
    argument turns out malformed) shows on a junk byte right after the decision.
    """
    if not data or len(data) >= flt.max_bytes:  # the engine never asks about no bytes before EOF
        return
    run = _Runner(flt, time_limit, peer)
    first = run.fresh(data, False)
    if not first.decided:
        return
    for tail in TAILS:
        later = run.fresh(data + tail, False)
        if _key(later) != _key(first):
            raise ContractViolation(
                "extension", f"decided {_show(first)} on {data!r} but {_show(later)} on its extension {data + tail!r}"
            )


def filter_state_machine(
    flt: Filter,
    payloads: st.SearchStrategy[bytes] | None = None,
    *,
    time_limit: float = DEFAULT_TIME_LIMIT,
    peer: tuple[Any, ...] | None = DEFAULT_PEER,
) -> type[RuleBasedStateMachine]:
    """A state machine driving one connection's session: arrivals, re-peeks, EOF and deadline.

    Run it with ``run_state_machine_as_test(machine)`` (check_filter does). ``repeek`` has
    no precondition so every state has an enabled rule.
    """
    source = payloads if payloads is not None else input_strategy(None, flt)

    class FilterMachine(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            self.run = _Runner(flt, time_limit, peer)
            self.probe = self.run.matcher()
            self.session: Checker | None = None
            self.data = b""
            self.pending = b""
            self.last: Decision | None = None
            self.done = False

        @initialize(payload=source)
        def plan(self, payload: bytes) -> None:
            self.pending = payload

        def _arrive(self, chunk: bytes) -> None:
            self.data += chunk
            if self.session is None:  # the engine makes a session on the first bytes
                self.session = self.run.session()
            d = self.run.call(self.session, self.data, False)
            expected = self.run.fresh(self.data, False)
            if _key(d) != _key(expected):
                raise ContractViolation(
                    "chunking", f"session says {_show(d)} after arrivals, one-shot {_show(expected)} on {self.data!r}"
                )
            if self.probe is not None:
                self.probe.step(self.data, expected, "arrivals")
            self.last = d
            self.done = d.decided

        @precondition(lambda self: not self.done and bool(self.pending))
        @rule(n=st.one_of(st.integers(1, 8), st.integers(1, 600)))  # small arrivals split terminators
        def arrive_planned(self, n: int) -> None:
            chunk, self.pending = self.pending[:n], self.pending[n:]
            self._arrive(chunk)

        @precondition(lambda self: not self.done and not self.pending)
        @rule(chunk=st.binary(min_size=1, max_size=16))
        def arrive_random(self, chunk: bytes) -> None:
            """Trailing bytes after the planned payload (a pipelined request, a body, garbage)."""
            self._arrive(chunk)

        @rule()
        def repeek(self) -> None:
            """A spurious wake-up: the same bytes again must give the same answer."""
            if self.done or self.session is None or self.last is None:
                return
            d = self.run.call(self.session, self.data, False)
            if _key(d) != _key(self.last):
                raise ContractViolation(
                    "chunking", f"re-peek of the same {self.data!r}: {_show(self.last)} then {_show(d)}"
                )

        @precondition(lambda self: not self.done)
        @rule(kind=st.sampled_from(["eof", "deadline", "cap"]))
        def end(self, kind: str) -> None:
            """EOF, deadline or cap: one last check with final=True must decide (like one-shot)."""
            if self.session is None:
                self.session = self.run.session()
            d = self.run.call(self.session, self.data, True)
            expected = self.run.fresh(self.data, True)
            if _key(d) != _key(expected):
                raise ContractViolation(
                    "chunking",
                    f"final check at {kind}: session {_show(d)}, one-shot {_show(expected)} on {self.data!r}",
                )
            self.done = True

    FilterMachine.__name__ = f"FilterMachine[{flt.name or type(flt).__name__}]"
    return FilterMachine


Payloads = st.SearchStrategy[bytes] | Iterable[bytes] | None


def seeded(seeds: Iterable[bytes], max_bytes: int | None = None) -> st.SearchStrategy[bytes]:
    """Inputs grown from a protocol's own examples: as is, mutated, pipelined, and cap-sized.

    The cap-sized ones (a seed padded or cut to about ``max_bytes``) are what finds a
    filter that keeps WAITing for a declared length past its cap; the mutations find
    unchecked parsing (an ``int()`` on a flipped digit); pipelined seeds, and seeds
    broken off part-way with junk after, find decisions that change when more bytes follow.
    """
    items = sorted({bytes(p) for p in seeds})
    if not items:
        raise ValueError("payloads is empty")
    base = st.sampled_from(items)
    options = [
        base,
        strategies.mutated(base),
        st.lists(base, min_size=2, max_size=3).map(b"".join),
        strategies.broken_off(base),
    ]
    if max_bytes is not None and max_bytes <= 1 << 20:
        options += [strategies.padded(base, max_bytes), strategies.padded(st.one_of(base, strategies.mutated(base)), max_bytes)]
    return st.one_of(options)


def input_strategy(payloads: Payloads, flt: Filter, *, defaults: bool = True) -> st.SearchStrategy[bytes]:
    """What check_filter feeds ``flt``: ``payloads`` and the filter's ``examples`` *added* to the built-ins.

    ``payloads`` is a strategy (used as is) or a list of seeds (see :func:`seeded`).
    Your protocol's inputs come first, so hypothesis shrinks towards them.
    ``defaults=False`` leaves the built-in inputs out.
    """
    options: list[st.SearchStrategy[bytes]] = []
    if isinstance(payloads, st.SearchStrategy):
        options.append(payloads)
    elif payloads is not None:
        items = [bytes(p) for p in payloads]
        if not items:
            raise ValueError("payloads is empty")
        options.append(seeded(items, flt.max_bytes))
    examples = tuple(getattr(flt, "examples", ()) or ())
    if examples:
        options.append(seeded(examples, flt.max_bytes))
    builtin = strategies.payloads(flt.max_bytes)
    if not options:
        return builtin
    ours = options[0] if len(options) == 1 else st.one_of(options)
    return _mostly_ours(ours, builtin) if defaults else ours


@st.composite
def _mostly_ours(draw: st.DrawFn, ours: st.SearchStrategy[bytes], builtin: st.SearchStrategy[bytes]) -> bytes:
    """Two examples in three from ``ours``, which shrinks first.

    ``st.one_of`` would flatten both into one list of branches, and the built-ins have
    a dozen: a filter's own examples would then get one draw in ten.
    """
    return draw(builtin) if draw(st.integers(0, 2)) == 2 else draw(ours)


#: Hypothesis profiles that are not the user's choice: hypothesis loads "ci" by itself on CI machines.
_UNCHOSEN_PROFILES = ("default", "ci")


def user_profile() -> bool:
    """True when the user loaded a hypothesis profile of their own (it then decides the budget)."""
    return settings.get_current_profile_name() not in _UNCHOSEN_PROFILES


def _settings(max_examples: int | None, deadline_free: bool = True) -> settings:
    """The user's active hypothesis profile, with our own timing instead of hypothesis' deadline.

    Without the user's own profile, the budget is :data:`DEFAULT_EXAMPLES` (the CLI's) and
    saved examples go to :func:`cache_dir`.
    """
    kwargs: dict[str, Any] = {
        "deadline": None,
        "report_multiple_bugs": False,  # one counterexample, the minimal one
        "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    }
    mine = user_profile()
    if max_examples is not None:
        kwargs["max_examples"] = max_examples
    elif not mine:
        kwargs["max_examples"] = DEFAULT_EXAMPLES
    if not mine:
        kwargs["database"] = DirectoryBasedExampleDatabase(str(cache_dir() / "examples"))
    return settings(settings(), **kwargs)


@contextmanager
def blaming_the_filter() -> Iterator[None]:
    """Turn hypothesis' flakiness errors into the contract violation they are.

    Each simulated connection starts pristine, so a failure hypothesis cannot replay means
    the filter answered the same calls differently: state outside what the fuzzer resets
    (module globals, the clock, randomness). Hypothesis would say "Flaky" or "Inconsistent
    data generation" and blame the test; the filter is what broke the rule.
    """
    try:
        yield
    except Flaky as exc:
        inner = [e for e in getattr(exc, "exceptions", ()) if isinstance(e, ContractViolation)]
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        seen = f"; first seen: {inner[0]}" if inner else ""
        raise ContractViolation(
            "deterministic",
            "the same calls got different answers when repeated: the filter's answers depend on something other "
            f"than this connection's bytes (module globals, the clock, randomness){seen} ({first})",
        ) from None


def _seeds(flt: Filter, payloads: Payloads) -> list[bytes]:
    """The guided phase's starting inputs: the user's payloads, the filter's examples, real first flights."""
    mine = [bytes(p) for p in payloads] if payloads is not None and not isinstance(payloads, st.SearchStrategy) else []
    examples = [bytes(e) for e in getattr(flt, "examples", ()) or ()]
    return [*mine, *examples, *(f.data for f in FIRST_FLIGHTS.values())]


def _violation(fn: Callable[[], None]) -> ContractViolation | None:
    try:
        fn()
    except ContractViolation as exc:
        return exc
    return None


def guided_phase(
    flt: Filter,
    payloads: Payloads = None,
    *,
    max_examples: int = DEFAULT_EXAMPLES,
    seconds: float = DEFAULT_GUIDED_SECONDS,
    time_limit: float = DEFAULT_TIME_LIMIT,
    byte_by_byte: int = 256,
    peer: tuple[Any, ...] | None = DEFAULT_PEER,
    seed: int | None = None,
) -> guided.GuidedResult:
    """The coverage-guided phase of check_filter: its corpus, or a minimal ContractViolation.

    Budget: up to ``30 * max_examples`` runs or ``seconds``, ending early once
    ``20 * max_examples`` runs in a row reached nothing new.
    """
    run = _Runner(flt, time_limit, peer)

    cap_filler = CAP_FILLERS[0]

    def run_one(data: bytes) -> tuple[Callable[[], None], Callable[[], None]]:
        run.call(run.session(), data, True)  # checked on every input; only the final=False path is traced
        first = run.session()
        answer: list[Decision] = []

        def traced() -> None:
            answer.append(run.call(first, data, False))

        def after() -> None:
            # The cap rule on every undecided input, not only on new paths: a declared length
            # past max_bytes takes the same path as one just under it.
            if answer and not answer[0].decided and len(data) < flt.max_bytes <= 1 << 20:
                run.call(run.session(), data + cap_filler * (flt.max_bytes - len(data)), False)

        return traced, after

    def check_all(data: bytes) -> None:
        check_payload(flt, data, time_limit=time_limit, peer=peer)
        if len(data) <= byte_by_byte:
            check_payload(flt, data, range(1, len(data)), time_limit=time_limit, peer=peer)
        check_cap(flt, data, time_limit=time_limit, peer=peer)
        check_tails(flt, data, time_limit=time_limit, peer=peer)

    def both(data: bytes) -> None:
        traced, after = run_one(data)
        traced()
        after()
        check_all(data)

    session_type = type(run.session())
    files = dictionary.module_files(dictionary.filter_modules(flt, [session_type]))
    words = dictionary.words(flt, [session_type])
    try:
        return guided.fuzz(
            run_one, check_all, _seeds(flt, payloads), words, flt.max_bytes, files=files, seconds=seconds,
            max_runs=30 * max_examples, plateau=20 * max_examples, rng=random.Random(seed),
            guided=bool(files) and tracing.available(),
        )
    except ContractViolation as exc:
        bad = getattr(exc, "data", None)
        if not isinstance(bad, bytes):
            raise
        invariant = exc.invariant

        def same(candidate: bytes) -> bool:
            found = _violation(lambda: both(candidate))
            return found is not None and found.invariant == invariant

        smallest = guided.minimize(bad, same)
        again = _violation(lambda: both(smallest))
        raise (again or exc) from None


def check_filter(
    filter_or_spec: Filter | str,
    payloads: st.SearchStrategy[bytes] | Iterable[bytes] | None = None,
    *,
    max_examples: int | None = None,
    time_limit: float = DEFAULT_TIME_LIMIT,
    stateful: bool = True,
    byte_by_byte: int = 256,
    peer: tuple[Any, ...] | None = DEFAULT_PEER,
    defaults: bool = True,
    guided_seconds: float | None = DEFAULT_GUIDED_SECONDS,
    isolation: bool = True,
) -> None:
    """Fuzz a filter against the whole contract; raise ContractViolation with a minimal counterexample.

    First a coverage-guided phase (``guided_seconds`` at most; None: off) grows a corpus
    of inputs that reach new arcs of the filter's module, from its ``examples``, real
    first flights and the literals in its source. Then hypothesis feeds that corpus,
    mutated and chunked, and the built-in inputs: random bytes, well-formed and mutated
    HTTP, TLS, DNS and PROXY inputs, and inputs the size of ``max_bytes``. ``payloads``
    (a strategy, or a list of seeds that are also mutated, pipelined and padded to the
    cap) and the filter's own ``examples`` are *added* to them (``defaults=False``: only
    yours). ``max_examples`` defaults to the CLI's :data:`DEFAULT_EXAMPLES` unless a
    hypothesis profile of your own is loaded. Payloads up to ``byte_by_byte`` bytes are
    also fed one byte at a time (every prefix is compared). ``isolation`` interleaves
    several connections on one filter. A filter with ``peer_session(peer)`` gets its
    sessions for ``peer`` (None: ``session()``).
    """
    flt = load_filter(filter_or_spec)
    cfg = _settings(max_examples)
    corpus: list[bytes] = []
    if isolation:  # a quick look first: most leaks show on the seeds, before the guided phase's seconds
        seeds = st.sampled_from(_seeds(flt, payloads))
        check_isolation(flt, seeds, settings(cfg, max_examples=max(1, cfg.max_examples // 20)),
                        time_limit=time_limit, peer=peer)
    if guided_seconds is not None and guided_seconds > 0:
        found = guided_phase(flt, payloads, max_examples=cfg.max_examples, seconds=guided_seconds,
                             time_limit=time_limit, byte_by_byte=byte_by_byte, peer=peer)
        corpus = found.corpus
    if corpus and not isinstance(payloads, st.SearchStrategy):
        payloads = [*(payloads or ()), *corpus]
    source = input_strategy(payloads, flt, defaults=defaults)

    @cfg
    @given(case=strategies.chunked(source))
    def contract(case: tuple[bytes, tuple[int, ...]]) -> None:
        data, cuts = case
        check_payload(flt, data, cuts, time_limit=time_limit, peer=peer)
        if len(data) <= byte_by_byte:
            check_payload(flt, data, range(1, len(data)), time_limit=time_limit, peer=peer)
        check_cap(flt, data, time_limit=time_limit, peer=peer)
        check_tails(flt, data, time_limit=time_limit, peer=peer)

    _digest(contract, flt)
    with blaming_the_filter():
        if isolation:  # first: the guided corpus reaches the states a leak shows in, and this is quick
            kept = st.sampled_from(corpus) if corpus else source
            check_isolation(flt, st.one_of(kept, source), settings(cfg, max_examples=max(1, cfg.max_examples // 4)),
                            time_limit=time_limit, peer=peer)
        contract()
        if stateful:
            machine = filter_state_machine(flt, source, time_limit=time_limit, peer=peer)
            step_settings = settings(cfg, max_examples=max(1, cfg.max_examples // 2), stateful_step_count=20)
            _run_machine(machine, settings=step_settings)


def _digest(test: Any, flt: Filter) -> None:
    """Saved examples per filter class and options, not one pile shared by every filter."""
    inner = getattr(getattr(test, "hypothesis", None), "inner_test", None)
    if inner is not None:
        key = f"{type(flt).__module__}.{type(flt).__qualname__}:{flt.name}:{flt.max_bytes}"
        inner._hypothesis_internal_add_digest = key.encode()


def check_isolation(
    flt: Filter,
    source: st.SearchStrategy[bytes] | None = None,
    cfg: settings | None = None,
    *,
    time_limit: float = DEFAULT_TIME_LIMIT,
    peer: tuple[Any, ...] | None = DEFAULT_PEER,
) -> None:
    """The isolation rule: connections interleaved on one filter decide as each would alone.

    Two or three connections, each with its own payload and chunking, some on ``flt`` and
    some on a copy with other options (another ``max_bytes``), arrive in an interleaving
    hypothesis picks and shrinks. Every decision must equal the one the same connection
    gets alone on a filter as built.
    """
    run = _Runner(flt, time_limit, peer)
    variant = run.pristine.variant()
    owners = [flt] if variant is None else [flt, variant]
    payloads = source if source is not None else input_strategy(None, flt)
    conn = st.tuples(st.integers(0, len(owners) - 1), strategies.chunked(payloads, max_cuts=4))

    @(cfg if cfg is not None else _settings(None))
    @given(conns=st.lists(conn, min_size=2, max_size=3), order=st.lists(st.integers(0, 2), max_size=12))
    def isolation(conns: list[tuple[int, tuple[bytes, tuple[int, ...]]]], order: list[int]) -> None:
        steps = interleave([c for _, c in conns], order)
        problem = check_interleaved(
            steps, [owners[i] for i, _ in conns], run.pristine, run.open, run.call,
            lambda a, b: _key(a) == _key(b), _show,
        )
        if problem:
            raise ContractViolation(*problem)

    _digest(isolation, flt)
    with blaming_the_filter():
        isolation()


def violations_of(fn: Callable[[], None]) -> str | None:
    """The invariant a call breaks, or None: a helper for tests of broken filters."""
    try:
        fn()
    except ContractViolation as exc:
        return exc.invariant
    return None
