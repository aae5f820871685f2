"""The relay (`acceptfilter serve --route ... --forward`) side by side with direct connections.

Two measurements, each alternating the set-ups round by round:

* redis-benchmark GET (persistent connections, one request in flight per
  connection) against redis-server directly and through the relay with each
  pump (``ACCEPTFILTER_RELAY_PUMP``): ``c`` (the default: one C event loop for
  every connection, recv/send), ``c-splice`` (the same loop moving bytes with
  splice(2) through a pipe per direction), ``thread`` (one GIL-free C call per
  connection in its own thread, poll + splice: the pump before the loop),
  ``splice`` (os.splice from two Python threads per connection) and ``copy``
  (recv/sendall in Python, the first relay). Goal: >= 0.8x direct.
* A TLS request (connect, handshake, ``GET /``, read to the end) to
  ``openssl s_server -www``, directly and through a ``tlsready`` route (the
  loop, and the thread per connection); median and p90 over sequential
  requests. Goal: median within 1 ms of direct.
* A bulk transfer (64 MiB from a backend that writes as fast as it can, read
  by the client as fast as it can) through each C pump: the one place where
  splice's zero-copy could matter.

HAProxy in ``mode tcp`` (one thread), when installed, runs the same three as
a reference: a mature event-loop relay on the same loopback path, so what no
relay can avoid on this machine shows apart from what is ours. Every relayed
set-up also reports the relay process's CPU time per redis request
(``/proc/PID/stat``, user + system), the figure load on the machine moves least.
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

SETUPS = ("direct", "relay-c", "relay-c-splice", "relay-thread", "relay-splice", "relay-copy", "haproxy")
#: ACCEPTFILTER_RELAY_PUMP for each relayed set-up.
PUMPS = {"relay-c": "c", "relay-c-splice": "c-splice", "relay-thread": "thread", "relay-splice": "splice",
         "relay-copy": "copy"}
TLS_SETUPS = ("direct", "relay-c", "relay-thread", "haproxy")
BULK_SETUPS = ("direct", "relay-c", "relay-c-splice", "relay-thread", "haproxy")
BULK_BYTES = 64 << 20


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


def _haproxy(tmp: str, backends: dict[str, int]) -> tuple[subprocess.Popen[bytes], dict[str, int]]:
    """HAProxy in TCP mode, one thread, a listener per backend (the reference relay)."""
    ports = {name: free_port() for name in backends}
    cfg = Path(tmp) / "haproxy.cfg"
    cfg.write_text("global\n  nbthread 1\n  maxconn 4096\n"
                   "defaults\n  mode tcp\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n"
                   + "".join(f"listen {name}\n  bind 127.0.0.1:{ports[name]}\n  server s 127.0.0.1:{port}\n"
                             for name, port in backends.items()))
    proc = subprocess.Popen(["haproxy", "-f", str(cfg), "-db"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for port in ports.values():
        _wait_port(port, proc)
    return proc, ports


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (/proc/PID/stat)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


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


#: A backend for the bulk transfer: per connection, wait for one byte, send BULK_BYTES, close.
BULK_SERVER = """
import socket, sys, threading
srv = socket.create_server(("127.0.0.1", int(sys.argv[1])))
block = bytes(1 << 20)
def serve(conn):
    with conn:
        try:
            if conn.recv(1):  # nothing: a readiness probe
                for _ in range(int(sys.argv[2]) >> 20):
                    conn.sendall(block)
        except OSError:
            pass
while True:
    c, _ = srv.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"""


def bulk_mib_s(port: int) -> float:
    """MiB/s of one BULK_BYTES download (the client sends one byte first: dataready waits for it)."""
    buf = bytearray(1 << 20)
    got = 0
    t0 = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=30) as c:
        c.sendall(b"x")
        while n := c.recv_into(buf):
            got += n
    seconds = time.perf_counter() - t0
    if got != BULK_BYTES:
        raise RuntimeError(f"bulk transfer: {got} bytes, not {BULK_BYTES}")
    return BULK_BYTES / (1 << 20) / seconds


def run(*, quick: bool, rounds: int | None = None) -> dict[str, Any]:
    if not (shutil.which("redis-server") and shutil.which("redis-benchmark") and shutil.which("openssl")):
        return {"unavailable": "needs redis-server, redis-tools and openssl (requirements/apt-bench.txt)"}
    rounds = rounds or (1 if quick else 3)
    requests, clients, tls_count, bulk_count = (5000, 20, 20, 1) if quick else (50000, 50, 200, 3)
    with_haproxy = shutil.which("haproxy") is not None
    setups = [s for s in SETUPS if with_haproxy or s != "haproxy"]
    tls_setups = [s for s in TLS_SETUPS if s in setups]
    bulk_setups = [s for s in BULK_SETUPS if s in setups]
    redis: dict[str, list[float]] = {s: [] for s in setups}
    cpu_us: dict[str, list[float]] = {s: [] for s in setups}
    tls: dict[str, list[float]] = {s: [] for s in tls_setups}
    bulk: dict[str, list[float]] = {s: [] for s in bulk_setups}
    with tempfile.TemporaryDirectory() as tmp:
        rport, sport, bport = free_port(), free_port(), free_port()
        server = subprocess.Popen(["redis-server", "--port", str(rport), "--bind", "127.0.0.1", "--save", "",
                                   "--appendonly", "no", "--dir", tmp], stdout=subprocess.DEVNULL)
        key, crt = Path(tmp) / "key.pem", Path(tmp) / "crt.pem"
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                        str(crt), "-days", "1", "-subj", "/CN=bench.test"], check=True, capture_output=True)
        s_server = subprocess.Popen(["openssl", "s_server", "-quiet", "-accept", f"127.0.0.1:{sport}", "-cert", str(crt),
                                     "-key", str(key), "-www"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                    stdin=subprocess.DEVNULL)
        bulk_server = subprocess.Popen([sys.executable, "-c", BULK_SERVER, str(bport), str(BULK_BYTES)])
        relays: list[subprocess.Popen[bytes]] = []
        try:
            _wait_port(rport, server)
            _wait_port(sport, s_server)
            _wait_port(bport, bulk_server)
            ports, tls_ports, bulk_ports = {"direct": rport}, {"direct": sport}, {"direct": bport}
            pids = {"direct": server.pid}  # direct: redis-server's own CPU per request, for scale
            for setup, pump in PUMPS.items():
                proc, ports[setup] = _relay("redis=dataready", rport, pump=pump)
                pids[setup] = proc.pid
                relays.append(proc)
                if setup in tls_setups:
                    proc, tls_ports[setup] = _relay("tls=tlsready", sport, pump=pump)
                    relays.append(proc)
                if setup in bulk_setups:
                    proc, bulk_ports[setup] = _relay("bulk=dataready", bport, pump=pump)
                    relays.append(proc)
            if with_haproxy:
                proc, hports = _haproxy(tmp, {"redis": rport, "tls": sport, "bulk": bport})
                relays.append(proc)
                pids["haproxy"] = proc.pid
                ports["haproxy"], tls_ports["haproxy"], bulk_ports["haproxy"] = hports["redis"], hports["tls"], hports["bulk"]
            redis_rps(rport, 1000, clients)  # warm up
            for _ in range(rounds):
                for setup in setups:
                    before = cpu_seconds(pids[setup])
                    redis[setup].append(redis_rps(ports[setup], requests, clients))
                    cpu_us[setup].append((cpu_seconds(pids[setup]) - before) / requests * 1e6)
                for setup in tls_setups:
                    tls[setup] += tls_times(tls_ports[setup], tls_count)
                for setup in bulk_setups:
                    bulk[setup] += [bulk_mib_s(bulk_ports[setup]) for _ in range(bulk_count)]
        finally:
            for proc in [*relays, server, s_server, bulk_server]:
                _stop(proc)
    results: dict[str, Any] = {"redis": {}, "tls": {}, "bulk": {}}
    for setup, values in redis.items():
        results["redis"][setup] = {"rps": median(values), "ratio_to_direct": median(
            [v / d for v, d in zip(values, redis["direct"], strict=True)]), "rounds": values,
            "cpu_us_per_request": median(cpu_us[setup])}
    for setup, values in tls.items():
        results["tls"][setup] = {"p50_ms": median(values), "p90_ms": percentile(values, 90), "requests": len(values)}
    for setup, values in bulk.items():
        results["bulk"][setup] = {"mib_s": median(values), "runs": values}
    ratio = results["redis"]["relay-c"]["ratio_to_direct"]
    extra_ms = results["tls"]["relay-c"]["p50_ms"] - results["tls"]["direct"]["p50_ms"]
    return {
        "config": {"redis": f"redis-benchmark -t get -n {requests} -c {clients} -P 1", "rounds": rounds,
                   "tls": f"{tls_count} sequential requests per round to openssl s_server -www (new connection each)",
                   "bulk": f"{BULK_BYTES >> 20} MiB backend -> client, {bulk_count} per round",
                   "relay": "acceptfilter serve --route NAME=dataready|tlsready --forward NAME=127.0.0.1:PORT",
                   "haproxy": "haproxy mode tcp, nbthread 1" if with_haproxy else None},
        "results": results,
        "goals": {"redis_ratio_ge_0.8": ratio >= 0.8, "tls_p50_within_1ms": extra_ms <= 1.0,
                  "redis_ratio": round(ratio, 3), "tls_extra_ms": round(extra_ms, 3)},
    }
