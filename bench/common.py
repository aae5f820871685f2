"""Helpers shared by the benchmarks: child servers, wrk, a small own client, statistics, results."""

from __future__ import annotations

import json
import math
import os
import re
import resource
import select
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"

RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"


def raise_nofile(want: int) -> int:
    """Raise RLIMIT_NOFILE towards ``want`` (root may lift the hard limit up to fs.nr_open); returns the soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= want:
        return soft
    try:
        with open("/proc/sys/fs/nr_open") as f:
            nr_open = int(f.read())
    except (OSError, ValueError):
        nr_open = hard
    for new_hard in (max(hard, min(want, nr_open)), hard):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(want, new_hard), new_hard))
            break
        except (ValueError, OSError):
            continue
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def percentile(xs: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100)."""
    if not xs:
        return float("nan")
    s = sorted(xs)
    k = max(0, min(len(s) - 1, math.ceil(p / 100 * len(s)) - 1))
    return float(s[k])


class Child:
    """A benchmark server in its own process: ``python -m bench.servers ARGS``; waits for its READY line."""

    def __init__(self, args: Sequence[str], *, ready_timeout: float = 20.0, env: dict[str, str] | None = None) -> None:
        self.argv = [sys.executable, "-m", "bench.servers", *args]
        self.proc = subprocess.Popen(
            self.argv, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, bufsize=1
        )
        line = self.readline(ready_timeout)
        if not line.startswith("READY"):
            self.stop()
            raise RuntimeError(f"{' '.join(args)}: server did not start (got {line!r})")
        self.port = int(line.split()[1])
        self.pid = self.proc.pid

    def readline(self, timeout: float) -> str:
        assert self.proc.stdout is not None
        r, _, _ = select.select([self.proc.stdout], [], [], timeout)
        return self.proc.stdout.readline().strip() if r else ""

    def ask(self, command: str, timeout: float = 30.0) -> dict[str, Any]:
        """Send one command line; the server answers with one JSON line."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        line = self.readline(timeout)
        if not line:
            raise RuntimeError(f"no answer to {command!r}")
        result: dict[str, Any] = json.loads(line)
        return result

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        for f in (self.proc.stdin, self.proc.stdout):
            if f is not None:
                try:
                    f.close()
                except OSError:
                    pass

    def __enter__(self) -> Child:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def proc_cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all threads), from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)
    return ticks / os.sysconf("SC_CLK_TCK")


def process_tree(pid: int) -> list[int]:
    """``pid`` and every process below it (a gunicorn arbiter: its workers and the filter process)."""
    found = [pid]
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                for child in f.read().split():
                    found += process_tree(int(child))
    except FileNotFoundError:  # gone meanwhile
        pass
    return found


def tree_cpu_seconds(pids: Sequence[int]) -> float:
    """utime + stime of these processes together (0 for one that is gone)."""
    total = 0.0
    for pid in pids:
        try:
            total += proc_cpu_seconds(pid)
        except (FileNotFoundError, ProcessLookupError):
            pass
    return total


def machine_busy_seconds() -> float:
    """CPU seconds this machine spent busy, every core and every process together (user, system,
    interrupts; not idle or iowait), from /proc/stat."""
    with open("/proc/stat") as f:
        user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in f.readline().split()[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def proc_rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


# -- wrk --------------------------------------------------------------------
_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1000.0, "m": 60000.0}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    return float(m.group(1)) * _UNITS[m.group(2)] if m else float("nan")


def have_wrk() -> bool:
    return shutil.which("wrk") is not None


def run_wrk(url: str, *, seconds: float, connections: int, threads: int = 1, close: bool = True,
            timeout_s: float = 5.0) -> dict[str, Any]:
    """Run wrk with --latency; return requests/s, p50/p99 (ms) and every kind of error."""
    argv = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--latency",
            f"--timeout={max(1, round(timeout_s))}s"]
    if close:
        argv += ["-H", "Connection: close"]
    argv.append(url)
    out = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60).stdout
    return parse_wrk(out)


def parse_wrk(out: str) -> dict[str, Any]:
    res: dict[str, Any] = {"requests": 0, "rps": 0.0, "p50_ms": float("nan"), "p99_ms": float("nan"),
                           "connect_errors": 0, "read_errors": 0, "write_errors": 0, "timeouts": 0, "non_2xx": 0}
    m = re.search(r"(\d+) requests in", out)
    if m:
        res["requests"] = int(m.group(1))
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if m:
        res["rps"] = float(m.group(1))
    for pct, key in (("50", "p50_ms"), ("99", "p99_ms")):
        m = re.search(rf"^\s+{pct}(?:\.000)?%\s+(\S+)", out, re.M)
        if m:
            res[key] = _ms(m.group(1))
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if m:
        res["connect_errors"], res["read_errors"], res["write_errors"], res["timeouts"] = map(int, m.groups())
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if m:
        res["non_2xx"] = int(m.group(1))
    if res["requests"] == 0:  # nothing completed: no latency to speak of
        res["p50_ms"] = res["p99_ms"] = None
        res["stalled"] = True
    res["errors"] = res["connect_errors"] + res["read_errors"] + res["write_errors"] + res["timeouts"] + res["non_2xx"]
    return res


# -- the own client: connection per request, for runs without wrk -----------------
REQUEST = b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n"


def _one_request(host: str, port: int, payload: bytes, timeout: float) -> bool:
    with socket.create_connection((host, port), timeout=timeout) as s:
        s.sendall(payload)
        got = b""
        while True:
            chunk = s.recv(4096)
            if not chunk:
                break
            got += chunk
    return got.startswith(b"HTTP/1.1 200") or got.startswith(b"HTTP/1.0 200")


def py_load(host: str, port: int, *, seconds: float, concurrency: int = 4, max_requests: int = 1_000_000,
            timeout: float = 5.0) -> dict[str, Any]:
    """Connection-per-request load from threads (bounded in time and count); rps, p50/p99 (ms), errors."""
    lat: list[float] = []
    errors = [0]
    lock = threading.Lock()
    stop_at = time.monotonic() + seconds

    def worker() -> None:
        mine: list[float] = []
        errs = 0
        while time.monotonic() < stop_at and len(mine) < max_requests // concurrency:
            t = time.perf_counter()
            try:
                ok = _one_request(host, port, REQUEST, timeout)
            except OSError:
                ok = False
            if ok:
                mine.append((time.perf_counter() - t) * 1000)
            else:
                errs += 1
        with lock:
            lat.extend(mine)
            errors[0] += errs

    t0 = time.monotonic()
    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + timeout + 5)
    elapsed = time.monotonic() - t0
    return {"requests": len(lat), "rps": len(lat) / elapsed if elapsed else 0.0,
            "p50_ms": percentile(lat, 50), "p99_ms": percentile(lat, 99), "errors": errors[0]}


def write_result(name: str, data: dict[str, Any], directory: Path = RESULTS) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.json"
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    return path


@contextmanager
def timed() -> Iterator[list[float]]:
    box = [0.0]
    t = time.monotonic()
    try:
        yield box
    finally:
        box[0] = time.monotonic() - t
