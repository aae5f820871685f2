"""systemd socket activation: the listen socket comes from ``LISTEN_FDS``, as ``sd_listen_fds()`` reads it.

systemd (a ``.socket`` unit) binds the port, starts the service when needed
and passes the listening sockets as descriptors 3, 4, ... with three
environment variables: ``LISTEN_FDS`` (how many), ``LISTEN_PID`` (the process
they are meant for: a child that inherited the variables must not take them)
and ``LISTEN_FDNAMES`` (``FileDescriptorName=``, colon-separated). This reads
them exactly as ``sd_listen_fds(unset_environment=1)`` does: nothing when
``LISTEN_PID`` is absent or is another process, the descriptors marked
close-on-exec, and the variables removed so that nothing started later takes
them again.

Why it matters here: the socket outlives the service. Connections that
arrive while acceptfilter restarts wait in the kernel's accept queue, and the
filter takes them (and holds them) as soon as it is back.

A descriptor that is not a listening TCP socket is refused with one line
(:class:`ActivationError`) before anything else starts.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
from collections.abc import MutableMapping
from dataclasses import dataclass

from .errors import AcceptFilterError

__all__ = ["SD_LISTEN_FDS_START", "ActivationError", "Inherited", "inherited_listener", "listen_fds"]

#: The first passed descriptor (``SD_LISTEN_FDS_START`` in sd-daemon.h).
SD_LISTEN_FDS_START = 3
_VARIABLES = ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES")


class ActivationError(AcceptFilterError):
    """The sockets systemd passed cannot be served (not a listening TCP socket, too many, malformed)."""


@dataclass(frozen=True)
class Inherited:
    """One descriptor passed by systemd and the name it was given (``unknown`` when unnamed)."""

    fd: int
    name: str


def listen_fds(env: MutableMapping[str, str] | None = None, *, unset: bool = True) -> list[Inherited]:
    """The descriptors passed to this process, like ``sd_listen_fds()``; [] when none are meant for it."""
    env = os.environ if env is None else env
    pid_text, count_text = env.get("LISTEN_PID"), env.get("LISTEN_FDS")
    names_text = env.get("LISTEN_FDNAMES")
    if unset:
        for var in _VARIABLES:
            env.pop(var, None)
    if not pid_text or count_text is None:
        return []
    try:
        pid, count = int(pid_text), int(count_text)
    except ValueError:
        raise ActivationError(f"LISTEN_PID={pid_text!r} and LISTEN_FDS={count_text!r} must be numbers "
                              "(set by systemd socket activation)") from None
    if pid != os.getpid():
        return []  # meant for another process (we inherited the variables)
    if count < 0:
        raise ActivationError(f"LISTEN_FDS={count_text!r} must not be negative")
    names = names_text.split(":") if names_text else []
    if names_text is not None and len(names) != count:
        raise ActivationError(f"LISTEN_FDNAMES names {len(names)} sockets but LISTEN_FDS={count}")
    out: list[Inherited] = []
    for i in range(count):
        fd = SD_LISTEN_FDS_START + i
        try:
            flags = fcntl.fcntl(fd, fcntl.F_GETFD)
        except OSError:
            raise ActivationError(f"LISTEN_FDS={count} but descriptor {fd} is not open") from None
        fcntl.fcntl(fd, fcntl.F_SETFD, flags | fcntl.FD_CLOEXEC)
        out.append(Inherited(fd, names[i] if names else "unknown"))
    return out


def _describe(fd: int) -> str:
    """What the descriptor is, in words, for the error line."""
    try:
        sock = socket.socket(fileno=os.dup(fd))
    except OSError as exc:
        if exc.errno != errno.ENOTSOCK:
            return f"unusable ({exc.strerror})"
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            target = ""
        return "a pipe" if target.startswith("pipe:") else "not a socket"
    with sock:
        family = {socket.AF_INET: "IPv4", socket.AF_INET6: "IPv6", socket.AF_UNIX: "UNIX"}.get(sock.family, "other")
        if sock.type == socket.SOCK_DGRAM:
            kind = "UDP" if family in ("IPv4", "IPv6") else "datagram"
        elif sock.type == socket.SOCK_STREAM:
            kind = "TCP" if family in ("IPv4", "IPv6") else "stream"
        else:
            kind = "non-stream"
        listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
        article = "an" if family in ("IPv4", "IPv6") else "a"
        what = f"{article} {family} {kind} socket"
        return what + (" that is not listening" if kind == "TCP" and not listening else "")


def _is_listening_tcp(fd: int) -> bool:
    try:
        sock = socket.socket(fileno=os.dup(fd))
    except OSError:
        return False
    with sock:
        return (sock.family in (socket.AF_INET, socket.AF_INET6) and sock.type == socket.SOCK_STREAM
                and bool(sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)))


def inherited_listener(env: MutableMapping[str, str] | None = None) -> socket.socket | None:
    """The one listening TCP socket systemd passed, or None when this process was not socket-activated.

    Raises :class:`ActivationError` (one line) for anything acceptfilter
    cannot serve: several sockets, or one that is not a listening TCP socket.
    """
    passed = listen_fds(env)
    if not passed:
        return None
    if len(passed) > 1:
        names = ", ".join(f"{p.fd} ({p.name})" for p in passed)
        raise ActivationError(f"systemd passed {len(passed)} sockets ({names}); acceptfilter serves one: "
                              "give its .socket unit a single ListenStream=")
    (only,) = passed
    if not _is_listening_tcp(only.fd):
        raise ActivationError(f"the socket systemd passed (fd {only.fd}, {only.name}) is {_describe(only.fd)}; "
                              "acceptfilter needs a listening TCP socket: use ListenStream=HOST:PORT in the .socket unit")
    sock = socket.socket(fileno=only.fd)
    sock.setblocking(True)
    return sock
