"""The parts of issue 27's fuzzer: dictionary, tracer, mutations, interleavings, the info rule, blame."""

from __future__ import annotations

import random

import pytest
from hypothesis.errors import FlakyFailure

from acceptfilter import ACCEPT, REJECT, Decision, Filter
from acceptfilter.testing import ContractViolation, check_filter
from acceptfilter.testing.check import blaming_the_filter, guided_phase, info_problem
from acceptfilter.testing.dictionary import literals, words
from acceptfilter.testing.guided import UNICODE_DIGITS, _Mutator, boundary_numbers, minimize
from acceptfilter.testing.isolation import interleave
from acceptfilter.testing.tracing import Tracer
from tests import planted_guided
from tests.planted_guided import BeanReady


def test_dictionary_takes_protocol_words_not_messages() -> None:
    source = '''
"""Module docstring."""
from acceptfilter import Decision
def check(data):
    """A docstring."""
    if data.startswith(b"*3") or data[:4].decode() == "PING":
        return Decision.reject("not a command we know")
    raise ValueError(f"bad {data!r}")
'''
    found = literals(source)
    assert {b"*3", b"PING"} <= found
    assert not any(b"docstring" in w or b"know" in w or b"bad" in w for w in found), found
    assert {b"put", b"kick", b"\r\n", b"reserve-with-timeout"} <= set(words(BeanReady()))


def test_tracer_tells_paths_apart() -> None:
    flt = BeanReady()
    tracer = Tracer({planted_guided.__file__})

    def features(data: bytes) -> set[tuple[str, int, int, int]]:
        with tracer.installed(), tracer.recording() as found:
            flt.check(data, False)
        return found

    one, two, four = features(b"put 1 x x x\r\n"), features(b"put 1 2 x x\r\n"), features(b"put 1 2 3 4\r\n")
    assert one and one != two  # how many fields passed is progress (hit-count buckets)
    assert four - two  # the body branch is new
    assert features(b"put 1 2 3 4\r\n") == four


def test_mutations_reach_boundaries() -> None:
    numbers = boundary_numbers(16384)
    assert {0, 1, 16383, 16384, 16385, 2**16, 2**31 - 1} <= set(numbers)
    mutator = _Mutator(random.Random(1), [b"put"], 16384)
    assert b"put 1 2 3 16385\r\n" in mutator.lengths(b"put 1 2 3 4\r\n")
    assert (16385).to_bytes(2, "big") + b"\x00\x00" in mutator.lengths(b"\x00\x00\x00\x00")
    digits = {mutator.unicode_digit(b"7", []) for _ in range(200)}
    assert any(d.decode("utf-8", "replace").isdigit() and not d.isascii() for d in digits)
    assert all(c.isdigit() for c in UNICODE_DIGITS)


def test_minimize_keeps_the_failure() -> None:
    assert minimize(b"xxxxput 1 2 3 x\r\nyyyy", lambda d: b"put" in d and b"x" in d) in (b"putx", b"xput")


def test_guided_phase_finds_what_random_bytes_miss() -> None:
    with pytest.raises(ContractViolation) as caught:
        guided_phase(planted_guided.ForgetsReturn(), max_examples=200, seconds=30, seed=3)
    assert caught.value.invariant == "raises" and "returned None" in str(caught.value)
    assert "b'kick" in str(caught.value)  # shrunk to the command word


def test_interleave_delivers_every_chunk_then_eof() -> None:
    steps = interleave([(b"abcd", (2,)), (b"xy", ())], [1, 1, 0, 5])
    assert steps == [(1, b"xy", False), (1, b"xy", True), (0, b"ab", False), (0, b"abcd", False), (0, b"abcd", True)]


def test_info_rule() -> None:
    assert info_problem({"method": "GET", "n": 1, "ok": True, "x": None, "list": [1.5, {"a": "b"}]}, 10) is None
    assert "bytes" in (info_problem({"first": b"G"}, 1) or "")
    assert "key" in (info_problem({1: "x"}, 1) or "")
    assert "nan" in (info_problem({"x": float("nan")}, 1) or "")
    assert "characters" in (info_problem({"x": "a" * 5000}, 100) or "")
    assert info_problem({"target": "a" * 5000}, 5000) is None  # copying the input is fine


def test_flaky_is_blamed_on_the_filter() -> None:
    with pytest.raises(ContractViolation) as caught, blaming_the_filter():
        raise FlakyFailure("Hypothesis test_x produces unreliable results", [ContractViolation("chunking", "x")])
    assert caught.value.invariant == "deterministic" and "[chunking] x" in str(caught.value)


_ANSWERED: set[bytes] = set()


class RemembersAnswers(Filter):
    """Planted: a module-level memo the fuzzer cannot reset: the second time, the answer flips."""

    name = "remembers"

    def check(self, data: bytes, final: bool) -> Decision:
        if data in _ANSWERED:
            return REJECT
        _ANSWERED.add(data)
        return ACCEPT


def test_answers_that_depend_on_earlier_calls_name_a_rule() -> None:
    with pytest.raises(ContractViolation) as caught:
        check_filter(RemembersAnswers(), max_examples=50, guided_seconds=2)
    assert caught.value.invariant == "deterministic", str(caught.value)
