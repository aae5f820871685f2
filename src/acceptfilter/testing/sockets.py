"""The real-socket harness: chunked payloads over loopback to a real wrapped listener.

The sans-IO checks prove the filter; this proves the filter *in the engine*: the bytes
the application reads are exactly the bytes sent minus ``consume``, and every accepted
connection ends in exactly one counted outcome. Loopback (127.0.0.1) only.
"""

from __future__ import annotations

import itertools
import socket
import threading
import time
from collections.abc import Iterable, Sequence

from hypothesis import given
from hypothesis import strategies as st

from ..engine import OUTCOMES
from ..filter import Checker, Filter
from ..listener import wrap
from ..registry import load_filter
from . import strategies
from .check import ContractViolation, _settings, seeded

__all__ = ["check_sockets", "expected_decision", "send_and_check"]

_OUTCOMES = (*OUTCOMES, "held")


def expected_decision(flt: Filter, data: bytes) -> tuple[bool, int]:
    """(surfaced?, consume) for ``data`` followed by EOF, from the sans-IO filter alone."""

    def session() -> Checker:
        # The harness's clients connect from loopback: that is the peer a filter that asks sees.
        return flt.peer_session(("127.0.0.1", 0)) if flt.needs_peer else flt.session()

    capped = data[: flt.max_bytes]
    for end in range(1, len(capped) + 1):
        d = session().check(capped[:end], False)
        if d.decided:
            return d.accepted, d.consume
    if not data:
        return False, 0
    d = session().check(capped, True)
    return d.accepted, d.consume


def _client(port: int, chunks: Sequence[bytes], pause: float, errors: list[BaseException]) -> None:
    try:
        c = socket.create_connection(("127.0.0.1", port), timeout=5)
    except OSError as exc:  # the only client error that is the listener's fault
        errors.append(exc)
        return
    with c:
        try:
            for chunk in chunks:
                c.sendall(chunk)
                time.sleep(pause)
            c.shutdown(socket.SHUT_WR)
            while c.recv(65536):
                pass
        except OSError:
            pass  # a rejected connection may be closed or reset under the client's feet


def send_and_check(
    flt: Filter | str, chunks: Sequence[bytes], *, core: str = "c", pause: float = 0.002, timeout: float = 2.0
) -> None:
    """Send ``chunks`` on one connection (then EOF) and check what the application sees and the counters."""
    f = load_filter(flt)
    data = b"".join(chunks)
    surfaced, consume = expected_decision(f, data)
    sock = socket.create_server(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    listener = wrap(sock, f, core=core, timeout=timeout, on_timeout="surface")
    errors: list[BaseException] = []
    try:
        client = threading.Thread(target=_client, args=(port, chunks, pause, errors), daemon=True)
        client.start()
        listener.settimeout(timeout + 1.0 if surfaced else 0.3 + 2 * pause * len(chunks))
        try:
            conn, _ = listener.accept()
        except (TimeoutError, BlockingIOError):
            conn = None
        if surfaced and conn is None:
            raise ContractViolation("sockets", f"core={core}: expected the connection surfaced for {data!r}, none came")
        if not surfaced and conn is not None:
            conn.close()
            raise ContractViolation("sockets", f"core={core}: expected no surfacing for {data!r}, got one")
        if conn is not None:
            with conn:
                conn.settimeout(timeout + 1.0)
                got = b""
                while True:
                    part = conn.recv(65536)
                    if not part:
                        break
                    got += part
            if got != data[consume:]:
                raise ContractViolation(
                    "sockets", f"core={core}: application read {got!r}, expected {data[consume:]!r} (consume={consume})"
                )
        client.join(timeout + 5)
        if errors:
            raise ContractViolation("sockets", f"client failed: {errors[0]!r}")
        stats: dict[str, object] = {}
        for _ in range(200):  # the engine counts asynchronously
            stats = listener.stats()
            if stats["accepted"] == 1 and stats["held"] == 0:
                break
            time.sleep(0.01)
        total = sum(int(stats[k]) for k in _OUTCOMES)  # type: ignore[call-overload]
        if stats["accepted"] != 1 or total != 1:
            raise ContractViolation(
                "sockets", f"core={core}: outcomes do not add up: { ({k: stats[k] for k in ('accepted', *_OUTCOMES)}) }"
            )
    finally:
        listener.close()


def check_sockets(
    filter_or_spec: Filter | str,
    payloads: st.SearchStrategy[bytes] | Iterable[bytes] | None = None,
    *,
    cores: Sequence[str] = ("c", "python"),
    max_examples: int | None = None,
    max_chunks: int = 6,
) -> None:
    """Fuzz the filter through real listeners on both I/O cores (slow: keep max_examples small).

    ``payloads`` takes what :func:`check_filter` takes: a strategy, or a list of seeds
    (mutated too); the filter's ``examples`` are added, and so are well-formed and
    mutated HTTP, TLS, DNS and PROXY inputs.
    """
    flt = load_filter(filter_or_spec)
    builtin = st.one_of(strategies.well_formed(), strategies.mutated(strategies.well_formed()))
    options: list[st.SearchStrategy[bytes]] = []
    if isinstance(payloads, st.SearchStrategy):
        options.append(payloads)
    elif payloads is not None:
        options.append(seeded(payloads))
    if flt.examples:
        options.append(seeded(flt.examples))
    source = st.one_of([*options, builtin])
    source = source.filter(lambda b: len(b) < 8192)  # past a small cap too: the engine must stop at it

    @_settings(max_examples)
    @given(case=strategies.chunked(source, max_cuts=max_chunks - 1))
    def over_sockets(case: tuple[bytes, tuple[int, ...]]) -> None:
        data, cuts = case
        bounds = [0, *cuts, len(data)]
        chunks = [data[a:b] for a, b in itertools.pairwise(bounds) if b > a]
        for core in cores:
            send_and_check(flt, chunks, core=core)

    over_sockets()
