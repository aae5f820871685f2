"""Start a command the way systemd's socket activation does, then exec it (the pid stays the same).

argv: KIND COMMAND...  KIND is what the launcher binds and passes as fd 3 (and 4):
``tcp`` a listening TCP socket on 127.0.0.1 (its port is printed first), ``two``
two of them, ``udp`` a UDP socket, ``unlistened`` a bound TCP socket that does
not listen, ``pipe`` a pipe, ``otherpid`` a listening socket with LISTEN_PID of
another process (the variables were inherited: the command must ignore them).
Sets LISTEN_FDS, LISTEN_PID and LISTEN_FDNAMES exactly as systemd does.
"""

from __future__ import annotations

import os
import socket
import sys


def listening() -> socket.socket:
    return socket.create_server(("127.0.0.1", 0), backlog=512)


def main() -> None:
    kind, command = sys.argv[1], sys.argv[2:]
    port = 0
    fds: list[int] = []
    if kind in ("tcp", "otherpid", "two"):
        socks = [listening() for _ in range(2 if kind == "two" else 1)]
        port = socks[0].getsockname()[1]
        fds = [s.detach() for s in socks]
    elif kind == "udp":
        u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        u.bind(("127.0.0.1", 0))
        fds = [u.detach()]
    elif kind == "unlistened":
        t = socket.socket()
        t.bind(("127.0.0.1", 0))
        fds = [t.detach()]
    elif kind == "pipe":
        r, _w = os.pipe()
        fds = [r]
    else:
        raise SystemExit(f"unknown kind {kind!r}")
    # Move them out of the way first, then to 3, 4, ... (an fd may already be 3).
    high = [os.dup2(fd, 100 + i) for i, fd in enumerate(fds)]
    for fd in fds:
        os.close(fd)
    for i, fd in enumerate(high):
        os.dup2(fd, 3 + i)  # inheritable
        os.close(fd)
    env = dict(os.environ)
    env["LISTEN_FDS"] = str(len(fds))
    env["LISTEN_PID"] = str(1 if kind == "otherpid" else os.getpid())
    env["LISTEN_FDNAMES"] = ":".join(["http", "other"][: len(fds)])
    print(port, flush=True)
    os.execve(command[0], command, env)


if __name__ == "__main__":
    main()
