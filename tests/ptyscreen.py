"""Run a command in a pseudo-terminal of a given size and read its screen as a terminal shows it (pyte)."""

from __future__ import annotations

import fcntl
import os
import pty
import select
import signal
import struct
import subprocess
import termios
import time
from collections.abc import Callable, Sequence

import pyte


class PtyScreen:
    """A process on a pty of ``columns`` x ``lines``; :meth:`wait_for` reads until the screen satisfies a test."""

    def __init__(self, argv: Sequence[str], *, columns: int = 80, lines: int = 24, env: dict[str, str] | None = None) -> None:
        self.screen = pyte.Screen(columns, lines)
        self.stream = pyte.ByteStream(self.screen)
        master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", lines, columns, 0, 0))
        self.master = master
        self.proc = subprocess.Popen(list(argv), stdin=slave, stdout=slave, stderr=slave, close_fds=True,
                                     env={**(env or os.environ), "TERM": "xterm-256color"}, start_new_session=True)
        os.close(slave)

    def text(self) -> str:
        return "\n".join(self.screen.display)

    def _pump(self, timeout: float) -> None:
        ready, _, _ = select.select([self.master], [], [], timeout)
        if ready:
            try:
                data = os.read(self.master, 65536)
            except OSError:  # the process closed its side
                data = b""
            if data:
                self.stream.feed(data)

    def wait_for(self, test: Callable[[str], bool], timeout: float = 60.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._pump(0.1)
            if test(self.text()):
                return self.text()
        raise AssertionError(f"the screen never showed what was expected; it shows:\n{self.text()}")

    def send(self, keys: bytes) -> None:
        os.write(self.master, keys)

    def close(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(30)
        finally:
            os.close(self.master)
        return code
