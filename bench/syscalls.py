"""System calls per connection: where the time of a filtered accept goes, counted by ``strace -c``.

The minimal server of the overhead benchmark (accept -> recv -> sendall -> close) runs in
each mode; wrk drives it (``Connection: close``); ``strace -c -f`` attaches to the server
for a fixed number of seconds after a warm-up. The result is the count of each system call
divided by the requests wrk completed meanwhile. strace slows the server down, so only the
counts are quoted, never the rate. Needs strace (requirements/apt-bench.txt) and wrk.
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import Child, have_wrk, run_wrk

MODES = ["plain", "httpready-c-defer", "httpready-c", "httpready-python-defer"]
#: The same server accepting the way selector-based servers do (wait on fileno(), then accept
#: until EAGAIN): nobody waits in accept(), the background thread surfaces every connection
#: through the route's ready queue.
SELECTOR_MODES = ["plain", "httpready-c"]
#: Calls that happen per batch or per wake-up, not per connection, are kept: the table
#: shows what each mode costs per connection on average, whatever the reason.
_LINE = re.compile(r"^\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:\d+\s+)?(\w+)\s*$")


def parse_strace_c(text: str) -> dict[str, int]:
    """``strace -c`` summary -> {syscall: calls}."""
    calls: dict[str, int] = {}
    for line in text.splitlines():
        m = _LINE.match(line)
        if m and m.group(2) != "total":
            calls[m.group(2)] = int(m.group(1))
    return calls


def measure(mode: str, *, seconds: float, kind: str = "echo") -> dict[str, Any]:
    with Child([kind, "--mode", mode]) as child:
        url = f"http://127.0.0.1:{child.port}/"
        run_wrk(url, seconds=1.0, connections=8)  # warm-up: the engine thread stands down
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "strace.txt"
            tracer = subprocess.Popen(["strace", "-c", "-f", "-o", str(out), "-p", str(child.pid)],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(0.5)  # attached to every thread
            result = run_wrk(url, seconds=seconds, connections=8)
            tracer.send_signal(signal.SIGINT)
            tracer.wait(30)
            calls = parse_strace_c(out.read_text())
    requests = max(1, int(result.get("requests", 0)))
    per_conn = {name: round(count / requests, 3) for name, count in sorted(calls.items())}
    return {"requests": requests, "per_connection": per_conn,
            "total_per_connection": round(sum(calls.values()) / requests, 2)}


def run(*, quick: bool) -> dict[str, Any]:
    if not (have_wrk() and shutil.which("strace")):
        return {"unavailable": "needs wrk and strace (./scripts/bench.sh installs both)"}
    seconds = 1.0 if quick else 3.0
    results = {mode: measure(mode, seconds=seconds) for mode in MODES}
    for mode in SELECTOR_MODES:
        results[f"{mode}-selector"] = measure(mode, seconds=seconds, kind="echo-selector")
    return {
        "config": {"seconds": seconds, "connections": 8, "client": "wrk, Connection: close",
                   "server": "single-threaded Python accept -> recv -> sendall -> close"},
        "results": results,
    }
