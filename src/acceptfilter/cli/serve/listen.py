"""The listen socket of ``acceptfilter serve``: TCP (IPv4, IPv6, dual-stack) or UNIX, with one-line errors."""

from __future__ import annotations

import os
import socket
import stat

from ...errors import AcceptFilterError, listen_error


def listen(bind: str, port: int, backlog: int) -> socket.socket:
    """The listen socket: IPv4, IPv6 (``::`` is dual-stack, like ``python -m http.server``) or ``unix:PATH``."""
    if bind.startswith("unix:"):
        return listen_unix(bind[5:], backlog)
    host = bind.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    where = f"[{host}]:{port}" if family == socket.AF_INET6 else f"{host}:{port}"
    dual = host == "::" and socket.has_dualstack_ipv6()
    try:
        return socket.create_server((host, port), family=family, backlog=backlog, reuse_port=False, dualstack_ipv6=dual)
    except OSError as exc:
        raise listen_error(where, exc, "--port") from None


def listen_unix(path: str, backlog: int) -> socket.socket:
    """A UNIX stream socket at ``path``; a stale socket file left by a dead server is replaced."""
    if not path:
        raise AcceptFilterError("--bind unix:PATH needs a path")
    where = f"unix:{path}"
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        mode = None
    except OSError as exc:  # a folder on the way this user may not search
        raise listen_error(where, exc, "--bind") from None
    if mode is not None:
        if not stat.S_ISSOCK(mode):
            raise AcceptFilterError(f"cannot listen on unix:{path}: it exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except ConnectionRefusedError:
            try:
                os.unlink(path)  # nobody listens there: a stale file
            except OSError as exc:
                raise listen_error(where, exc, "--bind") from None
        except OSError:
            pass
        else:
            raise AcceptFilterError(f"cannot listen on unix:{path}: another server is listening there")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        raise listen_error(where, exc, "--bind") from None
    return sock


def display(sock: socket.socket) -> str:
    name = sock.getsockname()
    if sock.family == socket.AF_UNIX:
        return f"unix:{name}"
    host, port = name[:2]
    return f"http://{f'[{host}]' if ':' in host else host}:{port}/"
