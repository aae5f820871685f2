"""Exceptions with messages that say what went wrong and what to do."""

from __future__ import annotations

import errno
import socket

__all__ = [
    "AcceptFilterError",
    "FilterLoadError",
    "FilterSpecError",
    "UnknownFilterError",
    "listen_error",
]


class AcceptFilterError(Exception):
    """Base class of every error this package raises on purpose."""


class FilterSpecError(AcceptFilterError, ValueError):
    """A filter spec string is malformed or names arguments the filter lacks."""


class UnknownFilterError(AcceptFilterError, LookupError):
    """No filter of that name is registered under ``acceptfilter.filters``."""


class FilterLoadError(AcceptFilterError, ImportError):
    """A registered filter's entry point failed to load (a broken plugin)."""


def listen_error(where: str, exc: OSError, option: str) -> AcceptFilterError:
    """One line for a bind() that failed at ``where``, naming the ``option`` to change."""
    if exc.errno == errno.EADDRINUSE:
        return AcceptFilterError(f"cannot listen on {where}: the port is already in use; stop the other server or pick another {option}")
    if exc.errno in (errno.EACCES, errno.EPERM):
        if where.startswith("unix:"):
            return AcceptFilterError(f"cannot listen on {where}: permission denied (the socket's folder must be "
                                     "writable and every folder above it searchable by this user)")
        return AcceptFilterError(f"cannot listen on {where}: permission denied (ports below 1024 need privileges)")
    if exc.errno in (errno.ENOENT, errno.ENOTDIR) and where.startswith("unix:"):
        return AcceptFilterError(f"cannot listen on {where}: no such folder")
    if isinstance(exc, socket.gaierror) or exc.errno == errno.EADDRNOTAVAIL:  # a name or an address not here
        return AcceptFilterError(f"cannot listen on {where}: no such local address")
    return AcceptFilterError(f"cannot listen on {where}: {exc.strerror or exc}")
