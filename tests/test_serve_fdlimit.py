"""`acceptfilter serve` when the file system fails (issue 24, item 7): never a wrong answer, never a traceback.

At the fd limit the handler's ``open()`` failed with EMFILE and http.server
answered ``404 File not found`` for a file that exists; ``mimetypes`` loading
its tables at the limit printed a traceback. Now ENOENT/ENOTDIR is 404, EACCES
403, and any other ``OSError`` (EMFILE, ENFILE, EIO...) a 503 with one log line.
The limit is reached for real: a low ``RLIMIT_NOFILE`` and held connections
that take every descriptor but one, so the request's own socket takes the last.
"""

from __future__ import annotations

import os
import re
import resource
import socket
import subprocess
import sys
import threading
from pathlib import Path

from .conftest import drop_file_privilege, wait_for

LIMIT = 64


def _start(directory: Path, limit: int | None = None, *args: str) -> tuple[subprocess.Popen[str], int, list[str]]:
    def lower() -> None:
        drop_file_privilege()  # root could read a mode-0 file: the 403 test needs EACCES
        if limit is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))

    proc = subprocess.Popen([sys.executable, "-m", "acceptfilter.cli", "serve", "--port", "0", "--status-interval", "0.1",
                             "--max-held", "1000", "--timeout", "120", "--directory", str(directory), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=lower)
    assert proc.stdout is not None
    banner = proc.stdout.readline()
    match = re.search(r"http://127\.0\.0\.1:(\d+)/", banner)
    assert match, banner
    err: list[str] = []

    def read() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            err.append(line)

    threading.Thread(target=read, daemon=True).start()
    return proc, int(match.group(1)), err


def _open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _held(err: list[str]) -> int:
    """The held count of the last status line (stderr is not a terminal: one plain line each)."""
    for line in reversed(err):
        match = re.search(r"= held (\d+) ", line)
        if match:
            return int(match.group(1))
    return -1


def _exchange(conn: socket.socket, raw: bytes) -> bytes:
    conn.sendall(raw)
    data = b""
    while chunk := conn.recv(65536):
        data += chunk
    return data


def _get(port: int, path: str) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as c:
        return _exchange(c, f"GET {path} HTTP/1.0\r\n\r\n".encode())


def test_at_the_fd_limit_an_existing_file_is_503_not_404_and_nothing_prints_a_traceback(tmp_path: Path) -> None:
    (tmp_path / "hello.txt").write_text("hello\n")
    proc, port, err = _start(tmp_path, LIMIT)
    held: list[socket.socket] = []
    try:
        # Take every descriptor but one with idle connections the server holds (its status line counts them);
        # the first request comes at the limit, so mimetypes would load its tables there.
        while _open_fds(proc.pid) < LIMIT - 1:
            held.append(socket.create_connection(("127.0.0.1", port), timeout=30))
            wait_for(lambda: _held(err) == len(held), 30)
        assert _open_fds(proc.pid) == LIMIT - 1
        with socket.create_connection(("127.0.0.1", port), timeout=30) as last:  # its socket is the last fd
            reply = _exchange(last, b"GET /hello.txt HTTP/1.0\r\n\r\n")
        assert reply.startswith(b"HTTP/1.0 503 "), reply[:200]
        assert b"hello" not in reply
        wait_for(lambda: any("503" in line and "hello.txt" in line for line in err), 30)
        held.pop().close()  # one fd back: the same file is served again
        wait_for(lambda: _open_fds(proc.pid) < LIMIT - 1, 30)
        assert _get(port, "/hello.txt").endswith(b"hello\n")
        assert _get(port, "/missing.txt").startswith(b"HTTP/1.0 404 ")
    finally:
        for c in held:
            c.close()
        proc.terminate()
        proc.wait(20)
    text = "".join(err)
    assert "Traceback" not in text, text[-3000:]
    lines = [line for line in err if "hello.txt" in line and "503" in line and "Too many open files" in line]
    assert len(lines) == 1, text[-3000:]  # one line, naming the cause


def test_a_file_the_server_may_not_read_is_403_and_a_missing_one_404(tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("secret\n")
    secret.chmod(0)
    (tmp_path / "plain.txt").write_text("plain\n")
    proc, port, err = _start(tmp_path)
    try:
        assert _get(port, "/secret.txt").startswith(b"HTTP/1.0 403 ")  # it was 404
        assert _get(port, "/nothing.txt").startswith(b"HTTP/1.0 404 ")
        assert _get(port, "/plain.txt/x").startswith(b"HTTP/1.0 404 ")  # ENOTDIR
        assert _get(port, "/plain.txt").endswith(b"plain\n")
    finally:
        proc.terminate()
        proc.wait(20)
    assert "Traceback" not in "".join(err)


def test_missing_files_and_not_a_directory_are_still_404(tmp_path: Path) -> None:
    (tmp_path / "plain.txt").write_text("plain\n")
    proc, port, err = _start(tmp_path)
    try:
        assert _get(port, "/nothing.txt").startswith(b"HTTP/1.0 404 ")
        assert _get(port, "/plain.txt/x").startswith(b"HTTP/1.0 404 ")  # ENOTDIR
        assert _get(port, "/plain.txt").endswith(b"plain\n")
    finally:
        proc.terminate()
        proc.wait(20)
    assert "Traceback" not in "".join(err)
