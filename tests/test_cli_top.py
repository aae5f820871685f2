"""``acceptfilter top`` on a real terminal (a pty, read with pyte): fits the screen, redraws in place, sorts, quits."""

from __future__ import annotations

import socket
import sys
from contextlib import ExitStack

import acceptfilter
from acceptfilter.cli.top import Row, render

from .conftest import wait_for
from .ptyscreen import PtyScreen

CLI = [sys.executable, "-m", "acceptfilter.cli", "top", "--interval", "0.3"]


def _rows(text: str) -> list[list[str]]:
    return [line.split() for line in text.splitlines() if line.split()[:1] and line.split()[0].isdigit()]


def test_top_fits_80x24_keeps_its_header_sorts_and_quits() -> None:
    """40 listening ports do not fit 24 lines: the header stays, the rows are cut to fit, keys re-sort."""
    with ExitStack() as stack:
        socks = [stack.enter_context(socket.create_server(("127.0.0.1", 0))) for _ in range(40)]
        busy = socks[7]
        port = busy.getsockname()[1]
        listener = stack.enter_context(acceptfilter.wrap(busy, "httpready", timeout=60))
        clients = [stack.enter_context(socket.create_connection(("127.0.0.1", port))) for _ in range(2)]
        wait_for(lambda: listener.stats()["held"] == 2, 30)
        screen = PtyScreen(CLI, columns=80, lines=24)
        try:
            # A whole frame: our row and the footer (a frame may arrive in several reads).
            text = screen.wait_for(lambda t: any(r[0] == str(port) and r[2] == "2" for r in _rows(t))
                                   and "q quit" in t.splitlines()[-1], 60)
            lines = text.splitlines()
            assert len(lines) == 24 and lines[0].startswith("acceptfilter top") and "sort: held" in lines[1]
            assert lines[2].split()[:3] == ["PORT", "ENG", "HELD"]
            held = [int(r[2]) if r[2].isdigit() else -1 for r in _rows(text)]
            assert held == sorted(held, reverse=True) and held[0] >= 2  # by held, most first (ours or a tie)
            assert "more (narrow with --port)" in text and "q quit" in lines[-1]  # cut to fit, the footer kept
            screen.send(b"p")  # by port: ascending
            text = screen.wait_for(lambda t: "sort: port" in t and "q quit" in t.splitlines()[-1], 30)
            ports = [int(r[0]) for r in _rows(text)]
            assert ports == sorted(ports)
            screen.send(b"q")
            assert screen.proc.wait(30) == 0
        finally:
            screen.close()
        assert len(clients) == 2


def test_render_marks_deferred_drops_and_engine_less_ports() -> None:
    rows = [Row(8000, "127.0.0.1", 2, 5, 3, 2, 1.5, 10.0, 0.0, 0.5, 1, 128, 3, True),
            Row(22, "0.0.0.0", 0, 0, 0, 0, 0.0, None, None, None, 0, 128, 0, False)]
    lines = render(rows, {"listen_overflows": 0, "listen_drops": 3, "defer_accept_drops": 3}, width=80, height=24)
    assert all(len(line) <= 80 for line in lines)
    ours = next(line.split() for line in lines if line.split()[:1] == ["8000"])
    assert ours[:6] == ["8000", "2", "5", "3", "2", "1.5"] and ours[-1] == "3*"
    other = next(line.split() for line in lines if line.split()[:1] == ["22"])
    assert other[2] == "-"  # no engine: nothing held that anyone can see
    assert "TCP_DEFER_ACCEPT" in lines[-1]
