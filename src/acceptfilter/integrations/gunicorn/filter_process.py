"""The filter process of the gunicorn integration (started by the arbiter, never by hand).

One thread: the engines' epoll fds, the channels (when full) and a signal
pipe go into one selector; no engine thread, no cross-thread hand-off. It
runs apart from gunicorn's arbiter on purpose: the arbiter forks every
worker, and a fork would copy each held connection's descriptor into the
worker, so closing a held connection (a reject, a deadline) would no longer
end it. This process is started with ``exec``, inherits only the listen
sockets and the sending ends of the hand-off channels, filters, and hands
each ready connection over (:mod:`.handoff`).

On SIGTERM it hands the ready connections it still has to the workers and
puts every held one back into the hold channel, undecided and unconsumed, for
the replacement the arbiter has already started to adopt; then it exits. It exits
by itself when the arbiter goes away.
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import logging
import mmap
import os
import resource
import selectors
import signal
import socket
import struct
import sys
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from ...engine import ConnectionInfo
from ...errors import AcceptFilterError
from ...iocore import Address
from ...listener import FilteredListener, wrap
from ...policy import WORKER_ON_TIMEOUT
from ..handoff import offer_fd, receive_fds, send_connection

__all__ = ["FeederSettings", "main"]

log = logging.getLogger("acceptfilter.gunicorn")

_PR_SET_PDEATHSIG = 1
#: Descriptors kept free for everything but held connections (channels, ready ones in flight).
FD_HEADROOM = 256
MAX_HELD_CAP = 1_000_000
#: How soon to retry a hand-off the kernel refused with ETOOMANYREFS.
RETRY_INTERVAL = 0.01
#: Engine polls per wake-up before handing over (as the asyncio driver does).
MAX_ROUNDS = 64
#: How long the shutdown hand-over may wait for room in a channel.
HANDOVER_TIMEOUT = 2.0


@dataclass(frozen=True)
class FeederSettings:
    """What the filter process is told: filter chain and policy."""

    filters: tuple[str, ...] = ("httpready",)
    timeout: float | None = None
    on_timeout: str = WORKER_ON_TIMEOUT
    max_held: int | None = None
    core: str = "c"
    #: TCP_DEFER_ACCEPT seconds on gunicorn's listen sockets (0: off), so a worker
    #: accepting a connection usually finds its request already there.
    defer_accept: int = 1
    #: Seconds a connection that has sent nothing is held (None: the default, 620; 0: no limit).
    idle_timeout: float | None = None
    #: HOST:PORT of a Prometheus endpoint in the filter process (every filtered port, summed per port).
    metrics_port: str | None = None

    def argv(self) -> list[str]:
        out: list[str] = []
        for spec in self.filters:
            out += ["--filter", spec]
        if self.timeout is not None:
            out += ["--timeout", repr(self.timeout)]
        out += ["--on-timeout", self.on_timeout, "--core", self.core]
        if self.max_held is not None:
            out += ["--max-held", str(self.max_held)]
        if self.idle_timeout is not None:
            out += ["--idle-timeout", repr(self.idle_timeout)]
        if self.metrics_port is not None:
            out += ["--metrics-port", self.metrics_port]
        return out

    def wrap(self, sock: socket.socket) -> FilteredListener:
        return wrap(sock, list(self.filters), timeout=self.timeout, on_timeout=self.on_timeout,
                    idle_timeout=self.idle_timeout, max_held=self.max_held or default_max_held(), core=self.core,
                    driver="none")


def default_max_held() -> int:
    """This process's fd limit less room for everything else: it exists only to hold connections."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return MAX_HELD_CAP
    return max(1024, min(MAX_HELD_CAP, soft - FD_HEADROOM))


class Tally:
    """Our held count in a memfd the arbiter also has, so a SIGKILL still tells it what was lost.

    Nothing can report from a killed process; the arbiter reads the last count
    (written after every round of the loop, no syscall: an mmap) and the
    clean-exit flag, written only by an orderly stop that passed the held ones on.
    """

    def __init__(self, fd: int | None) -> None:
        self._map = None if fd is None else mmap.mmap(fd, 16)

    def update(self, pairs: Sequence[_Pair]) -> None:
        if self._map is None:
            return
        struct.pack_into("=Q", self._map, 0, sum(p.listener.stats()["held"] for p in pairs))

    def close_cleanly(self) -> None:
        if self._map is not None:
            struct.pack_into("=QQ", self._map, 0, 0, 1)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="acceptfilter-gunicorn-feeder", description=__doc__)
    p.add_argument("--master", type=int, required=True, help="the arbiter's pid: exit when it is gone")
    p.add_argument("--status-fd", type=int, required=True, help="write 'R' when ready, or 'E' and the error")
    p.add_argument("--tally-fd", type=int, default=None,
                   help="a 16-byte memfd: the held count and a clean-exit flag, for the arbiter to read if we die")
    p.add_argument("--pair", action="append", required=True, metavar="LISTEN:READY:HOLD_IN:HOLD_OUT",
                   help="fds: a listen socket (never accepted from here), the sending end of the channel for "
                        "ready connections, both ends of the channel of connections to hold")
    p.add_argument("--filter", action="append", required=True, metavar="SPEC")
    p.add_argument("--timeout", type=float, default=None)
    p.add_argument("--on-timeout", default=WORKER_ON_TIMEOUT)
    p.add_argument("--max-held", type=int, default=None)
    p.add_argument("--idle-timeout", type=float, default=None)
    p.add_argument("--core", default="c")
    p.add_argument("--metrics-port", default=None, metavar="HOST:PORT", help="serve Prometheus metrics there")
    p.add_argument("--log-level", default="info")
    p.add_argument("--error-log", default="-", metavar="PATH", help="gunicorn's --error-logfile ('-': stderr)")
    p.add_argument("--uid", type=int, default=None, help="switch to this user once the sockets are wrapped")
    p.add_argument("--gid", type=int, default=None, help="and this group")
    return p


def _raise_fd_limit() -> None:
    """Soft RLIMIT_NOFILE up to the hard limit: held connections and fds in flight both count."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError) as exc:
            log.warning("could not raise the fd limit from %d to %d: %s", soft, hard, exc)


def _drop_privileges(uid: int | None, gid: int | None) -> None:
    """Parse untrusted bytes as gunicorn's workers do: as ``--user``/``--group``, not as root."""
    if gid is not None and gid != os.getgid():
        os.setgroups([])
        os.setgid(gid)
    if uid is not None and uid != os.getuid():
        os.setuid(uid)


def _die_with(master: int) -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):  # still caught by the getppid() check in the loop
        pass
    if os.getppid() != master:
        sys.exit(0)


class _Pair:
    """One listener, its engine run from our loop (no thread), and its channel to the workers."""

    def __init__(self, listener: FilteredListener, channel: socket.socket, holds: socket.socket,
                 holds_out: socket.socket) -> None:
        self.listener = listener
        self.channel = channel
        self.holds = holds  # connections to hold come in here ...
        self.holds_out = holds_out  # ... and go back in here for a successor
        # Workers accept and look first; only what they pass on is held here.
        listener.engine.stop_accepting()
        self.pending: deque[tuple[int, Address, ConnectionInfo]] = deque()
        #: The channel refused for a reason writability will not signal (ETOOMANYREFS).
        self.retry_soon = False
        self.dropped_in_flight = 0  # passed on by a worker, closed by the kernel for want of an fd
        listener.setblocking(False)
        channel.setblocking(False)

    def pump(self) -> int:
        """Run the engine until it is quiet, then hand everything ready over; returns connections handed."""
        step = self.listener.engine.step
        for _ in range(MAX_ROUNDS):
            # The C core arms connections it peeked at accept time at the start of
            # the next poll: always finish with a poll that found nothing.
            if step(0) == 0:
                break
        return self.hand_over()

    def hand_over(self) -> int:
        """Ready connections into the channel until it is full (the rest wait here, in order)."""
        handed = 0
        self.retry_soon = False
        while True:
            if self.pending:
                item = self.pending.popleft()
            else:
                try:
                    item = self.listener.accept_fd()
                except (BlockingIOError, TimeoutError):
                    return handed
            fd, addr, info = item
            try:
                send_connection(self.channel, fd, addr, info)
            except (BlockingIOError, TimeoutError):
                self.pending.appendleft(item)  # every worker is busy: keep it, in order
                return handed
            except OSError as exc:
                if exc.errno == errno.ETOOMANYREFS:  # too many fds in flight for our RLIMIT_NOFILE
                    self.pending.appendleft(item)
                    self.retry_soon = True
                    return handed
                os.close(fd)
                raise
            handed += 1
            os.close(fd)  # our copy only: the workers' copy is in flight

    def adopt_offered(self) -> int:
        """Hold every connection the workers passed on."""
        dropped = [0]
        fds = receive_fds(self.holds, dropped=dropped)
        if dropped[0]:
            # The kernel closed them in flight: we had no descriptor to receive them into.
            self.dropped_in_flight += dropped[0]
            log.error("lost %d connection(s) a worker passed on: no file descriptor left to receive them "
                      "(EMFILE; %d lost this way so far)", dropped[0], self.dropped_in_flight)
        for fd in fds:
            try:
                self.listener.adopt(fd)
            except OSError:
                os.close(fd)  # gone already (reset) or not a socket
        return len(fds)

    def pass_on(self, fds: list[int]) -> int:
        """Held connections into the hold channel, where a successor filter process adopts them."""
        passed = 0
        for fd in fds:
            try:
                offer_fd(self.holds_out, fd)
                passed += 1
            except OSError as exc:
                log.debug("could not pass a held connection on: %s", exc)
            finally:
                os.close(fd)
        return passed

    def next_timeout(self) -> float | None:
        return self.listener.engine.next_timeout()


class _Feeder:
    def __init__(self, pairs: list[_Pair]) -> None:
        self.pairs = pairs
        self.handed = 0
        self.lost = 0
        self.passed_on = 0

    def pump(self, pair: _Pair) -> None:
        try:
            self.handed += pair.pump()
        except OSError as exc:
            self.lost += 1
            log.error("could not hand a connection to the workers: %s", exc)
            if isinstance(exc, (BrokenPipeError, ConnectionError)):
                raise

    def timeout(self) -> float:
        due = [t for t in (p.next_timeout() for p in self.pairs) if t is not None]
        if any(p.retry_soon for p in self.pairs):
            due.append(RETRY_INTERVAL)
        return min([1.0, *due])

    def release(self) -> None:
        """Stop filtering: held connections go back to be held by a successor, ready ones to the workers."""
        for pair in self.pairs:
            self.passed_on += pair.pass_on(pair.listener.detach_held())
            pair.channel.settimeout(HANDOVER_TIMEOUT)
            try:
                self.handed += pair.hand_over()
            except OSError as exc:
                log.error("could not hand connections over at shutdown: %s", exc)
            self.lost += len(pair.pending)
            while pair.pending:
                os.close(pair.pending.popleft()[0])
            pair.listener.close()


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    handler = logging.StreamHandler(sys.stderr) if args.error_log == "-" else logging.FileHandler(args.error_log)
    logging.basicConfig(level=args.log_level.upper(), handlers=[handler],
                        format="[%(asctime)s] [%(process)d] [%(levelname)s] acceptfilter: %(message)s",
                        datefmt="%Y-%m-%d %H:%M:%S %z")
    _die_with(args.master)
    _raise_fd_limit()
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # the arbiter reloads; a hang-up of the terminal is its business
    settings = FeederSettings(tuple(args.filter), args.timeout, args.on_timeout, args.max_held, args.core,
                              idle_timeout=args.idle_timeout)
    status = os.fdopen(args.status_fd, "w", closefd=True)
    pairs: list[_Pair] = []
    try:
        for spec in args.pair:
            listen_fd, channel_fd, hold_in, hold_out = (int(x) for x in spec.split(":"))
            pairs.append(_Pair(settings.wrap(socket.socket(fileno=listen_fd)), socket.socket(fileno=channel_fd),
                               socket.socket(fileno=hold_in), socket.socket(fileno=hold_out)))
    except (AcceptFilterError, ValueError, OSError) as exc:
        status.write(f"E{exc}")
        status.close()
        return 2
    try:
        if args.metrics_port is not None:  # bound before dropping privileges: a low port works
            from ...exporter import metrics_server, parse_address, start

            host, mport = parse_address(args.metrics_port, "ACCEPTFILTER_METRICS_PORT")
            ports = sorted({int(p.listener.getsockname()[1]) for p in pairs if p.listener.family != socket.AF_UNIX})
            server = metrics_server(host, mport, ports, option="ACCEPTFILTER_METRICS_PORT")
            start(server)
            log.info("metrics on %s", server.url)
    except AcceptFilterError as exc:
        status.write(f"E{exc}")
        status.close()
        return 2
    try:
        _drop_privileges(args.uid, args.gid)
    except OSError as exc:
        status.write(f"Ecannot switch to uid {args.uid} gid {args.gid}: {exc}")
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
    for pair in pairs:
        selector.register(pair.listener.engine.fileno(), selectors.EVENT_READ, pair)
        selector.register(pair.holds.fileno(), selectors.EVENT_READ, pair)
    log.info("filtering %s with %s for gunicorn's workers",
             ", ".join(str(p.listener.getsockname()) for p in pairs), " -> ".join(settings.filters))
    status.write("R")
    status.close()
    waiting_to_send: set[int] = set()
    tally = Tally(args.tally_fd)
    try:
        while not stopping:
            for key, _ in selector.select(feeder.timeout()):
                if key.data is None:
                    wake_r.recv(4096)
            for pair in pairs:  # cheap when idle; deadlines need it anyway
                pair.adopt_offered()
                feeder.pump(pair)
                fd = pair.channel.fileno()
                if pair.pending and fd not in waiting_to_send:
                    selector.register(fd, selectors.EVENT_WRITE, pair)
                    waiting_to_send.add(fd)
                elif not pair.pending and fd in waiting_to_send:
                    selector.unregister(fd)
                    waiting_to_send.discard(fd)
            tally.update(pairs)
            if os.getppid() != args.master:
                log.info("the arbiter is gone; stopping")
                break
    except (BrokenPipeError, ConnectionError):
        log.info("the workers' end of the hand-off is closed; stopping")
    finally:
        feeder.release()
        tally.close_cleanly()
        stats = [p.listener.stats() for p in pairs]
        log.info("stopped: %d connections handed to workers, %d held ones passed on, %d lost; "
                 "accepted %d, rejected %d, timed out %d", feeder.handed, feeder.passed_on,
                 feeder.lost + sum(p.dropped_in_flight for p in pairs), sum(s.get("accepted", 0) for s in stats),
                 sum(s.get("rejected", 0) for s in stats), sum(s.get("timed_out", 0) for s in stats))
    return 0


if __name__ == "__main__":
    sys.exit(main())
