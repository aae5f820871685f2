"""The relay's C event loop (csrc/afloop.c, ``acceptfilter.relay.RelayLoop``): real sockets on loopback.

One loop relays every connection: many at once, half-close each way, a
backend or a client that resets, a client that reads slowly (backpressure:
bytes intact, memory bounded), the backend's connect failing or timing out,
the log line per connection, and a shutdown that closes every fd and ends the
loop's threads. Both byte movers (``copy``: recv/send, ``splice``: pipes)
run every test. Waits are generous: the suite runs on a loaded 2-core machine.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import struct
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from acceptfilter.relay import Forward, RelayLoop, _lib, _Tally

from .conftest import open_fds, wait_for

pytestmark = pytest.mark.skipif(_lib is None, reason="the C relay (acceptfilter._relay) is not built")

LONG = 30.0  # seconds: a condition that fails only if the relay is broken, even on a loaded machine


@pytest.fixture(params=["copy", "splice"])
def loop(request: pytest.FixtureRequest) -> Iterator[RelayLoop]:
    lp = RelayLoop(request.param)
    try:
        yield lp
    finally:
        lp.close()


class Relayed:
    """One connection through the loop: the test holds the client and the backend's accepted end."""

    def __init__(self, loop: RelayLoop, back: socket.socket, *, route: str = "t", send_proxy: int | None = None,
                 accept: bool = True) -> None:
        front = socket.create_server(("127.0.0.1", 0))
        self.client = socket.create_connection(front.getsockname(), timeout=LONG)
        client_end, address = front.accept()
        front.close()
        self.address = address
        self.ended = threading.Event()
        self.tally: _Tally | None = None
        loop.relay(client_end, address, None, Forward(back.getsockname(), send_proxy), route, self._done)
        self.backend: socket.socket | None = None
        if accept:
            self.backend, _ = back.accept()
            self.backend.settimeout(LONG)

    def _done(self, tally: _Tally) -> None:
        self.tally = tally
        self.ended.set()

    def wait(self) -> _Tally:
        assert self.ended.wait(LONG), "the relay did not end the connection"
        assert self.tally is not None
        return self.tally

    def close(self) -> None:
        self.client.close()
        if self.backend is not None:
            self.backend.close()


def read_all(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(1 << 16):
        chunks.append(chunk)
    return b"".join(chunks)


@pytest.fixture
def back() -> Iterator[socket.socket]:
    sock = socket.create_server(("127.0.0.1", 0), backlog=512)
    sock.settimeout(LONG)
    yield sock
    sock.close()


def test_many_concurrent_connections_through_one_loop_no_thread_each(loop: RelayLoop, back: socket.socket) -> None:
    """200 connections at once, each its own bytes both ways; the process gains no thread per connection."""
    threads_before = threading.active_count()
    pairs = [Relayed(loop, back) for _ in range(200)]
    try:
        assert threading.active_count() == threads_before
        wait_for(lambda: loop.stats()["live"] == 200, timeout=LONG)
        for i, p in enumerate(pairs):  # all sent before any is read: they are in flight together
            p.client.sendall(f"request {i} ".encode() * 50)
        for i, p in enumerate(pairs):
            assert p.backend is not None
            want = f"request {i} ".encode() * 50
            got = b""
            while len(got) < len(want):
                got += p.backend.recv(1 << 16)
            assert got == want
            p.backend.sendall(f"answer {i}".encode())
        for i, p in enumerate(pairs):
            got = b""
            while len(got) < len(f"answer {i}"):
                got += p.client.recv(100)
            assert got == f"answer {i}".encode()
        for p in pairs:
            p.close()
        for i, p in enumerate(pairs):
            tally = p.wait()
            assert (tally.up, tally.down, tally.errors) == (len(f"request {i} ") * 50, len(f"answer {i}"), [])
        wait_for(lambda: loop.stats()["live"] == 0, timeout=LONG)
    finally:
        for p in pairs:
            p.close()


def test_client_half_close_is_passed_on_and_the_answer_still_comes_back(loop: RelayLoop, back: socket.socket) -> None:
    p = Relayed(loop, back)
    assert p.backend is not None
    try:
        p.client.sendall(b"x" * 300_000)  # more than one buffer's or pipe's worth
        p.client.shutdown(socket.SHUT_WR)
        assert read_all(p.backend) == b"x" * 300_000  # ends: the relay shut the backend's side down
        p.backend.sendall(b"answer after the half-close")
        p.backend.shutdown(socket.SHUT_WR)
        assert read_all(p.client) == b"answer after the half-close"
        tally = p.wait()
        assert (tally.up, tally.down, tally.errors) == (300_000, len(b"answer after the half-close"), [])
    finally:
        p.close()


def test_backend_half_close_is_passed_on_and_the_client_may_still_send(loop: RelayLoop, back: socket.socket) -> None:
    p = Relayed(loop, back)
    assert p.backend is not None
    try:
        p.client.sendall(b"hello")
        assert p.backend.recv(100) == b"hello"
        p.backend.sendall(b"banner and goodbye")
        p.backend.shutdown(socket.SHUT_WR)
        assert read_all(p.client) == b"banner and goodbye"
        assert not p.ended.is_set()  # one direction is still open
        p.client.sendall(b"y" * 200_000)
        p.client.shutdown(socket.SHUT_WR)
        assert read_all(p.backend) == b"y" * 200_000
        tally = p.wait()
        assert (tally.up, tally.down, tally.errors) == (200_005, len(b"banner and goodbye"), [])
    finally:
        p.close()


def _reset(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def test_a_backend_that_resets_ends_both_ways(loop: RelayLoop, back: socket.socket) -> None:
    p = Relayed(loop, back)
    assert p.backend is not None
    try:
        p.client.sendall(b"partial")
        assert p.backend.recv(100) == b"partial"
        _reset(p.backend)
        p.backend = None
        tally = p.wait()
        assert tally.errors and tally.errors[0].startswith("backend: "), tally.errors
        with _either_eof_or_reset():
            assert p.client.recv(100) == b""  # the client is closed too
    finally:
        p.close()


class _either_eof_or_reset:
    """``recv`` on a socket the relay closed: EOF, or a reset if the relay had unread bytes."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: Any, exc: Any, tb: Any) -> bool:
        return kind is None or issubclass(kind, ConnectionResetError)


def test_a_client_that_resets_ends_both_ways(loop: RelayLoop, back: socket.socket) -> None:
    p = Relayed(loop, back)
    assert p.backend is not None
    try:
        p.client.sendall(b"partial")
        assert p.backend.recv(100) == b"partial"
        _reset(p.client)
        tally = p.wait()
        assert tally.errors and tally.errors[0].startswith("client: "), tally.errors
        with _either_eof_or_reset():
            assert p.backend.recv(100) == b""
    finally:
        p.close()


def test_a_reset_ends_the_connection_even_while_the_other_way_is_blocked(loop: RelayLoop, back: socket.socket) -> None:
    """The client reads nothing; the backend's bytes pile up in the relay; then the backend resets."""
    p = Relayed(loop, back)
    assert p.backend is not None
    try:
        p.client.sendall(b"go")
        assert p.backend.recv(100) == b"go"
        p.backend.setblocking(False)
        sent = 0
        deadline = time.monotonic() + LONG
        while time.monotonic() < deadline:  # until every buffer on the way is full
            try:
                sent += p.backend.send(b"z" * 65536)
            except BlockingIOError:
                time.sleep(0.2)
                try:
                    sent += p.backend.send(b"z" * 65536)
                except BlockingIOError:
                    break
        assert sent > 0
        _reset(p.backend)
        p.backend = None
        tally = p.wait()
        assert tally.errors and tally.errors[0].startswith("backend: "), tally.errors
    finally:
        p.close()


def test_a_slow_reader_gets_every_byte_and_the_relay_buffers_at_most_a_chunk(loop: RelayLoop, back: socket.socket) -> None:
    """Backpressure: 32 MiB to a client that reads slowly at first; memory in the relay stays bounded."""
    size = 32 << 20
    p = Relayed(loop, back)
    assert p.backend is not None
    payload = hashlib.sha256(b"seed").digest() * (size // 32)
    backend = p.backend

    def send() -> None:
        backend.sendall(payload)
        backend.shutdown(socket.SHUT_WR)

    sender = threading.Thread(target=send)
    try:
        p.client.sendall(b"GET")
        assert backend.recv(10) == b"GET"
        sender.start()
        # The client reads nothing yet: every buffer on the way fills, then the relay holds a partial chunk.
        wait_for(lambda: loop.stats()["buffered"] > 0, timeout=LONG)
        peak = 0
        got = hashlib.sha256()
        count = 0
        for _ in range(100):  # slowly: 100 small reads with pauses, while the sender is far ahead
            chunk = p.client.recv(4096)
            got.update(chunk)
            count += len(chunk)
            peak = max(peak, loop.stats()["buffered"])
            time.sleep(0.005)
        while chunk := p.client.recv(1 << 20):
            got.update(chunk)
            count += len(chunk)
            peak = max(peak, loop.stats()["buffered"])
        sender.join(LONG)
        assert count == size and got.digest() == hashlib.sha256(payload).digest()
        assert 0 < peak <= 65536, peak  # one chunk (or one pipe) for the blocked direction, not the 32 MiB
        p.client.close()
        tally = p.wait()
        assert (tally.up, tally.down, tally.errors) == (3, size, [])
        assert loop.stats()["buffered"] == 0
    finally:
        p.close()


def test_the_backend_refusing_closes_the_client_and_says_why(loop: RelayLoop, caplog: pytest.LogCaptureFixture) -> None:
    closed = socket.create_server(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # nothing listens there now
    front = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(front.getsockname(), timeout=LONG)
    client_end, address = front.accept()
    front.close()
    ended: list[_Tally] = []
    with caplog.at_level(logging.INFO, logger="acceptfilter.relay"):
        loop.relay(client_end, address, None, Forward(("127.0.0.1", port)), "t", ended.append)
        wait_for(lambda: bool(ended), timeout=LONG)
        with _either_eof_or_reset():
            assert client.recv(100) == b""
    client.close()
    assert ended[0].errors and ended[0].errors[0].startswith("connect: "), ended[0].errors
    assert "Connection refused" in ended[0].errors[0]
    assert any("cannot reach backend" in r.getMessage() and "Connection refused" in r.getMessage()
               for r in caplog.records)


def test_a_backend_that_never_answers_the_connect_times_out(loop: RelayLoop) -> None:
    """A backend whose accept queue is full drops the SYN: the loop's connect deadline ends it."""
    full = socket.socket()
    full.bind(("127.0.0.1", 0))
    full.listen(0)
    fillers = []
    for _ in range(4):  # fill the queue; later connects stay in SYN_SENT
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(full.getsockname())
        fillers.append(s)
    time.sleep(0.2)
    front = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(front.getsockname(), timeout=LONG)
    client_end, address = front.accept()
    front.close()
    ended: list[_Tally] = []
    try:
        started = time.monotonic()
        loop.relay(client_end, address, None, Forward(full.getsockname(), connect_timeout=0.5), "t", ended.append)
        wait_for(lambda: bool(ended), timeout=LONG)
        assert ended[0].errors and ended[0].errors[0].startswith("connect: "), ended[0].errors
        if "timed out" in ended[0].errors[0]:
            assert time.monotonic() - started >= 0.45
        assert loop.stats()["connecting"] == 0
    finally:
        for s in (client, full, *fillers):
            s.close()


def _full_backlog() -> tuple[socket.socket, list[socket.socket]]:
    """A listener whose accept queue is full: the kernel drops further SYNs, so a connect to it hangs."""
    full = socket.socket()
    full.bind(("127.0.0.1", 0))
    full.listen(0)
    fillers = []
    for _ in range(4):
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(full.getsockname())
        fillers.append(s)
    wait_for(lambda: all(f.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0 for f in fillers[:1]), timeout=LONG)
    return full, fillers


class _Busy:
    """A relayed connection kept busy both ways by two threads each way: a sender that never stops
    and a reader that drains, so the loop always has more to move than one turn's budget."""

    CHUNK = b"x" * (1 << 18)

    def __init__(self, loop: RelayLoop, back: socket.socket, stop: threading.Event) -> None:
        self.pair = Relayed(loop, back)
        self.stop = stop
        assert self.pair.backend is not None
        self.threads = [threading.Thread(target=self._send, args=(self.pair.client,), daemon=True),
                        threading.Thread(target=self._send, args=(self.pair.backend,), daemon=True),
                        threading.Thread(target=self._drain, args=(self.pair.client,), daemon=True),
                        threading.Thread(target=self._drain, args=(self.pair.backend,), daemon=True)]
        self.moved = 0
        for t in self.threads:
            t.start()

    def _send(self, sock: socket.socket) -> None:
        try:
            while not self.stop.is_set():
                sock.sendall(self.CHUNK)
        except OSError:
            pass

    def _drain(self, sock: socket.socket) -> None:
        buf = bytearray(1 << 18)
        try:
            while not self.stop.is_set():
                self.moved += sock.recv_into(buf)
        except OSError:
            pass

    def close(self) -> None:
        self.pair.close()  # ends the threads' blocked calls
        for t in self.threads:
            t.join(LONG)


def test_a_hung_connect_times_out_while_other_connections_are_busy(loop: RelayLoop, back: socket.socket) -> None:
    """Issue 24 item 2: connect deadlines were looked at only when no connection had more to move, so
    with busy connections a hung connect was never reported. Deadlines are checked on every turn."""
    full, fillers = _full_backlog()
    stop = threading.Event()
    busy = [_Busy(loop, back, stop) for _ in range(12)]
    try:
        wait_for(lambda: all(b.moved > 4 * len(_Busy.CHUNK) for b in busy), timeout=LONG)  # all of them flowing
        front = socket.create_server(("127.0.0.1", 0))
        client = socket.create_connection(front.getsockname(), timeout=LONG)
        client_end, address = front.accept()
        front.close()
        ended: list[_Tally] = []
        started = time.monotonic()
        loop.relay(client_end, address, None, Forward(full.getsockname(), connect_timeout=0.5), "t", ended.append)
        # The deadline is 0.5 s; 10 s allows for a loaded machine (before the fix: never, while busy).
        wait_for(lambda: bool(ended) or time.monotonic() - started > 10, timeout=LONG)
        still_busy = all(t.is_alive() for b in busy for t in b.threads)
        assert ended, "the hung connect was not reported within 10 s while 12 connections were busy"
        assert ended[0].errors == ["connect: Connection timed out"], ended[0].errors
        assert still_busy  # the others were busy all along, and are not disturbed
        client.close()
    finally:
        stop.set()
        for b in busy:
            b.close()
        for s in (full, *fillers):
            s.close()


def test_the_proxy_header_goes_first_even_when_the_client_spoke_before_the_connect(loop: RelayLoop,
                                                                                    back: socket.socket) -> None:
    p = Relayed(loop, back, send_proxy=1, accept=False)
    try:
        p.client.sendall(b"early bytes")  # in the relay's socket before the backend even accepted
        backend, _ = back.accept()
        p.backend = backend
        backend.settimeout(LONG)
        host, port = p.client.getsockname()[:2]
        want = f"PROXY TCP4 {host} 127.0.0.1 {port} {p.client.getpeername()[1]}\r\n"
        got = b""
        while len(got) < len(want) + len(b"early bytes"):
            got += backend.recv(100)
        assert got == want.encode() + b"early bytes"
        p.close()
        tally = p.wait()
        assert tally.up == len(b"early bytes")  # the header is not the client's bytes
    finally:
        p.close()


def test_one_log_line_per_connection(loop: RelayLoop, back: socket.socket, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="acceptfilter.relay"):
        p = Relayed(loop, back, route="web")
        assert p.backend is not None
        p.client.sendall(b"12345")
        assert p.backend.recv(10) == b"12345"
        p.backend.sendall(b"abc")
        assert p.client.recv(10) == b"abc"
        p.close()
        p.wait()
        wait_for(lambda: any("forwarded" in r.getMessage() for r in caplog.records), timeout=LONG)
    lines = [r.getMessage() for r in caplog.records if "forwarded" in r.getMessage()]
    host, port = p.address[:2]
    b_host, b_port = back.getsockname()[:2]
    assert len(lines) == 1
    assert lines[0].startswith(f"forwarded route=web client={host}:{port} backend={b_host}:{b_port} reason= "
                               f"up=5 down=3 seconds="), lines[0]


def test_closing_the_loop_closes_every_fd_and_ends_its_threads(back: socket.socket,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    """Connections in the middle of a relay when the loop stops: closed, logged, no fd left, no thread left."""
    before = open_fds()
    names_before = {t.name for t in threading.enumerate()}
    lp = RelayLoop("splice")  # the mode with the most fds (two pipes per connection)
    pairs = [Relayed(lp, back) for _ in range(20)]
    with caplog.at_level(logging.INFO, logger="acceptfilter.relay"):
        for p in pairs:
            p.client.sendall(b"ping")
            assert p.backend is not None and p.backend.recv(10) == b"ping"
        assert lp.stats()["pipes"] == 20
        lp.close()
        for p in pairs:
            with _either_eof_or_reset():
                assert p.client.recv(10) == b""
            assert p.wait().errors == ["relay stopped"]
    lp.close()  # idempotent
    for p in pairs:
        p.close()
    assert sum("relay stopped" in r.getMessage() for r in caplog.records) == 20
    assert {t.name for t in threading.enumerate()} - names_before == set()
    # Nothing new left open. (Not equality: another test's garbage socket may be collected meanwhile.)
    assert open_fds() - before == set(), sorted(open_fds() - before)


def test_forward_stops_the_shared_loop_when_the_listener_closes() -> None:
    """Through the public path (wrap + forward): closing the listener ends the accept thread, the loop and its fds."""
    import acceptfilter
    from acceptfilter import relay

    backend = socket.create_server(("127.0.0.1", 0))
    backend.settimeout(LONG)
    before = open_fds()
    sock = socket.create_server(("127.0.0.1", 0))
    listener = acceptfilter.wrap(sock, "dataready", timeout=5)
    thread = relay.forward(listener, backend.getsockname())
    clients = []
    accepted = []
    try:
        for i in range(5):
            c = socket.create_connection(sock.getsockname(), timeout=LONG)
            c.sendall(f"hello {i}".encode())
            clients.append(c)
            conn, _ = backend.accept()
            conn.settimeout(LONG)
            accepted.append(conn)
            assert conn.recv(100) == f"hello {i}".encode()
        stats = relay.loop_stats()
        assert stats is not None and stats["live"] == 5
        listener.close()
        thread.join(LONG)
        assert not thread.is_alive()
        assert relay.loop_stats() is None
        for c in clients:
            with _either_eof_or_reset():
                assert c.recv(10) == b""
        assert not any(t.name.startswith("acceptfilter-relay") for t in threading.enumerate())
    finally:
        for s in (*clients, *accepted):
            s.close()
        listener.close()
    after = open_fds()
    backend.close()
    assert after - before == set(), sorted(after - before)


def test_a_relay_call_after_close_leaves_the_fds_to_nobody(back: socket.socket) -> None:
    """The loop stopped: ``relay`` closes the client itself and reports, nothing leaks."""
    lp = RelayLoop()
    lp.close()
    before = open_fds()
    front = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(front.getsockname(), timeout=LONG)
    client_end, address = front.accept()
    front.close()
    ended: list[_Tally] = []
    with pytest.raises(RuntimeError):
        lp.relay(client_end, address, None, Forward(back.getsockname()), "t", ended.append)
    client_end.close()
    client.close()
    assert open_fds() - before == set(), sorted(open_fds() - before)  # nothing new left open
    assert not ended


@pytest.mark.slow
def test_asan_ubsan_build_runs_the_relay_tests_clean(tmp_path: Any) -> None:
    """csrc/afloop.c and csrc/afrelay.c built with AddressSanitizer + UBSan (scripts/sanitize.sh), these tests on it."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = subprocess.run(["bash", str(root / "scripts" / "sanitize.sh"), "-q", "-x", "-p", "no:cacheprovider",
                          "tests/test_relay_loop.py", "tests/test_relay.py", "-k", "not asan"],
                         cwd=root, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "AF_SANITIZE_DIR": str(tmp_path), "PYTHON": sys.executable})
    tail = (out.stdout + out.stderr)[-3000:]
    assert out.returncode == 0, tail
    assert f"sanitized relay: {tmp_path}" in out.stdout, tail
    assert "ERROR: AddressSanitizer" not in out.stderr and "runtime error:" not in out.stderr, tail
    assert " passed" in out.stdout, tail


@pytest.mark.parametrize("source", ["afloop.c", "afrelay.c"])
@pytest.mark.parametrize("flags", [["-O2"], ["-O1", "-g"]], ids=["O2", "O1"])
def test_relay_c_compiles_without_warnings(tmp_path: Any, source: str, flags: list[str]) -> None:
    import shutil
    import subprocess
    from pathlib import Path

    if shutil.which("cc") is None:
        pytest.skip("no C compiler (cc) on PATH")
    csrc = Path(__file__).resolve().parents[1] / "csrc"
    out = subprocess.run(["cc", "-std=gnu11", "-pthread", *flags, "-Wall", "-Wextra", "-Werror", "-I", str(csrc), "-c",
                          str(csrc / source), "-o", str(tmp_path / "out.o")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def _send_with_urgent(sock: socket.socket, prefix: bytes) -> bytes:
    """``prefix`` + AB, an urgent C, DEF, then a FIN: what the other side must get, byte for byte."""
    sock.sendall(prefix + b"AB")
    sock.send(b"C", socket.MSG_OOB)
    sock.sendall(b"DEF")
    sock.shutdown(socket.SHUT_WR)
    return prefix + b"ABCDEF"


@pytest.mark.parametrize("pump", ["c-copy", "c-splice", "thread", "splice", "copy"])
def test_urgent_bytes_pass_through_every_pump_in_place(pump: str, back: socket.socket,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 24 item 3: a TCP urgent byte stalled a relayed connection (copy: the short read at the
    mark looked like "drained"; splice: DEF and the FIN never came; the thread pump spun at 100 %
    CPU). Every pump now relays 256 KiB + AB + urgent C + DEF + FIN each way, in order, and idles."""
    from acceptfilter import relay as relay_mod

    front = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(front.getsockname(), timeout=LONG)
    client_end, address = front.accept()
    front.close()
    loop: RelayLoop | None = None
    runner: threading.Thread | None = None
    if pump.startswith("c-"):
        loop = RelayLoop(pump.removeprefix("c-"))
        loop.relay(client_end, address, None, Forward(back.getsockname()), "t")
    else:
        monkeypatch.setattr(relay_mod, "PUMP", pump)
        runner = threading.Thread(target=relay_mod._thread_relay,
                                  args=(client_end, address, None, Forward(back.getsockname()), "t"), daemon=True)
        runner.start()
    backend, _ = back.accept()
    backend.settimeout(LONG)
    try:
        up = _send_with_urgent(client, b"u" * (1 << 18))
        assert read_all(backend) == up  # the urgent byte in place, then the FIN
        down = _send_with_urgent(backend, b"d" * (1 << 18))
        cpu = time.process_time()
        got = read_all(client)
        assert got == down
        time.sleep(0.5)  # everything relayed: nothing may spin now
        assert time.process_time() - cpu < 0.4, "the relay kept a CPU busy after the bytes were through"
    finally:
        client.close()
        backend.close()
        if loop is not None:
            loop.close()
        if runner is not None:
            runner.join(LONG)
