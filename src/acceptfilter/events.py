"""What an I/O core reports: event kinds and the event tuple, shared by every core.

Its own module so that the cores (``iocore``, ``pycore``) and the engine
depend on it and not on each other.
"""

from __future__ import annotations

import errno
from typing import Any

__all__ = ["DATA", "EOF", "ERROR", "EVICT", "FULL", "KIND_NAMES", "MAX_BYTES", "PEER_ERRNOS", "SHUTDOWN", "TIMEOUT", "Address",
           "Event"]

DATA, EOF, FULL, TIMEOUT, EVICT, ERROR, SHUTDOWN, READY = range(1, 9)
KIND_NAMES = {DATA: "data", EOF: "eof", FULL: "full", TIMEOUT: "timeout", EVICT: "evict", ERROR: "error",
              SHUTDOWN: "shutdown", READY: "ready"}

#: (fd, kind, arg, peeked bytes, seconds since accept); arg is the errno of an ERROR
#: and the bytes to consume of a READY (the matcher certified the bytes).
Event = tuple[int, int, int, bytes, float]
#: A connection the matcher certified and the core released already, counted, for
#: ``IOCore.accept_ready``'s caller: (fd, address, the bytes it had sent, consumed header
#: included, consume, seconds since accept).
Ready = tuple[int, Any, bytes, int, float]
Address = Any  # what socket.accept() would return as the address

#: The most bytes a core will peek per connection (the C core's AF_MAX_BYTES); larger caps are clamped.
MAX_BYTES = 1 << 30

#: Errors a connection gets from its peer or the network, not from this process: a reset
#: (HAProxy's health checks end with one), a FIN read while consuming, a keepalive or
#: retransmission timeout, an ICMP "unreachable". A held connection that ends with one
#: before a decision is ``aborted``; any other errno (ENOMEM, EBADF ...) is ``failed``.
PEER_ERRNOS = frozenset({errno.ECONNRESET, errno.EPIPE, errno.ECONNABORTED, errno.ETIMEDOUT, errno.EHOSTUNREACH,
                         errno.ENETUNREACH, errno.ENETDOWN, errno.EHOSTDOWN, errno.ECONNREFUSED, errno.ENOTCONN})
