"""The relay (`acceptfilter serve --route ... --forward`) side by side with direct connections.

Two measurements, each alternating the set-ups round by round:

* redis-benchmark GET (persistent connections, one request in flight per
  connection) against redis-server directly and through the relay with each
  pump (``ACCEPTFILTER_RELAY_PUMP``): ``c`` (the default: one GIL-free C call
  per connection, splice(2) both ways), ``splice`` (os.splice from two Python
  threads per connection) and ``copy`` (recv/sendall in Python, what the relay
  did before). Goal: >= 0.8x direct.
* A TLS request (connect, handshake, ``GET /``, read to the end) to
  ``openssl s_server -www``, directly and through a ``tlsready`` route;
  median and p90 over sequential requests. Goal: median within 1 ms of direct.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import free_port, median, percentile

SETUPS = ("direct", "relay-c", "relay-splice", "relay-copy")
#: ACCEPTFILTER_RELAY_PUMP for each relayed set-up.
PUMPS = {"relay-c": "c", "relay-splice": "splice", "relay-copy": "copy"}


def _wait_port(port: int, proc: subprocess.Popen[Any], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


def _relay(route: str, backend: int, *, pump: str) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    env = {**os.environ, "ACCEPTFILTER_RELAY_PUMP": pump}
    proc = subprocess.Popen([sys.executable, "-m", "acceptfilter.cli", "serve", "--port", str(port), "--no-status",
                             "--route", route, "--forward", f"{route.split('=')[0]}=127.0.0.1:{backend}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    _wait_port(port, proc)
    return proc, port


def _stop(proc: subprocess.Popen[Any]) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def redis_rps(port: int, requests: int, clients: int) -> float:
    out = subprocess.run(["redis-benchmark", "-h", "127.0.0.1", "-p", str(port), "-t", "get", "-n", str(requests),
                          "-c", str(clients), "-P", "1", "--csv"], capture_output=True, text=True, timeout=300)
    found = re.search(r'^"GET","([0-9.]+)"', out.stdout, re.M)
    if out.returncode != 0 or found is None:
        raise RuntimeError(f"redis-benchmark failed: {out.stdout[-500:]} {out.stderr[-500:]}")
    return float(found.group(1))


def tls_times(port: int, count: int) -> list[float]:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    times = []
    for _ in range(count):
        t0 = time.perf_counter()
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
                ctx.wrap_socket(raw, server_hostname="bench.test") as tls:
            tls.sendall(b"GET / HTTP/1.0\r\n\r\n")
            while tls.recv(65536):
                pass
        times.append((time.perf_counter() - t0) * 1000)
    return times


def run(*, quick: bool, rounds: int | None = None) -> dict[str, Any]:
    if not (shutil.which("redis-server") and shutil.which("redis-benchmark") and shutil.which("openssl")):
        return {"unavailable": "needs redis-server, redis-tools and openssl (requirements/apt-bench.txt)"}
    rounds = rounds or (1 if quick else 3)
    requests, clients, tls_count = (5000, 20, 20) if quick else (50000, 50, 200)
    redis: dict[str, list[float]] = {s: [] for s in SETUPS}
    tls: dict[str, list[float]] = {"direct": [], "relay-c": []}
    with tempfile.TemporaryDirectory() as tmp:
        rport = free_port()
        server = subprocess.Popen(["redis-server", "--port", str(rport), "--bind", "127.0.0.1", "--save", "",
                                   "--appendonly", "no", "--dir", tmp], stdout=subprocess.DEVNULL)
        key, crt = Path(tmp) / "key.pem", Path(tmp) / "crt.pem"
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                        str(crt), "-days", "1", "-subj", "/CN=bench.test"], check=True, capture_output=True)
        sport = free_port()
        s_server = subprocess.Popen(["openssl", "s_server", "-quiet", "-accept", f"127.0.0.1:{sport}", "-cert", str(crt),
                                     "-key", str(key), "-www"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                    stdin=subprocess.DEVNULL)
        relays: list[subprocess.Popen[bytes]] = []
        try:
            _wait_port(rport, server)
            _wait_port(sport, s_server)
            ports = {"direct": rport}
            for setup, pump in PUMPS.items():
                proc, ports[setup] = _relay("redis=dataready", rport, pump=pump)
                relays.append(proc)
            tls_proc, tls_port = _relay("tls=tlsready", sport, pump="c")
            relays.append(tls_proc)
            redis_rps(rport, 1000, clients)  # warm up
            for _ in range(rounds):
                for setup in SETUPS:
                    redis[setup].append(redis_rps(ports[setup], requests, clients))
                tls["direct"] += tls_times(sport, tls_count)
                tls["relay-c"] += tls_times(tls_port, tls_count)
        finally:
            for proc in [*relays, server, s_server]:
                _stop(proc)
    results: dict[str, Any] = {"redis": {}, "tls": {}}
    for setup, values in redis.items():
        results["redis"][setup] = {"rps": median(values), "ratio_to_direct": median(
            [v / d for v, d in zip(values, redis["direct"], strict=True)]), "rounds": values}
    for setup, values in tls.items():
        results["tls"][setup] = {"p50_ms": median(values), "p90_ms": percentile(values, 90), "requests": len(values)}
    ratio = results["redis"]["relay-c"]["ratio_to_direct"]
    extra_ms = results["tls"]["relay-c"]["p50_ms"] - results["tls"]["direct"]["p50_ms"]
    return {
        "config": {"redis": f"redis-benchmark -t get -n {requests} -c {clients} -P 1", "rounds": rounds,
                   "tls": f"{tls_count} sequential requests per round to openssl s_server -www (new connection each)",
                   "relay": "acceptfilter serve --route NAME=dataready|tlsready --forward NAME=127.0.0.1:PORT"},
        "results": results,
        "goals": {"redis_ratio_ge_0.8": ratio >= 0.8, "tls_p50_within_1ms": extra_ms <= 1.0,
                  "redis_ratio": round(ratio, 3), "tls_extra_ms": round(extra_ms, 3)},
    }
