"""No false alarms: every built-in filter (and each documented example filter) passes check_filter at 20,000 examples.

Too slow for the test suite (minutes per filter); run it after changing the fuzzer and
record the result (issue 27)::

    .venv/bin/python scripts/fuzz_false_alarms.py [--examples N] [SPEC ...] > scripts/results/fuzz-false-alarms.json

Prints one JSON object per filter as it finishes (spec, examples, seconds, ok, violation).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from acceptfilter.registry import register_filter  # noqa: E402
from acceptfilter.testing import ContractViolation, check_filter  # noqa: E402

SPECS = [
    "dataready", "dataready:min_bytes=4", "httpready", "httpready:max_bytes=64",
    "httpready:non_http=reject,oversize=accept,max_bytes=200", "dnsready", "tlsready", "sshready", "silent",
    "proxy:trusted=127.0.0.0/8", "helloready", "respready", "beanready",
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=20000)
    parser.add_argument("--stateful", action="store_true", help="also the state machine (half as many runs; slow)")
    parser.add_argument("specs", nargs="*", default=SPECS)
    args = parser.parse_args()
    from tests.planted_filters import RespReady
    from tests.planted_guided import BeanReady
    from tests.thirdparty_filter import HelloReady

    for cls in (HelloReady, RespReady, BeanReady):
        register_filter(cls, replace=True)
    failed = 0
    for spec in args.specs:
        start = time.monotonic()
        violation = None
        try:
            check_filter(spec, max_examples=args.examples, stateful=args.stateful)
        except ContractViolation as exc:
            violation, failed = str(exc), failed + 1
        row = {"spec": spec, "examples": args.examples, "stateful": args.stateful, "seconds": round(time.monotonic() - start, 1),
               "ok": violation is None, "violation": violation, "python": sys.version.split()[0]}
        print(json.dumps(row), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
