"""`acceptfilter serve` under attack (issue 14, item 7): no tracebacks, a status line that adds up.

A flood of hostile requests used to print a ``ValueError: embedded null byte``
traceback per ``GET /\\x00/`` (and give that client no answer) and a
``BrokenPipeError`` traceback per client that left mid-answer; the status line
built a netlink socket per refresh (failing at EMFILE) and lacked the terms of
the invariant.
"""

from __future__ import annotations

import re
import resource
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

from acceptfilter.cli.serve import KernelQueue, status_line

from .conftest import wait_for


def _start(tmp_path: Path, *args: str, fd_limit: int | None = None) -> tuple[subprocess.Popen[str], int, list[str]]:
    (tmp_path / "big.bin").write_bytes(b"x" * 4_000_000)

    def limit() -> None:
        if fd_limit is not None:  # as `ulimit -n` would, in the child only
            resource.setrlimit(resource.RLIMIT_NOFILE, (fd_limit, fd_limit))

    proc = subprocess.Popen([sys.executable, "-m", "acceptfilter.cli", "serve", "--port", "0", "--directory",
                             str(tmp_path), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=limit)
    assert proc.stdout is not None and proc.stderr is not None
    banner = proc.stdout.readline()
    while banner.startswith("route "):  # "route NAME: ... forwarded to ..." lines come first
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
                             r"\+ closed empty (\d+) \+ aborted (\d+) \+ failed (\d+) \+ dropped (\d+) \+ detached \d+  timed out (\d+)  "
                             r"evicted (\d+)"
                             r"  kernel queue (\d+)/(\d+)")

        def settled() -> bool:
            for line in reversed(err):
                m = pattern.match(line)
                if m:
                    n = [int(g) for g in m.groups()]
                    return n[0] == 4 and n[8] == 1 and n[3] == 1 and n[4] == 1 and n[2] == 1 and n[7] == 1
            return False

        wait_for(settled, timeout=15)
        m = next(pattern.match(line) for line in reversed(err) if pattern.match(line))
        n = [int(g) for g in m.groups()]  # type: ignore[union-attr]
        assert n[0] == sum(n[1:8])
        assert n[11] == 1024  # the backlog, from TCP_INFO
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
                                                          "aborted", "failed", "dropped", "detached", "timed_out",
                                                          "evicted")}, None)


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


REPLY_408 = b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"


def _until_close(sock: socket.socket) -> bytes:
    sock.settimeout(10)
    got = b""
    try:
        while chunk := sock.recv(4096):
            got += chunk
    except ConnectionResetError:
        pass
    return got


def test_serve_answers_a_slow_head_408_and_keeps_idle_connections(tmp_path: Path) -> None:
    """Issue 23: the partial deadline gets 408 + FIN; an idle connection outlives it and is served when used."""
    backend = socket.create_server(("127.0.0.1", 0))  # the relay route's backend: never reached here
    proc, port, err = _start(tmp_path, "--timeout", "0.3", "--route", "http=httpready", "--route", "dns=dnsready",
                             "--forward", f"dns=127.0.0.1:{backend.getsockname()[1]}")
    try:
        idle = socket.create_connection(("127.0.0.1", port), timeout=10)
        slow = socket.create_connection(("127.0.0.1", port), timeout=10)
        slow.sendall(b"GET /big.bin HTTP/1.1\r\n")
        dns = socket.create_connection(("127.0.0.1", port), timeout=10)
        dns.sendall(b"\x00\x30\xab\xcd\x01")  # a DNS query under way, for the relay route
        assert _until_close(slow) == REPLY_408
        assert _until_close(dns) == b""  # not an HTTP route: the FIN alone
        time.sleep(0.5)  # past the deadline again
        idle.sendall(b"GET / HTTP/1.0\r\n\r\n")
        assert _until_close(idle).startswith(b"HTTP/1.0 200")
        for s in (idle, slow, dns):
            s.close()
        assert not any("Traceback" in line for line in err)
    finally:
        proc.terminate()
        proc.wait(10)
        backend.close()


def test_serve_banner_names_both_budgets_and_the_fd_bound(tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "acceptfilter.cli", "serve", "--port", "0", "--directory",
                             str(tmp_path), "--no-status"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256)))
    try:
        assert proc.stdout is not None
        banner = proc.stdout.readline()
        assert "deadline 5 s, idle limit 620 s, on timeout: close, max held 192," in banner, banner
    finally:
        proc.terminate()
        proc.wait(10)


def test_serve_at_ulimit_256_with_150_idle_and_150_partial_keeps_answering(tmp_path: Path) -> None:
    """Issue 23, item 2: held connections are bounded by what the process can afford (fd limit less
    headroom), idle ones evicted first: new requests are answered, no 404, no traceback."""
    (tmp_path / "file.txt").write_text("here\n")
    # -v: one line per evicted connection, with its client port and the bytes the server had seen of it.
    proc, port, err = _start(tmp_path, "-v", "--timeout", "60", "--status-interval", "0.2", fd_limit=256)
    held: list[socket.socket] = []
    try:
        for i in range(300):
            c = socket.create_connection(("127.0.0.1", port), timeout=10)
            if i % 2:
                c.sendall(b"GET /file.txt HTTP/1.1\r\nHost: x\r\n")  # partial: 150 slowloris heads
            held.append(c)
        for _ in range(20):
            reply = _get(port, b"GET /file.txt HTTP/1.0\r\n\r\n")
            assert reply.startswith(b"HTTP/1.0 200") and reply.endswith(b"here\n"), reply[:200]
        pattern = re.compile(r"accepted (\d+) = held (\d+) .* evicted (\d+)")

        def bounded() -> bool:
            for line in reversed(err):
                m = pattern.search(line)
                if m:
                    return int(m.group(1)) >= 320 and int(m.group(2)) <= 192 and int(m.group(3)) >= 108
            return False

        wait_for(bounded, timeout=15)
        evicted = {int(m.group(1)): int(m.group(2)) for line in err
                   if (m := re.search(r"evicted client=127\.0\.0\.1:(\d+) reason=evicted bytes=(\d+)", line))}
        # Idle ones made the room: the server evicted no connection it had seen bytes from.
        assert len(evicted) >= 108 and set(evicted.values()) == {0}, sorted(evicted.items())[:20]
        dead: dict[int, str] = {}
        for c in held[1::2]:  # the partial ones
            c.settimeout(0.05)
            client_port = c.getsockname()[1]
            try:
                if c.recv(1, socket.MSG_PEEK) == b"":
                    dead[client_port] = "closed"
            except TimeoutError:
                pass  # alive, still held
            except ConnectionResetError:
                dead[client_port] = "reset"
        # A partial one can be closed only as idle: on a loaded machine loopback can deliver its bytes after
        # later handshakes (softirq work deferred on another core), and the server evicted it before they came.
        # Each such one must be in the eviction lines with 0 bytes; any other closed partial one is a bug.
        unexplained = {p: how for p, how in dead.items() if p not in evicted}
        assert not unexplained, (unexplained, "".join(line for line in err if "status" not in line)[-3000:])
        assert len(dead) <= 2, dead  # the rest (148 and more) is still held
        assert not any("Traceback" in line or " 404 " in line for line in err), "".join(err[-20:])
    finally:
        for c in held:
            c.close()
        proc.terminate()
        proc.wait(10)
