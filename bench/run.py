#!/usr/bin/env python3
"""Run the benchmarks and write one JSON per benchmark to bench/results/.

    python bench/run.py [--quick] [--only overhead,surface,scale,slowclient,workercpu,syscalls,defaults,relay,asyncidle,deadworker] [--out DIR]

Every comparison runs side by side in this process tree (servers and clients are child
processes), alternating the modes round by round. Each JSON carries the machine facts.
Then ``python bench/report.py`` renders the docs block (docs/benchmarks.md) and the plot.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import (
    asyncidle,
    deadworker,
    defaults,
    machine,
    overhead,
    relay,
    scale,
    slowclient,
    surface,
    syscalls,
    workercpu,
)
from bench.common import RESULTS, raise_nofile, write_result

BENCHMARKS: dict[str, Any] = {
    "overhead": overhead.run,
    "surface": surface.run,
    "scale": scale.run,
    "slowclient": slowclient.run,
    "workercpu": workercpu.run,
    "syscalls": syscalls.run,
    "defaults": defaults.run,
    "relay": relay.run,
    "asyncidle": asyncidle.run,
    "deadworker": deadworker.run,
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer rounds, shorter samples, smaller levels (about 5 min)")
    p.add_argument("--only", default="", help="comma-separated subset of: " + ",".join(BENCHMARKS))
    p.add_argument("--out", type=Path, default=RESULTS, help="directory for the JSON results")
    args = p.parse_args(argv)
    names = [n for n in args.only.split(",") if n] or list(BENCHMARKS)
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        p.error(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")
    raise_nofile(65536)
    facts = machine.facts()
    for name in names:
        t0 = time.monotonic()
        print(f"== {name} ({'quick' if args.quick else 'full'})", flush=True)
        result = BENCHMARKS[name](quick=args.quick)
        # wall_s: how long the whole benchmark took here, so the docs can say what a run costs.
        result = {"benchmark": name, "quick": args.quick, "date": time.strftime("%Y-%m-%d"),
                  "machine": facts, **result, "wall_s": round(time.monotonic() - t0, 1)}
        path = write_result(name, result, args.out)
        print(f"   {time.monotonic() - t0:.0f} s -> {path}", flush=True)
        print(json.dumps(result.get("goals", {})), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
