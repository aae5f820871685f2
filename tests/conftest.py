"""Shared fixtures: real listening sockets on loopback, parametrised over both I/O cores."""

from __future__ import annotations

import atexit
import ctypes
import http.server
import os
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterator

import pytest

# Every engine a test starts publishes its stats file (acceptfilter.statsfile) into a
# directory of this run, never the user's runtime directory, and often, so that tests of
# `acceptfilter stats`/`top`/metrics wait little. Subprocesses inherit both.
if "ACCEPTFILTER_RUNTIME_DIR" not in os.environ:
    os.environ["ACCEPTFILTER_RUNTIME_DIR"] = _RUNTIME_DIR = tempfile.mkdtemp(prefix="acceptfilter-test-run-")
    atexit.register(shutil.rmtree, _RUNTIME_DIR, True)
os.environ.setdefault("ACCEPTFILTER_STATS_INTERVAL", "0.1")


@pytest.fixture(params=["c", "python"])
def core(request: pytest.FixtureRequest) -> str:
    """Every engine-level test runs against the C core and the pure-Python reference."""
    return str(request.param)


@pytest.fixture
def listen_sock() -> Iterator[socket.socket]:
    sock = socket.create_server(("127.0.0.1", 0), backlog=512)
    yield sock
    sock.close()


def free_port() -> int:
    """A loopback TCP port free now, for a program that must be told one, outside the
    kernel's ephemeral range: a port taken from that range (bind to 0, then close) can be
    given to another test's outgoing connection before the program binds it."""
    import random

    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low, high = (int(x) for x in f.read().split())
    except (OSError, ValueError):
        low, high = 32768, 60999
    candidates = [p for p in range(10000, 65536) if not low <= p <= high]
    for _ in range(200):
        port = random.choice(candidates)
        probe = socket.socket()
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            continue
        finally:
            probe.close()
        return port
    raise AssertionError("no free loopback port outside the ephemeral range")


def open_fds() -> set[int]:
    """This process's open descriptors, after collecting garbage (so an earlier test's unreachable
    socket is closed now, not in the middle of the next comparison)."""
    import gc

    gc.collect()
    return {int(n) for n in os.listdir("/proc/self/fd")}


def wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    """Poll ``predicate`` until it holds; fail the test if it does not within ``timeout`` seconds."""
    import time

    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.01)


class QuietHandler(http.server.BaseHTTPRequestHandler):
    """A test HTTP handler that answers GET with :meth:`body` and logs nothing."""

    def body(self) -> bytes:
        return b"ok\n"

    def do_GET(self) -> None:
        body = self.body()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


PR_CAPBSET_DROP, CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH = 24, 1, 2


def drop_file_privilege() -> None:
    """A preexec_fn: the child (root here and in CI) execs without the capabilities that let root
    read, write and search any file or folder, so permission errors can be provoked as root."""
    if os.geteuid() == 0:
        libc = ctypes.CDLL(None, use_errno=True)
        for cap in (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH):
            if libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
                raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")
