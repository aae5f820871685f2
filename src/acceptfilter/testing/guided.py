"""Coverage-guided input generation: keep and mutate inputs that reach new arcs of the filter's module.

The loop is the one AFL and libFuzzer made standard, at the scale of a sans-IO filter:
pick an input from the corpus, mutate it, run the filter on it once (fresh session,
``final`` False and True) while :class:`~.tracing.Tracer` records which arcs of the
filter's own module it reached, and keep it when it reached one no earlier input did.
Every kept input also goes through the whole contract (:func:`~.check.check_payload`,
cap and tails); every input goes through the per-call rules.

Seeds: the filter's ``examples``, the user's payloads, the first-flight corpus of real
clients (:mod:`.corpus`) and the filter's dictionary (:mod:`.dictionary`). Mutations:
bit flips, byte and block edits, dictionary words inserted or swapped for a token,
tokens cloned, ASCII numbers and binary length fields set to boundary values (0, 1,
``max_bytes`` +- 1, 2^k +- 1) and ASCII digits swapped for non-ASCII ones that
``str.isdigit()`` accepts and ``int()`` does not.

The corpus it ends with seeds the hypothesis phase (:func:`~.check.check_filter`), which
mutates, chunks and shrinks further.
"""

from __future__ import annotations

import random
import re
import struct
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from .tracing import Feature, Tracer

__all__ = ["GuidedResult", "boundary_numbers", "fuzz", "minimize"]

#: Non-ASCII characters ``str.isdigit()`` accepts: superscripts and circled digits ``int()`` refuses,
#: and digits of other scripts it takes.
UNICODE_DIGITS = ("\u00b2", "\u00b3", "\u00b9", "\u2460", "\u0663", "\uff11")

_TOKEN = re.compile(rb"[^\s:;,=/]+")
_DIGITS = re.compile(rb"[0-9]+")

#: Inputs longer than this are cut (cap-sized inputs come from the cap rule, not from mutation).
MAX_INPUT = 4096


def boundary_numbers(max_bytes: int) -> list[int]:
    """The lengths where parsers break: 0, 1, around ``max_bytes``, and around each power of two."""
    out = {0, 1, 2, max_bytes - 1, max_bytes, max_bytes + 1, 2 * max_bytes}
    for k in range(3, 33):
        out |= {2**k - 1, 2**k, 2**k + 1}
    return sorted(n for n in out if n >= 0)


@dataclass
class GuidedResult:
    """What the guided phase did: inputs kept, arcs reached, inputs run, seconds."""

    corpus: list[bytes] = field(default_factory=list)
    features: int = 0
    runs: int = 0
    seconds: float = 0.0
    guided: bool = True


class _Mutator:
    def __init__(self, rng: random.Random, words: list[bytes], max_bytes: int) -> None:
        self.rng = rng
        self.words = words or [b" ", b"\r\n", b"0"]
        self.numbers = boundary_numbers(max_bytes)
        self.max_bytes = max_bytes
        self.ops: list[Callable[[bytes, list[bytes]], bytes]] = [
            self.flip, self.byte, self.insert_bytes, self.delete, self.truncate, self.word_insert,
            self.word_insert, self.word_replace, self.word_replace, self.clone_token, self.drop_token, self.token_splice,
            self.token_splice, self.ascii_number,
            self.ascii_number, self.binary_number, self.unicode_digit, self.splice, self.clone_block,
        ]

    def lengths(self, data: bytes) -> list[bytes]:
        """AFL's deterministic stage, for length fields: each of the first numbers (ASCII digits, and
        big-endian 1, 2 and 4-byte fields in the first bytes) set to each boundary value."""
        key = sorted({0, 1, self.max_bytes - 1, self.max_bytes, self.max_bytes + 1, 2**16 - 1, 2**31 - 1})
        out = []
        for m in list(_DIGITS.finditer(data))[:4]:
            out += [data[: m.start()] + str(n).encode() + data[m.end() :] for n in key]
        for width in (2, 4):
            for i in range(0, min(len(data) - width + 1, 8)):
                for n in (self.max_bytes + 1, (1 << (8 * width)) - 1):
                    out.append(data[:i] + (n % (1 << (8 * width))).to_bytes(width, "big") + data[i + width :])
        return out

    def mutate(self, data: bytes, corpus: list[bytes]) -> bytes:
        for _ in range(self.rng.choice((1, 1, 1, 2, 2, 3))):
            data = self.rng.choice(self.ops)(data, corpus)
        return data[:MAX_INPUT]

    def _at(self, data: bytes) -> int:
        return self.rng.randint(0, len(data))

    def flip(self, data: bytes, _: list[bytes]) -> bytes:
        if not data:
            return bytes([self.rng.randrange(256)])
        i = self.rng.randrange(len(data))
        return data[:i] + bytes([data[i] ^ (1 << self.rng.randrange(8))]) + data[i + 1 :]

    def byte(self, data: bytes, _: list[bytes]) -> bytes:
        i = self._at(data)
        value = self.rng.choice((0, 0xFF, 0x7F, 0x80, 0x20, 0x0A, 0x0D, self.rng.randrange(256)))
        return data[:i] + bytes([value]) + data[i + 1 :]

    def insert_bytes(self, data: bytes, _: list[bytes]) -> bytes:
        i = self._at(data)
        return data[:i] + self.rng.randbytes(self.rng.randint(1, 8)) + data[i:]

    def delete(self, data: bytes, _: list[bytes]) -> bytes:
        if not data:
            return data
        i = self.rng.randrange(len(data))
        return data[:i] + data[i + self.rng.randint(1, 8) :]

    def truncate(self, data: bytes, _: list[bytes]) -> bytes:
        return data[: self._at(data)]

    def word_insert(self, data: bytes, _: list[bytes]) -> bytes:
        i = self._at(data)
        return data[:i] + self.rng.choice(self.words) + data[i:]

    def _token(self, data: bytes, pattern: re.Pattern[bytes] = _TOKEN) -> tuple[int, int] | None:
        spans = [m.span() for m in pattern.finditer(data)]
        return self.rng.choice(spans) if spans else None

    def word_replace(self, data: bytes, corpus: list[bytes]) -> bytes:
        span = self._token(data)
        if span is None:
            return self.word_insert(data, corpus)
        return data[: span[0]] + self.rng.choice(self.words) + data[span[1] :]

    def clone_token(self, data: bytes, corpus: list[bytes]) -> bytes:
        """Repeat one token (with the separator before it): a command gains the arguments it needs."""
        span = self._token(data)
        if span is None or span[0] == 0:
            return self.word_insert(data, corpus)
        piece = data[span[0] - 1 : span[1]]
        return data[: span[1]] + piece * self.rng.randint(1, 4) + data[span[1] :]

    def token_splice(self, data: bytes, corpus: list[bytes]) -> bytes:
        """Swap a token for one from another kept input: the command of one with the arguments of another."""
        span, other = self._token(data), self.rng.choice(corpus)
        donor = self._token(other)
        if span is None or donor is None:
            return self.splice(data, corpus)
        return data[: span[0]] + other[donor[0] : donor[1]] + data[span[1] :]

    def drop_token(self, data: bytes, corpus: list[bytes]) -> bytes:
        """Remove one token and the separator before it: a command loses an argument."""
        span = self._token(data)
        if span is None or span[0] == 0:
            return self.delete(data, corpus)
        return data[: span[0] - 1] + data[span[1] :]

    def ascii_number(self, data: bytes, corpus: list[bytes]) -> bytes:
        """A number (or any token) becomes a boundary length: 0, 1, max_bytes +- 1, 2^k."""
        span = self._token(data, _DIGITS) if self.rng.random() < 0.5 else None
        span = span or self._token(data)
        number = str(self.rng.choice(self.numbers)).encode()
        if span is None:
            i = self._at(data)
            return data[:i] + number + data[i:]
        return data[: span[0]] + number + data[span[1] :]

    def binary_number(self, data: bytes, _: list[bytes]) -> bytes:
        """A 1-, 2-, 3- or 4-byte field (big- or little-endian) set to a boundary value."""
        width = self.rng.choice((1, 2, 2, 3, 4))
        value = self.rng.choice(self.numbers) % (1 << (8 * width))
        raw = struct.pack(">I", value)[4 - width :]
        if self.rng.random() < 0.3:
            raw = raw[::-1]
        i = self.rng.randint(0, max(0, len(data) - width))
        return data[:i] + raw + data[i + width :]

    def unicode_digit(self, data: bytes, corpus: list[bytes]) -> bytes:
        spans = [m.start() for m in re.finditer(rb"[0-9]", data)]
        char = self.rng.choice(UNICODE_DIGITS)
        encoded = char.encode("latin-1") if ord(char) < 256 and self.rng.random() < 0.5 else char.encode()
        i = self.rng.choice(spans) if spans else self._at(data)
        return data[:i] + encoded + data[i + (1 if spans else 0) :]

    def splice(self, data: bytes, corpus: list[bytes]) -> bytes:
        other = self.rng.choice(corpus)
        return data[: self._at(data)] + other[self.rng.randint(0, len(other)) :]

    def clone_block(self, data: bytes, _: list[bytes]) -> bytes:
        if not data:
            return data
        i = self.rng.randrange(len(data))
        j = min(len(data), i + self.rng.randint(1, 32))
        return data[:j] + data[i:j] * self.rng.randint(1, 3) + data[j:]


def fuzz(
    run_one: Callable[[bytes], tuple[Callable[[], None], Callable[[], None]]],
    check_all: Callable[[bytes], None],
    seeds: Iterable[bytes],
    words: list[bytes],
    max_bytes: int,
    *,
    files: set[str],
    seconds: float,
    max_runs: int,
    plateau: int,
    rng: random.Random,
    guided: bool = True,
) -> GuidedResult:
    """Run the loop until ``seconds``, ``max_runs``, or ``plateau`` runs in a row found nothing new.

    ``run_one(data)`` prepares the per-call rules on one input (untraced: making sessions)
    and returns what runs them (traced) and what runs after (untraced); ``check_all(data)``
    the whole contract (untraced), on each input that reached something new. Either
    raises ContractViolation, which ends the loop (the caller shrinks the input).
    ``guided=False`` (another tracer owns the hook) keeps every tenth input instead.
    """
    tracer = Tracer(files)
    result = GuidedResult(guided=guided)
    seen: set[Feature] = set()
    mutator = _Mutator(rng, words, max_bytes)
    start = time.monotonic()
    corpus: list[bytes] = []
    pending = list(dict.fromkeys([*seeds, *words, *command_lines(words), b""]))
    quiet = 0

    owners: list[int] = []  # one entry per feature: the corpus index of the input that reached it first

    def features_of(data: bytes) -> set[Feature]:
        calls, after = run_one(data)
        with tracer.recording() as features:
            calls()
        after()
        return features

    def trim(data: bytes, fresh: set[Feature]) -> bytes:
        """AFL's trim: the shortest input (block deletions, 64 tries) still reaching every new feature."""
        tries = [0]

        def keeps(candidate: bytes) -> bool:
            tries[0] += 1
            return tries[0] <= 64 and fresh <= features_of(candidate)

        return minimize(data, keeps, seconds=1.0)

    def execute(data: bytes) -> bytes | None:
        fresh = features_of(data) - seen
        if not fresh:
            return None
        seen.update(fresh)
        owners.extend([len(corpus)] * len(fresh))
        return trim(data, fresh)

    with tracer.installed() if guided else _nothing():
        while result.runs < max_runs and time.monotonic() - start < seconds:
            if pending:
                data = pending.pop(0)[:MAX_INPUT]
            else:
                if quiet >= plateau:
                    break
                data = mutator.mutate(_parent(rng, corpus, owners), corpus or [b""])
            result.runs += 1
            try:
                kept = execute(data) if guided else _untraced(run_one(data), result.runs, data)
                if kept is not None:
                    data = kept
                    quiet = 0
                    corpus.append(data)
                    check_all(data)
                    pending += mutator.lengths(data)
                elif not pending:
                    quiet += 1
            except AssertionError as exc:  # a ContractViolation: say which input, for the caller to shrink
                exc.data = data  # type: ignore[attr-defined]
                raise
    result.corpus, result.features, result.seconds = corpus, len(seen), time.monotonic() - start
    return result


def _untraced(calls: tuple[Callable[[], None], Callable[[], None]], runs: int, data: bytes) -> bytes | None:
    for call in calls:
        call()
    return data if runs % 10 == 0 else None


def _parent(rng: random.Random, corpus: list[bytes], owners: list[int]) -> bytes:
    """A third each: one of the last few inputs kept (the deepest so far), the input that first reached
    a random feature (inputs that opened many paths get more turns, like AFL's favoured ones), any input."""
    if not corpus:
        return b""
    pick = rng.random()
    if pick < 1 / 3:
        return corpus[-1 - min(len(corpus) - 1, int(rng.expovariate(0.3)))]
    if pick < 2 / 3 and owners:
        return corpus[min(rng.choice(owners), len(corpus) - 1)]
    return rng.choice(corpus)


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


_TOKEN = re.compile(rb"[A-Za-z][A-Za-z0-9_.-]{1,31}")


def command_lines(words: Iterable[bytes]) -> list[bytes]:
    """Each word-like literal as a text protocol's command line: alone, then with one to four numeric
    arguments, ending in CRLF (``put 1 1 1 1\\r\\n``). Mutation reaches such a line only by luck (a
    bug planted behind one was missed in 4 of 30 runs); as a seed it is a few hundred runs, and
    :meth:`_Mutator.lengths` then sets each number to the boundary values."""
    return [word + b" 1" * count + b"\r\n" for word in words if _TOKEN.fullmatch(word) for count in range(5)]


def minimize(data: bytes, fails: Callable[[bytes], bool], *, seconds: float = 5.0) -> bytes:
    """A shorter input that still ``fails``: delete blocks, halving their size (ddmin-style), within ``seconds``.

    Hypothesis shrinks what it generates; an input the guided phase found is shrunk here,
    so the counterexample a user reads is as short as hypothesis' would be.
    """
    deadline = time.monotonic() + seconds
    size = max(1, len(data) // 2)
    while size >= 1 and time.monotonic() < deadline:
        i, shrunk = 0, False
        while i < len(data) and time.monotonic() < deadline:
            candidate = data[:i] + data[i + size :]
            if fails(candidate):
                data, shrunk = candidate, True
            else:
                i += size
        if not shrunk:
            size //= 2
    return data
