"""The filter process of the gunicorn integration (started by the arbiter, never by hand).

It runs apart from gunicorn's arbiter on purpose: the arbiter forks every
worker, and a fork would copy each held connection's descriptor into the
worker, so closing a held connection (a reject, a deadline) would no longer
end it. This process is started with ``exec``, inherits only the listen
sockets and the sending ends of the hand-off channels, filters, and hands
each ready connection over (:mod:`.handoff`).

On SIGTERM it stops accepting, hands every held connection over as it is
(``reason="shutdown"``) so a replacement loses nothing, and exits. It exits
by itself when the arbiter goes away.
"""

from __future__ import annotations

import argparse
import ctypes
import logging
import os
import selectors
import signal
import socket
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import AcceptFilterError
from ..listener import FilteredListener, wrap
from .handoff import send_connection

__all__ = ["FeederSettings", "main"]

log = logging.getLogger("acceptfilter.gunicorn")

_PR_SET_PDEATHSIG = 1
#: How long the shutdown hand-over may wait for room in a channel.
HANDOVER_TIMEOUT = 2.0


@dataclass(frozen=True)
class FeederSettings:
    """What the filter process is told: filter chain and policy."""

    filters: tuple[str, ...] = ("httpready",)
    timeout: float | None = None
    on_timeout: str = "surface"
    max_held: int | None = None
    core: str = "c"

    def argv(self) -> list[str]:
        out: list[str] = []
        for spec in self.filters:
            out += ["--filter", spec]
        if self.timeout is not None:
            out += ["--timeout", repr(self.timeout)]
        out += ["--on-timeout", self.on_timeout, "--core", self.core]
        if self.max_held is not None:
            out += ["--max-held", str(self.max_held)]
        return out

    def wrap(self, sock: socket.socket) -> FilteredListener:
        return wrap(sock, list(self.filters), timeout=self.timeout, on_timeout=self.on_timeout,
                    max_held=self.max_held, core=self.core)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="acceptfilter-gunicorn-feeder", description=__doc__)
    p.add_argument("--master", type=int, required=True, help="the arbiter's pid: exit when it is gone")
    p.add_argument("--status-fd", type=int, required=True, help="write 'R' when ready, or 'E' and the error")
    p.add_argument("--pair", action="append", required=True, metavar="LISTEN_FD:CHANNEL_FD")
    p.add_argument("--filter", action="append", required=True, metavar="SPEC")
    p.add_argument("--timeout", type=float, default=None)
    p.add_argument("--on-timeout", default="surface")
    p.add_argument("--max-held", type=int, default=None)
    p.add_argument("--core", default="c")
    p.add_argument("--log-level", default="info")
    p.add_argument("--error-log", default="-", metavar="PATH", help="gunicorn's --error-logfile ('-': stderr)")
    return p


def _die_with(master: int) -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):  # still caught by the getppid() check in the loop
        pass
    if os.getppid() != master:
        sys.exit(0)


class _Feeder:
    def __init__(self, pairs: list[tuple[FilteredListener, socket.socket]]) -> None:
        self.pairs = pairs
        self.handed = 0
        self.lost = 0

    def hand_over(self, listener: FilteredListener, channel: socket.socket) -> None:
        """Everything ready on ``listener`` into ``channel`` (blocks while the channel is full)."""
        while True:
            try:
                conn, addr, info = listener.accept_with_info()
            except (BlockingIOError, TimeoutError):
                return
            try:
                send_connection(channel, conn, addr, info)
                self.handed += 1
            except OSError as exc:
                self.lost += 1
                log.error("could not hand a connection from %s to the workers: %s", addr, exc)
                if isinstance(exc, (BrokenPipeError, ConnectionError, TimeoutError)):
                    raise
            finally:
                conn.close()  # our copy only: the workers' copy is in flight

    def release(self) -> None:
        """Stop filtering and hand every held connection over as it is."""
        for listener, channel in self.pairs:
            listener.release_held("surface")
            channel.settimeout(HANDOVER_TIMEOUT)
            try:
                self.hand_over(listener, channel)
            except OSError:
                pass  # counted and logged; nobody is left to serve them
        for listener, _ in self.pairs:
            listener.close()


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    handler = logging.StreamHandler(sys.stderr) if args.error_log == "-" else logging.FileHandler(args.error_log)
    logging.basicConfig(level=args.log_level.upper(), handlers=[handler],
                        format="[%(asctime)s] [%(process)d] [%(levelname)s] acceptfilter: %(message)s",
                        datefmt="%Y-%m-%d %H:%M:%S %z")
    _die_with(args.master)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # the arbiter reloads; a hang-up of the terminal is its business
    settings = FeederSettings(tuple(args.filter), args.timeout, args.on_timeout, args.max_held, args.core)
    status = os.fdopen(args.status_fd, "w", closefd=True)
    pairs: list[tuple[FilteredListener, socket.socket]] = []
    try:
        for pair in args.pair:
            listen_fd, channel_fd = (int(x) for x in pair.split(":"))
            pairs.append((settings.wrap(socket.socket(fileno=listen_fd)), socket.socket(fileno=channel_fd)))
    except (AcceptFilterError, ValueError, OSError) as exc:
        status.write(f"E{exc}")
        status.close()
        return 2
    feeder = _Feeder(pairs)
    wake_r, wake_w = socket.socketpair()
    wake_w.setblocking(False)
    signal.set_wakeup_fd(wake_w.fileno())
    stopping: list[int] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: stopping.append(signum))
    selector = selectors.DefaultSelector()
    selector.register(wake_r, selectors.EVENT_READ, None)
    for listener, channel in pairs:
        listener.setblocking(False)
        selector.register(listener, selectors.EVENT_READ, (listener, channel))
    log.info("filtering %s with %s for gunicorn's workers",
             ", ".join(str(lst.getsockname()) for lst, _ in pairs), " -> ".join(settings.filters))
    status.write("R")
    status.close()
    try:
        while not stopping:
            for key, _ in selector.select(1.0):
                if key.data is None:
                    wake_r.recv(4096)
                    continue
                feeder.hand_over(*key.data)
            if os.getppid() != args.master:
                log.info("the arbiter is gone; stopping")
                break
    except (BrokenPipeError, ConnectionError):
        log.info("the workers' end of the hand-off is closed; stopping")
    finally:
        feeder.release()
        stats = [lst.stats() for lst, _ in pairs]
        log.info("stopped: %d connections handed to workers, %d lost; accepted %d, rejected %d, timed out %d",
                 feeder.handed, feeder.lost, sum(s.get("accepted", 0) for s in stats),
                 sum(s.get("rejected", 0) for s in stats), sum(s.get("timed_out", 0) for s in stats))
    return 0


if __name__ == "__main__":
    sys.exit(main())
