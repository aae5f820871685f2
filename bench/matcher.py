"""Microbenchmark: ns per match of the compiled matchers -- C vs the Python mirror vs the filter's check.

    python bench/matcher.py [--quick] [--out DIR]      # writes DIR/matcher.json (default bench/results)

For each typical first flight (a curl and a browser GET head, a DNS query, this Python's
real TLS ClientHello, a PROXY v2 header) it times, one-shot on a fresh state/session:

* ``c_ns``: ``afm_init`` + ``afm_run`` called from Python through cffi;
* ``c_net_ns``: the same minus two bare cffi calls (``afm_init`` alone, timed): what the
  matcher costs inside the C core, where there is no cffi call;
* ``python_mirror_ns``: :meth:`acceptfilter.matcher.Program.match`;
* ``check_ns``: ``filter.session().check(data, False)``, what the engine runs today;
* ``chunked_*``: the same bytes arriving in 4 segments (resumable matcher vs a session).

Medians of ``rounds`` rounds; nothing here asserts a time (the smoke test only checks the shape).
"""

from __future__ import annotations

import argparse
import ssl
import statistics
import struct
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from acceptfilter.filter import Filter
from acceptfilter.matcher import Program
from acceptfilter.registry import load_filter
from bench import machine
from bench.common import RESULTS, write_result

PEER = ("127.0.0.1", 40000)


def _client_hello() -> bytes:
    ctx = ssl.create_default_context()
    conn = ctx.wrap_bio(ssl.MemoryBIO(), out := ssl.MemoryBIO(), server_hostname="example.org")
    try:
        conn.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return out.read()


def _dns_query() -> bytes:
    msg = struct.pack("!HHHHHH", 0x1234, 0x0100, 1, 0, 0, 0)
    msg += b"\x03www\x07example\x03org\x00" + struct.pack("!HH", 28, 1)
    return struct.pack("!H", len(msg)) + msg


CURL_GET = b"GET /index.html HTTP/1.1\r\nHost: example.org\r\nUser-Agent: curl/8.5.0\r\nAccept: */*\r\n\r\n"
BROWSER_GET = (
    b"GET /static/app.js?v=1234 HTTP/1.1\r\nHost: www.example.org\r\n"
    b"User-Agent: Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0\r\n"
    b"Accept: text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8\r\n"
    b"Accept-Language: en-US,en;q=0.5\r\nAccept-Encoding: gzip, deflate, br, zstd\r\n"
    b"Referer: https://www.example.org/\r\nConnection: keep-alive\r\n"
    b"Cookie: session=0123456789abcdef0123456789abcdef; theme=dark\r\n"
    b"Upgrade-Insecure-Requests: 1\r\nSec-Fetch-Dest: document\r\nSec-Fetch-Mode: navigate\r\n"
    b"Sec-Fetch-Site: same-origin\r\nPriority: u=0, i\r\n\r\n"
)
PROXY_V2 = b"\r\n\r\n\x00\r\nQUIT\n\x21\x11\x00\x0c" + bytes([10, 0, 0, 1, 10, 0, 0, 2, 0x30, 0x39, 0x01, 0xBB])

CASES: dict[str, tuple[str, bytes]] = {
    "dataready": ("dataready", CURL_GET),
    "httpready-curl-get": ("httpready", CURL_GET),
    "httpready-browser-get": ("httpready", BROWSER_GET),
    "dnsready-query": ("dnsready", _dns_query()),
    "tlsready-clienthello": ("tlsready", _client_hello()),
    "proxy-v2": ("proxy:trusted=127.0.0.0/8", PROXY_V2),
}


def _ns_per_call(fn: Callable[[], object], iterations: int, rounds: int) -> float:
    """Median over rounds of the mean ns per call."""
    per_round = []
    for _ in range(rounds):
        start = time.perf_counter_ns()
        for _ in range(iterations):
            fn()
        per_round.append((time.perf_counter_ns() - start) / iterations)
    return float(statistics.median(per_round))


def _session(flt: Filter) -> Any:
    return flt.peer_session(PEER) if flt.needs_peer else flt.session()


def measure(spec: str, data: bytes, iterations: int, rounds: int) -> dict[str, Any]:
    from acceptfilter._core import ffi, lib

    from acceptfilter import cmatcher

    flt = load_filter(spec)
    program: Program | None = flt.peer_matcher(PEER)
    assert program is not None, spec
    cprog = cmatcher.compile_program(program)
    state = ffi.new("afm_state *")
    buf = ffi.from_buffer("uint8_t[]", data)
    ptr, n, init, run = cprog.ptr, len(data), lib.afm_init, lib.afm_run

    def c_once() -> int:
        init(state)
        return int(run(ptr, state, buf, n))

    assert c_once() == 1 and program.match(data).ready and _session(flt).check(data, False).accepted, spec
    cuts = [len(data) * k // 4 for k in (1, 2, 3, 4)]
    prefixes = [data[:c] for c in cuts]
    pbufs = [(ffi.from_buffer("uint8_t[]", p), len(p)) for p in prefixes]

    def c_chunked() -> None:
        init(state)
        for b, m in pbufs:
            run(ptr, state, b, m)

    def check_chunked() -> None:
        s = _session(flt)
        for p in prefixes:
            s.check(p, False)

    def mirror_chunked() -> None:
        st = program.start()
        for p in prefixes:
            st.run(p)

    bare = _ns_per_call(lambda: init(state), iterations, rounds)
    c_ns = _ns_per_call(c_once, iterations, rounds)
    mirror_ns = _ns_per_call(lambda: program.match(data), iterations // 4 or 1, rounds)
    check_ns = _ns_per_call(lambda: _session(flt).check(data, False), iterations // 4 or 1, rounds)
    return {
        "spec": spec,
        "bytes": len(data),
        "c_ns": round(c_ns, 1),
        "c_net_ns": round(max(c_ns - 2 * bare, 0.0), 1),
        "cffi_call_ns": round(bare, 1),
        "python_mirror_ns": round(mirror_ns, 1),
        "check_ns": round(check_ns, 1),
        "check_over_c": round(check_ns / c_ns, 1),
        "chunked_c_ns": round(_ns_per_call(c_chunked, iterations, rounds), 1),
        "chunked_python_mirror_ns": round(_ns_per_call(mirror_chunked, iterations // 4 or 1, rounds), 1),
        "chunked_check_ns": round(_ns_per_call(check_chunked, iterations // 4 or 1, rounds), 1),
    }


def run(quick: bool = False) -> dict[str, Any]:
    iterations, rounds = (2000, 3) if quick else (20000, 7)
    return {
        "iterations": iterations,
        "rounds": rounds,
        "results": {name: measure(spec, data, iterations, rounds) for name, (spec, data) in CASES.items()},
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer iterations (a few seconds)")
    p.add_argument("--out", type=Path, default=RESULTS, help="directory for matcher.json")
    args = p.parse_args(argv)
    result = {"benchmark": "matcher", "quick": args.quick, "date": time.strftime("%Y-%m-%d"),
              "machine": machine.facts(), **run(quick=args.quick)}
    path = write_result("matcher", result, args.out)
    for name, r in result["results"].items():
        print(f"{name:24} {r['bytes']:5d} B  C {r['c_ns']:8.0f} ns (net {r['c_net_ns']:6.0f})  "
              f"mirror {r['python_mirror_ns']:8.0f} ns  check {r['check_ns']:8.0f} ns  check/C {r['check_over_c']:5.1f}x")
    print(f"-> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
