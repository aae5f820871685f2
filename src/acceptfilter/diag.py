"""The kernel's view of a listening socket, through pyroute2's sock_diag.

On a LISTEN socket, sock_diag reports the current accept-queue length as
``idiag_rqueue`` and the backlog (after ``net.core.somaxconn`` truncation) as
``idiag_wqueue``.
"""

from __future__ import annotations

import os
import socket
from typing import Any

__all__ = ["listen_backlog", "listener_record"]

TCP_LISTEN = 10


def listener_record(sock: socket.socket) -> dict[str, Any] | None:
    """The sock_diag record of this exact listening socket (matched by inode), or None."""
    from pyroute2 import DiagSocket

    port = sock.getsockname()[1]
    inode = os.fstat(sock.fileno()).st_ino
    with DiagSocket() as diag:
        diag.bind()
        records = diag.get_sock_stats(family=sock.family, states=1 << TCP_LISTEN, sport=port)
    for record in records:
        if record.get("idiag_inode") == inode:
            return dict(record)
    return None


def listen_backlog(sock: socket.socket) -> int | None:
    """The effective listen backlog of ``sock`` (what the kernel really uses)."""
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return None
    record = listener_record(sock)
    return None if record is None else int(record["idiag_wqueue"])
