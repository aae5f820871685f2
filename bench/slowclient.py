"""Slow-client immunity: gunicorn sync (4 workers) under idle + slowloris connections.

Six set-ups, each measured with wrk (Connection: close, fixed duration, --latency):
no attack; no attack with acceptfilter (the everyday tax); attack with no protection; attack with acceptfilter ``httpready`` (the
gunicorn integration: ``ACCEPTFILTER_FILTER=httpready gunicorn -c python:acceptfilter.gunicorn``);
attack with nginx (Debian package, a standard reverse-proxy config) in front of the same
gunicorn; no attack with nginx in front. The attack (its own process) holds idle connections
plus slowloris connections that send one header byte every few seconds and never finish.
"""

from __future__ import annotations

import argparse
import errno
import importlib.util
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from bench.common import (
    ROOT,
    free_port,
    have_wrk,
    machine_busy_seconds,
    median,
    percentile,
    process_tree,
    raise_nofile,
    run_wrk,
    tree_cpu_seconds,
)

#: "no-attack-acceptfilter" is the everyday tax: what the filter costs when nobody attacks.
SETUPS = ["no-attack", "no-attack-acceptfilter", "attack-unprotected", "attack-acceptfilter", "attack-nginx",
          "no-attack-nginx"]
FD_LIMIT = 65536
#: The protected set-up: hold until a whole request head is there; close what is not after 60 s,
#: nginx's default client_header_timeout, so both defences run the same policy. (The default
#: on_timeout=surface would hand idle and slowloris clients to the workers; a short timeout makes
#: the attack reconnect in bursts that overflow the listen backlog, and legit SYNs get retransmitted.)
PROTECTED_ENV = {"ACCEPTFILTER_FILTER": "httpready", "ACCEPTFILTER_TIMEOUT": "60",
                 "ACCEPTFILTER_ON_TIMEOUT": "close", "ACCEPTFILTER_MAX_HELD": "10000"}
IP_BIND_ADDRESS_NO_PORT = 24


# -- the attack ------------------------------------------------------------------------------
def _open(port: int, i: int) -> socket.socket | None:
    s = socket.socket()
    s.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
    s.bind((f"127.0.0.{2 + i // 20000}", 0))
    s.setblocking(False)
    if s.connect_ex(("127.0.0.1", port)) not in (0, errno.EINPROGRESS):
        s.close()
        return None
    return s


SLOW_START = b"GET / HTTP/1.1\r\nHost: x\r\n"


def attack(port: int, idle: int, slowloris: int, seconds: float, interval: float) -> None:
    """Hold ``idle`` silent connections and ``slowloris`` ones trickling a header byte every
    ``interval`` s, reopening any the server closes (as slowloris tools do); print one JSON line
    once they are open and another at the end; stop after ``seconds`` or at stdin EOF."""
    raise_nofile(idle + slowloris + 1000)
    stop_at = time.monotonic() + seconds
    total = idle + slowloris
    socks: list[socket.socket | None] = []
    for i in range(total):
        socks.append(_open(port, i))
        if i % 500 == 499:
            time.sleep(0.01)
    time.sleep(0.2)
    started = [False] * total  # slowloris: the request line was sent
    print(json.dumps({"opened": sum(s is not None for s in socks), "failed": sum(s is None for s in socks)}),
          flush=True)
    reopened = ticks = 0
    while time.monotonic() < stop_at:
        ticks += 1
        byte = b"X-abcdefgh: y\r\n"[ticks % 14 : ticks % 14 + 1]
        poller = select.poll()
        for s in socks:
            if s is not None:
                poller.register(s, select.POLLIN)
        gone = {fd for fd, _ in poller.poll(0)}  # readable: the server closed it (or answered)
        for i in range(total):
            s = socks[i]
            if s is not None and s.fileno() in gone:
                s.close()
                s = None
            if s is None:
                s = socks[i] = _open(port, i)
                started[i] = False
                reopened += s is not None
                continue
            if i >= idle:
                try:
                    s.send(byte if started[i] else SLOW_START)  # one header byte; the head never ends
                    started[i] = True
                except OSError:
                    pass
        r, _, _ = select.select([sys.stdin], [], [], interval)
        if r and not sys.stdin.readline():
            break
    print(json.dumps({"reopened": reopened}), flush=True)
    for s in socks:
        if s is not None:
            s.close()


# -- the servers -------------------------------------------------------------------------------
def _nofile() -> None:
    raise_nofile(FD_LIMIT)


def acceptfilter_gunicorn_available() -> bool:
    try:
        return importlib.util.find_spec("acceptfilter.gunicorn") is not None
    except ImportError:
        return False


def wait_port(port: int, timeout: float = 20.0) -> bool:
    stop_at = time.monotonic() + timeout
    while time.monotonic() < stop_at:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.1)
    return False


def start_gunicorn(port: int, protected: bool, logdir: Path) -> subprocess.Popen[bytes]:
    argv = [sys.executable, "-m", "gunicorn", "-w", "4", "-k", "sync", "-b", f"127.0.0.1:{port}",
            "--backlog", "4096", "--log-level", "warning", "bench.wsgiapp:app"]
    env = dict(os.environ)
    if protected:
        # The documented integration: ACCEPTFILTER_FILTER=httpready gunicorn -c python:acceptfilter.gunicorn ...
        argv[3:3] = ["-c", "python:acceptfilter.gunicorn"]
        env.update(PROTECTED_ENV)
    log = open(logdir / f"gunicorn-{port}.log", "wb")  # noqa: SIM115 - lives as long as the process
    return subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, preexec_fn=_nofile)


NGINX_CONF = """
daemon off;
master_process on;
worker_processes 1;
worker_rlimit_nofile {nofile};
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 16384; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    upstream app {{ server 127.0.0.1:{upstream}; }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{
            proxy_pass http://app;
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
        }}
    }}
}}
"""


def start_nginx(port: int, upstream: int, prefix: Path) -> subprocess.Popen[bytes]:
    conf = prefix / "nginx.conf"
    conf.write_text(NGINX_CONF.format(prefix=prefix, port=port, upstream=upstream, nofile=FD_LIMIT))
    log = open(prefix / "nginx.out", "wb")  # noqa: SIM115
    return subprocess.Popen(["nginx", "-p", str(prefix), "-c", str(conf), "-e", str(prefix / "error.log")],
                            stdout=log, stderr=subprocess.STDOUT, preexec_fn=_nofile)


def stop(proc: subprocess.Popen[Any]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


# -- one measurement ---------------------------------------------------------------------------
def start_attack(stack: ExitStack, port: int, *, idle: int, slowloris: int,
                 seconds: float) -> tuple[subprocess.Popen[str], dict[str, Any]]:
    """The attack in its own process (ended with ``stack``), and what it says once it is in place."""
    att = subprocess.Popen([sys.executable, "-m", "bench.slowclient", "--attack", "--port", str(port),
                            "--idle", str(idle), "--slowloris", str(slowloris), "--seconds", str(seconds)],
                           cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def end_attack() -> None:
        att.send_signal(signal.SIGCONT)  # a paired run may have left it stopped
        if att.stdin is not None and not att.stdin.closed:
            att.stdin.close()
        try:
            att.wait(20)
        except subprocess.TimeoutExpired:
            att.kill()

    stack.callback(end_attack)
    assert att.stdout is not None
    r, _, _ = select.select([att.stdout], [], [], 60)
    started = json.loads(att.stdout.readline() or "{}") if r else {"error": "attack did not start"}
    return att, started


def start_setup(stack: ExitStack, setup: str, prefix: Path, *, idle: int, slowloris: int,
                attack_seconds: float) -> dict[str, Any]:
    """Start ``setup``'s servers and, for an attack set-up, its attack, all ended by ``stack``.

    Returns ``port`` (what wrk measures), ``attack_proc`` and ``attack`` (what it said once in
    place) for an attack set-up, or ``error``.
    """
    protected = setup.endswith("-acceptfilter")
    gport = free_port()
    guni = start_gunicorn(gport, protected, prefix)
    stack.callback(stop, guni)
    if not wait_port(gport):
        return {"error": "gunicorn did not start: " + (prefix / f"gunicorn-{gport}.log").read_text()[-500:]}
    port = gport
    if "nginx" in setup:
        port = free_port()
        ngx = start_nginx(port, gport, prefix)
        stack.callback(stop, ngx)
        if not wait_port(port):
            return {"error": "nginx did not start: " + (prefix / "error.log").read_text()[-500:]}
    out: dict[str, Any] = {"port": port, "pid": guni.pid}
    if setup.startswith("attack"):
        out["attack_proc"], out["attack"] = start_attack(stack, port, idle=idle, slowloris=slowloris,
                                                         seconds=attack_seconds)
        time.sleep(2.0)  # let the attack settle in (slowloris bytes start trickling)
    return out


def finish_attack(att: subprocess.Popen[str] | None, said: dict[str, Any]) -> None:
    """Stop the attack; its last line says how many connections it had to reopen."""
    if att is not None and att.stdin is not None and att.stdout is not None:
        att.send_signal(signal.SIGCONT)  # in case a paired run left it stopped
        att.stdin.close()
        r, _, _ = select.select([att.stdout], [], [], 30)
        if r:
            said.update(json.loads(att.stdout.readline() or "{}"))


def measure(setup: str, *, seconds: float, idle: int, slowloris: int, connections: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="af-bench-") as tmp, ExitStack() as stack:
        started = start_setup(stack, setup, Path(tmp), idle=idle, slowloris=slowloris, attack_seconds=seconds + 60)
        if "error" in started:
            return started
        res: dict[str, Any] = {}
        if "attack" in started:
            res["attack"] = started["attack"]
        res.update(run_wrk(f"http://127.0.0.1:{started['port']}/", seconds=seconds, connections=connections,
                           threads=2))
        if "attack" in res:
            finish_attack(started["attack_proc"], res["attack"])
        return res


def paired(base: str, other: str, *, pairs: int, seconds: float, idle: int, slowloris: int,
           connections: int, starts: int = 1) -> dict[str, Any]:
    """``other`` against ``base``, both running side by side, wrk alternating between them.

    A ratio from separate runs mixes the set-ups' difference with whatever else this machine
    did in between (on two cores, +-5 % from one 10 s run to the next). Here each pair is two
    short runs back to back, in ABBA order, and the result is the median of the per-pair
    ratios. A started server also keeps a speed of its own for as long as it runs (where its
    workers and wrk's threads land on the two cores): two identical servers side by side
    differed by 3 %. So the pairs are split over ``starts`` fresh starts of both set-ups.
    An attack runs only while its own set-up is measured: it is stopped (SIGSTOP; its
    connections stay open) while the other is, so the unattacked set-up shares the machine
    with nothing but an idle server.
    """
    rps: dict[str, list[float]] = {base: [], other: []}
    cpu: dict[str, dict[str, list[float]]] = {name: {"server": [], "machine": []} for name in (base, other)}
    errors = dict.fromkeys((base, other), 0)
    attack: dict[str, Any] | None = None
    per_start = max(1, pairs // starts)
    for start in range(starts):
        with tempfile.TemporaryDirectory(prefix="af-bench-") as tmp, ExitStack() as stack:
            running: dict[str, dict[str, Any]] = {}
            for setup in (base, other) if start % 2 == 0 else (other, base):
                (Path(tmp) / setup).mkdir()
                started = start_setup(stack, setup, Path(tmp) / setup, idle=idle, slowloris=slowloris,
                                      attack_seconds=per_start * 2 * (seconds + 5) + 120)
                if "error" in started:
                    return {"base": base, "other": other, "error": started["error"]}
                running[setup] = started

            def sample(setup: str, length: float, running: dict[str, dict[str, Any]] = running) -> dict[str, Any]:
                for name, st in running.items():
                    if "attack_proc" in st:
                        st["attack_proc"].send_signal(signal.SIGCONT if name == setup else signal.SIGSTOP)
                server = process_tree(running[setup]["pid"])  # arbiter, workers, filter process
                server_before, machine_before = tree_cpu_seconds(server), machine_busy_seconds()
                got = run_wrk(f"http://127.0.0.1:{running[setup]['port']}/", seconds=length,
                              connections=connections, threads=2)
                if got["requests"]:
                    # CPU per request: a steadier view of the cost than requests/s, which also moves
                    # with where the scheduler puts the workers and wrk's threads on two cores.
                    got["server_cpu_us"] = (tree_cpu_seconds(server) - server_before) / got["requests"] * 1e6
                    got["machine_cpu_us"] = (machine_busy_seconds() - machine_before) / got["requests"] * 1e6
                return got

            for setup in (base, other):
                sample(setup, 1)  # warm up: the first second of a fresh gunicorn is slower
            for i in range(per_start):
                for setup in (base, other) if i % 2 == 0 else (other, base):
                    got = sample(setup, seconds)
                    rps[setup].append(got["rps"])
                    errors[setup] += int(got["errors"])
                    for kind in ("server", "machine"):
                        if f"{kind}_cpu_us" in got:
                            cpu[setup][kind].append(got[f"{kind}_cpu_us"])
            for st in running.values():
                if "attack_proc" in st:
                    finish_attack(st["attack_proc"], st["attack"])
                    attack = st["attack"]
    ratios = sorted(o / b if b else float("nan") for o, b in zip(rps[other], rps[base], strict=True))
    return {"base": base, "other": other, "pairs": len(ratios), "starts": starts, "seconds_per_sample": seconds,
            "ratio_median": median(ratios), "ratio_q1": percentile(ratios, 25), "ratio_q3": percentile(ratios, 75),
            "rps_base_median": median(rps[base]), "rps_other_median": median(rps[other]),
            "errors_base": errors[base], "errors_other": errors[other],
            "ratios": [round(r, 3) for r in ratios], "attack": attack,
            # Median CPU per request over the same samples (microseconds): the server's processes,
            # and the whole machine (wrk, and for an attack set-up the attacking process, included).
            "cpu_us": {name: {kind: median(v) if v else None for kind, v in kinds.items()} for name, kinds in cpu.items()}}


def _median_or_none(xs: list[float | None]) -> float | None:
    vals = [x for x in xs if x is not None]
    return median(vals) if vals else None


def run(*, quick: bool, rounds: int | None = None, seconds: float | None = None,
        idle: int = 2000, slowloris: int = 2000) -> dict[str, Any]:
    rounds = rounds or (1 if quick else 3)
    seconds = seconds or (5.0 if quick else 10.0)
    pairs, pair_seconds, starts = (4, 2.0, 1) if quick else (24, 3.0, 12)
    connections = 16
    out: dict[str, Any] = {"benchmark": "slowclient",
                           "config": {"rounds": rounds, "seconds_per_sample": seconds, "wrk_connections": connections,
                                      "gunicorn": "sync, 4 workers, --backlog 4096, trivial WSGI app",
                                      "attack": f"{idle} idle + {slowloris} slowloris connections (one header byte every 2 s)",
                                      "nginx": "Debian package, 1 worker, proxy_pass to the same gunicorn",
                                      "acceptfilter": " ".join(f"{k}={v}" for k, v in PROTECTED_ENV.items())
                                      + " gunicorn -c python:acceptfilter.gunicorn ...",
                                      "paired": f"{pairs} pairs x {pair_seconds:g} s over {starts} fresh start(s) "
                                                "of both set-ups, both running, wrk alternating (ABBA), the attack "
                                                "stopped while the unattacked one is measured; median of the "
                                                "per-pair ratios"}}
    missing = [tool for tool in ("wrk", "nginx") if shutil.which(tool) is None]
    if not have_wrk() or importlib.util.find_spec("gunicorn") is None:
        out["unavailable"] = "needs wrk and gunicorn (./scripts/bench.sh installs them)"
        return out
    t0 = time.monotonic()
    samples: dict[str, list[dict[str, Any]]] = {s: [] for s in SETUPS}
    unavailable: dict[str, str] = {}
    if not acceptfilter_gunicorn_available():
        unavailable["attack-acceptfilter"] = "acceptfilter.gunicorn (the gunicorn integration) is not installed yet"
        unavailable["no-attack-acceptfilter"] = unavailable["attack-acceptfilter"]
    if "nginx" in missing:
        unavailable["attack-nginx"] = unavailable["no-attack-nginx"] = "nginx is not installed"
    for r in range(rounds):
        for setup in SETUPS if r % 2 == 0 else SETUPS[::-1]:
            if setup not in unavailable:
                samples[setup].append(measure(setup, seconds=seconds, idle=idle, slowloris=slowloris,
                                              connections=connections))
    # The two goals are ratios: measured again, side by side (see paired()).
    ratios: dict[str, Any] = {}
    for name, other in (("everyday_tax", "no-attack-acceptfilter"), ("protected", "attack-acceptfilter")):
        if other not in unavailable:
            ratios[name] = paired("no-attack", other, pairs=pairs, seconds=pair_seconds, idle=idle,
                                  slowloris=slowloris, connections=connections, starts=starts)
    out["paired"] = ratios
    results: dict[str, Any] = {}
    for setup in SETUPS:
        ok = [s for s in samples[setup] if "rps" in s]
        if setup in unavailable or not ok:
            errs = [s.get("error", "") for s in samples[setup] if "error" in s]
            results[setup] = {"unavailable": unavailable.get(setup) or "; ".join(errs) or "no sample"}
            continue
        results[setup] = {
            "rps": median([s["rps"] for s in ok]),
            "p50_ms": _median_or_none([s["p50_ms"] for s in ok]),
            "p99_ms": _median_or_none([s["p99_ms"] for s in ok]),
            "stalled_samples": sum(1 for s in ok if s.get("stalled")),
            "errors": sum(int(s["errors"]) for s in ok),
            "timeouts": sum(int(s["timeouts"]) for s in ok),
            "non_2xx": sum(int(s["non_2xx"]) for s in ok),
            "samples_rps": [round(s["rps"], 1) for s in ok],
            "attack": [s.get("attack") for s in ok if "attack" in s],
        }
    base, prot, ngx = results["no-attack"], results["attack-acceptfilter"], results["attack-nginx"]
    if "rps" in base and "rps" in prot:
        prot["ratio_to_no_attack"] = prot["rps"] / base["rps"] if base["rps"] else float("nan")
        tax = results.get("no-attack-acceptfilter", {})
        if "rps" in tax:
            tax["ratio_to_no_attack"] = tax["rps"] / base["rps"] if base["rps"] else float("nan")
        tax_paired, prot_paired = ratios.get("everyday_tax", {}), ratios.get("protected", {})
        out["goals"] = {
            "protected_ge_0.95_no_attack_zero_errors": prot_paired.get("ratio_median", 0) >= 0.95
            and prot["errors"] == 0 and prot_paired.get("errors_other") == 0,
            "everyday_tax_ge_0.97": tax_paired.get("ratio_median", 0) >= 0.97,
            "protected_ge_nginx_with_lower_p99": "rps" in ngx and prot["rps"] >= ngx["rps"]
            and prot["p99_ms"] is not None and ngx["p99_ms"] is not None and prot["p99_ms"] < ngx["p99_ms"],
        }
    out["results"] = results
    out["elapsed_s"] = round(time.monotonic() - t0, 1)
    return out


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--attack", action="store_true")
    p.add_argument("--port", type=int)
    p.add_argument("--idle", type=int, default=2000)
    p.add_argument("--slowloris", type=int, default=2000)
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--interval", type=float, default=2.0)
    a = p.parse_args()
    if a.attack:
        attack(a.port, a.idle, a.slowloris, a.seconds, a.interval)
