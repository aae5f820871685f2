"""`acceptfilter serve` under attack (issue 14, item 7): no tracebacks, a status line that adds up.

A flood of hostile requests used to print a ``ValueError: embedded null byte``
traceback per ``GET /\\x00/`` (and give that client no answer) and a
``BrokenPipeError`` traceback per client that left mid-answer; the status line
built a netlink socket per refresh (failing at EMFILE) and lacked the terms of
the invariant.
"""

from __future__ import annotations

import re
import socket
import struct
import subprocess
import sys
import threading
from pathlib import Path

from acceptfilter.cli.serve import KernelQueue, status_line

from .conftest import wait_for


def _start(tmp_path: Path, *args: str) -> tuple[subprocess.Popen[str], int, list[str]]:
    (tmp_path / "big.bin").write_bytes(b"x" * 4_000_000)
    proc = subprocess.Popen([sys.executable, "-m", "acceptfilter.cli", "serve", "--port", "0", "--directory",
                             str(tmp_path), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stderr is not None
    banner = proc.stdout.readline()
    port = int(re.search(r"http://127\.0\.0\.1:(\d+)/", banner).group(1))  # type: ignore[union-attr]
    err: list[str] = []

    def read() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            err.append(line)

    threading.Thread(target=read, daemon=True).start()
    return proc, port, err


def _get(port: int, raw: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as c:
        c.sendall(raw)
        data = b""
        while chunk := c.recv(65536):
            data += chunk
    return data


def test_nul_in_the_path_and_clients_that_leave_give_no_traceback(tmp_path: Path) -> None:
    proc, port, err = _start(tmp_path, "--no-status")
    try:
        for _ in range(20):
            # A raw NUL never gets past httpready (a control byte in the request line);
            # percent-encoded, the handler decodes it and used to hit os.stat with it.
            assert _get(port, b"GET /%00/x HTTP/1.0\r\n\r\n").startswith(b"HTTP/1.0 400")
            assert _get(port, b"GET /a%00 HTTP/1.0\r\n\r\n").startswith(b"HTTP/1.0 400")
        for _ in range(20):  # ask for 4 MB and reset at once: the server's write fails
            c = socket.create_connection(("127.0.0.1", port), timeout=10)
            c.sendall(b"GET /big.bin HTTP/1.0\r\n\r\n")
            c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            c.close()
        assert _get(port, b"GET /big.bin HTTP/1.0\r\n\r\n").startswith(b"HTTP/1.0 200")
        wait_for(lambda: sum(' "GET /big.bin HTTP/1.0" 200' in line for line in err) >= 1, timeout=10)
    finally:
        proc.terminate()
        proc.wait(10)
    text = "".join(err)
    assert "Traceback" not in text and "embedded null byte" not in text, text[-2000:]


def test_status_line_carries_every_term_of_the_invariant(tmp_path: Path) -> None:
    proc, port, err = _start(tmp_path, "--timeout", "0.3", "--status-interval", "0.1")
    try:
        idle = socket.create_connection(("127.0.0.1", port))  # partial: answered 408 and closed at the deadline
        idle.sendall(b"GET / HT")
        socket.create_connection(("127.0.0.1", port)).close()  # closed empty
        with socket.create_connection(("127.0.0.1", port)) as bad:
            bad.sendall(b"\x00")  # rejected
        assert _get(port, b"GET / HTTP/1.0\r\n\r\n").startswith(b"HTTP/1.0 200")  # surfaced
        pattern = re.compile(r"status: accepted (\d+) = held (\d+) \+ surfaced (\d+) \+ rejected (\d+) "
                             r"\+ closed empty (\d+) \+ failed (\d+) \+ dropped (\d+) \+ detached \d+  timed out (\d+)  "
                             r"evicted (\d+)"
                             r"  kernel queue (\d+)/(\d+)")

        def settled() -> bool:
            for line in reversed(err):
                m = pattern.match(line)
                if m:
                    n = [int(g) for g in m.groups()]
                    return n[0] == 4 and n[7] == 1 and n[3] == 1 and n[4] == 1 and n[2] == 1 and n[6] == 1
            return False

        wait_for(settled, timeout=15)
        m = next(pattern.match(line) for line in reversed(err) if pattern.match(line))
        n = [int(g) for g in m.groups()]  # type: ignore[union-attr]
        assert n[0] == sum(n[1:7])
        assert n[10] == 1024  # the backlog, from TCP_INFO
        idle.close()
    finally:
        proc.terminate()
        proc.wait(10)


def test_kernel_queue_reads_the_accept_queue_without_netlink() -> None:
    with socket.create_server(("127.0.0.1", 0), backlog=16) as ls:
        queue = KernelQueue(ls)
        assert queue.read() == (0, 16)
        clients = [socket.create_connection(ls.getsockname()) for _ in range(3)]
        wait_for(lambda: queue.read() == (3, 16))
        for c in clients:
            c.close()
    assert "kernel queue ?" in status_line({k: 0 for k in ("accepted", "held", "surfaced", "rejected", "closed_empty",
                                                          "failed", "dropped", "detached", "timed_out", "evicted")}, None)


def test_evicted_connections_are_closed_not_handed_to_handler_threads(tmp_path: Path) -> None:
    """More idle clients than --max-held: the oldest are evicted with the default policy (close), legit ones served."""
    proc, port, err = _start(tmp_path, "--max-held", "20", "--timeout", "30", "--status-interval", "0.2")
    idle: list[socket.socket] = []
    try:
        idle = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(60)]
        for _ in range(5):
            assert _get(port, b"GET / HTTP/1.0\r\n\r\n").startswith(b"HTTP/1.0 200")
        closed = 0
        for s in idle[:40]:  # the 40 oldest were evicted: each got a FIN
            s.settimeout(10)
            closed += s.recv(10) == b""
        assert closed == 40
        wait_for(lambda: any(re.search(r"evicted (\d+)", line) and int(re.search(r"evicted (\d+)", line).group(1)) >= 40
                             for line in err), timeout=10)
        # Only the five legit requests reached http.server (one log line each).
        assert sum('"GET / HTTP/1.0" 200' in line for line in err) == 5
    finally:
        for s in idle:
            s.close()
        proc.terminate()
        proc.wait(10)
