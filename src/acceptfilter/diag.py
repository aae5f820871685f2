"""The kernel's view of listening sockets, through pyroute2's sock_diag.

An eager user-space accepter keeps the kernel's accept queue short, but the
queue still exists: when the engine falls behind, connections wait (or are
dropped) there, invisible to the engine's own counters. This module reports:

* ``idiag_rqueue`` on a LISTEN socket: the current accept-queue length;
* ``idiag_wqueue``: the backlog the kernel really uses (after the
  ``net.core.somaxconn`` truncation, which ``listen()`` applies silently);
* request sockets in SYN_RECV for the port (e.g. held by ``TCP_DEFER_ACCEPT``);
* the listener's own drop count (``sk_drops``, element 8 of the
  ``INET_DIAG_SKMEMINFO`` array, which ``tcp_listendrop()`` increments);
* the namespace-wide ``TcpExt: ListenOverflows / ListenDrops`` of
  ``/proc/net/netstat``;
* :class:`KernelQueue`: the accept queue and backlog of a socket this process
  holds, from ``TCP_INFO`` (one syscall, no netlink: what a status line polls).

Every reader of the kernel's queues (``serve``'s status line, ``stats``, ``top``)
goes through this module.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import struct
import sys
from dataclasses import asdict, dataclass, field
from typing import Any

from .errors import AcceptFilterError

__all__ = [
    "DiagError",
    "DiagPermissionError",
    "KernelQueue",
    "ListenerView",
    "inspect",
    "listen_backlog",
    "listen_counters",
    "listener_record",
    "listeners",
    "somaxconn",
]

log = logging.getLogger("acceptfilter")

TCP_SYN_RECV = 3
TCP_LISTEN = 10
#: INET_DIAG_SKMEMINFO is attribute 7; the request bit is 1 << (attribute - 1).
_EXT_SKMEMINFO = 1 << (7 - 1)
#: Index of SK_MEMINFO_DROPS in the skmeminfo array of u32.
_SK_MEMINFO_DROPS = 8
_FAMILIES: dict[int, str] = {socket.AF_INET: "ipv4", socket.AF_INET6: "ipv6"}


class DiagError(AcceptFilterError):
    """The kernel view could not be read (no such listener, netlink failure)."""


class DiagPermissionError(DiagError, PermissionError):
    """sock_diag (netlink) or /proc was refused: a sandbox, seccomp or a missing capability."""


@dataclass(frozen=True, slots=True)
class ListenerView:
    """One listening socket as the kernel sees it; see the module docstring for each field."""

    family: str
    address: str
    port: int
    inode: int
    accept_queue: int
    backlog: int
    syn_recv: int
    drops: int | None
    somaxconn: int
    requested_backlog: int | None = None
    warnings: tuple[str, ...] = field(default=())

    @property
    def truncated(self) -> bool:
        """True when the requested backlog was cut down to ``net.core.somaxconn``."""
        return self.requested_backlog is not None and self.requested_backlog > self.backlog

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["warnings"] = list(self.warnings)
        out["truncated"] = self.truncated
        return out


def somaxconn() -> int:
    """``net.core.somaxconn`` of this network namespace: the ceiling on any listen backlog."""
    try:
        with open("/proc/sys/net/core/somaxconn") as f:
            return int(f.read())
    except (OSError, ValueError):
        return socket.SOMAXCONN


def listen_counters() -> dict[str, int]:
    """Namespace-wide ``ListenOverflows``, ``ListenDrops`` and ``TCPDeferAcceptDrop`` (every listener together).

    ``ListenDrops`` includes the bare ACKs ``TCP_DEFER_ACCEPT`` dropped (``TCPDeferAcceptDrop``);
    ``ListenOverflows`` is the accept queue overflowing.
    """
    try:
        with open("/proc/net/netstat") as f:
            lines = f.read().splitlines()
    except PermissionError as exc:
        raise DiagPermissionError(f"cannot read /proc/net/netstat: {exc.strerror}") from None
    except OSError as exc:
        raise DiagError(f"cannot read /proc/net/netstat: {exc.strerror or exc}") from None
    for names, values in zip(lines[::2], lines[1::2], strict=False):
        if names.startswith("TcpExt:") and values.startswith("TcpExt:"):
            table = dict(zip(names.split()[1:], values.split()[1:], strict=False))
            return {
                "listen_overflows": int(table.get("ListenOverflows", 0)),
                "listen_drops": int(table.get("ListenDrops", 0)),
                "defer_accept_drops": int(table.get("TCPDeferAcceptDrop", 0)),
            }
    return {"listen_overflows": 0, "listen_drops": 0, "defer_accept_drops": 0}


def _dump(family: int, states: int, *, sport: int = 0, extensions: int = 0) -> tuple[Any, ...]:
    """One sock_diag dump, with netlink errors turned into a message a user can act on."""
    try:
        from pyroute2 import DiagSocket
    except ImportError as exc:  # a hard dependency, but say so clearly if it is missing
        raise DiagError(f"pyroute2 is needed for the kernel view: {exc}") from None
    except OSError as exc:  # importing opens files: EMFILE at a process's fd limit
        raise DiagError(f"cannot load pyroute2 for the kernel view: {exc.strerror or exc}") from None
    try:
        with DiagSocket() as diag:
            diag.bind()
            return tuple(diag.get_sock_stats(family=family, states=states, sport=sport, extensions=extensions))
    except OSError as exc:
        code = exc.errno or getattr(exc, "code", None)
        if code in (errno.EPERM, errno.EACCES):
            raise DiagPermissionError(
                "the kernel refused the sock_diag netlink request (not permitted: a sandbox or seccomp "
                "policy, or a missing capability); run where NETLINK_SOCK_DIAG is allowed"
            ) from None
        raise DiagError(f"sock_diag request failed: {exc}") from None
    except Exception as exc:  # pyroute2's NetlinkError is not always an OSError
        code = getattr(exc, "code", None)
        if code in (errno.EPERM, errno.EACCES):
            raise DiagPermissionError("sock_diag netlink request not permitted here") from None
        raise DiagError(f"sock_diag request failed: {exc}") from None


def _drops(record: Any) -> int | None:
    raw = record.get_attr("INET_DIAG_SKMEMINFO")
    if not raw:
        return None
    data = bytes.fromhex(str(raw).replace(":", ""))
    if len(data) < 4 * (_SK_MEMINFO_DROPS + 1):
        return None  # a kernel older than 4.x has no drop counter in the array
    return int.from_bytes(data[4 * _SK_MEMINFO_DROPS : 4 * _SK_MEMINFO_DROPS + 4], "little" if _little() else "big")


def _little() -> bool:
    return sys.byteorder == "little"


def _is_any(address: str) -> bool:
    return address in ("0.0.0.0", "::")


def _view(record: Any, syn: dict[tuple[int, str], int], syn_by_port: dict[int, int], limit: int,
          requested: int | None) -> ListenerView:
    family = int(record["idiag_family"])
    address = str(record["idiag_src"])
    port = int(record["idiag_sport"])
    syn_recv = syn_by_port.get(port, 0) if _is_any(address) else syn.get((port, address), 0)
    backlog = int(record["idiag_wqueue"])
    warnings: list[str] = []
    if requested is not None and requested > backlog:
        warnings.append(
            f"listen backlog {requested} was truncated to {backlog} "
            f"(net.core.somaxconn = {limit}); raise net.core.somaxconn to get the backlog you asked for"
        )
    return ListenerView(
        family=_FAMILIES.get(family, str(family)),
        address=address,
        port=port,
        inode=int(record["idiag_inode"]),
        accept_queue=int(record["idiag_rqueue"]),
        backlog=backlog,
        syn_recv=syn_recv,
        drops=_drops(record),
        somaxconn=limit,
        requested_backlog=requested,
        warnings=tuple(warnings),
    )


def listeners(port: int | None = None, host: str | None = None, *, requested_backlog: int | None = None) -> list[ListenerView]:
    """Every local TCP listener (IPv4 and IPv6), or those on ``port`` (and ``host``), sorted by port."""
    sport = port or 0
    syn: dict[tuple[int, str], int] = {}
    syn_by_port: dict[int, int] = {}
    records: list[Any] = []
    for family in (socket.AF_INET, socket.AF_INET6):
        records += [r for r in _dump(family, 1 << TCP_LISTEN, sport=sport, extensions=_EXT_SKMEMINFO)
                    if not sport or int(r["idiag_sport"]) == sport]
        for r in _dump(family, 1 << TCP_SYN_RECV, sport=sport):
            key = (int(r["idiag_sport"]), str(r["idiag_src"]))
            syn[key] = syn.get(key, 0) + 1
            syn_by_port[key[0]] = syn_by_port.get(key[0], 0) + 1
            mapped = key[1].removeprefix("::ffff:")
            if mapped != key[1]:
                syn[(key[0], mapped)] = syn.get((key[0], mapped), 0) + 1
    if host is not None:
        wanted = _resolve(host)
        records = [r for r in records if str(r["idiag_src"]) in wanted]
    limit = somaxconn()
    # Each view carries its warnings for the caller to show (stats prints them): no
    # log line as well, or a terminal shows every warning twice.
    views = [_view(r, syn, syn_by_port, limit, requested_backlog) for r in records]
    return sorted(views, key=lambda v: (v.port, v.family, v.address))


def _resolve(host: str) -> set[str]:
    """The addresses ``host`` names; a name that does not resolve is a clear error."""
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except socket.gaierror as exc:
        raise DiagError(f"cannot resolve host {host!r}: {exc.strerror}") from None
    return {str(info[4][0]) for info in infos}


def inspect(sock: socket.socket, requested_backlog: int | None = None) -> ListenerView:
    """The kernel view of this exact listening socket (matched by inode).

    Pass the backlog you gave ``listen()`` as ``requested_backlog``: the kernel
    keeps only the truncated value, so only the caller can tell it was cut.
    """
    if sock.family not in _FAMILIES:
        raise DiagError(f"only IPv4 and IPv6 listeners have a sock_diag view, not {sock.family!r}")
    port = int(sock.getsockname()[1])
    inode = os.fstat(sock.fileno()).st_ino
    for view in listeners(port, requested_backlog=requested_backlog):
        if view.inode == inode:
            return view
    raise DiagError(f"no listening socket with inode {inode} on port {port} (is it listening?)")


def listener_record(sock: socket.socket) -> dict[str, Any] | None:
    """The raw sock_diag record of this exact listening socket (matched by inode), or None."""
    port = sock.getsockname()[1]
    inode = os.fstat(sock.fileno()).st_ino
    for record in _dump(sock.family, 1 << TCP_LISTEN, sport=port):
        if record.get("idiag_inode") == inode:
            return dict(record)
    return None


def listen_backlog(sock: socket.socket) -> int | None:
    """The effective listen backlog of ``sock`` (what the kernel really uses)."""
    if sock.family not in _FAMILIES:
        return None
    record = listener_record(sock)
    return None if record is None else int(record["idiag_wqueue"])


class KernelQueue:
    """The listen socket's accept queue and backlog, from ``getsockopt(TCP_INFO)``.

    On a listening socket ``tcpi_unacked`` is the accept-queue length and
    ``tcpi_sacked`` the backlog. One syscall on a socket we already have: the
    status line used to build a pyroute2 netlink socket (and an asyncio loop)
    per refresh, which failed every time at EMFILE, the moment it matters.
    """

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def read(self) -> tuple[int, int] | None:
        if self.sock.family not in (socket.AF_INET, socket.AF_INET6):
            return None
        try:
            raw = self.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
        except OSError:
            return None
        if len(raw) < 32:
            return None
        unacked, sacked = struct.unpack_from("=II", raw, 24)
        return unacked, sacked
