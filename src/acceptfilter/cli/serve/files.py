"""The file server of ``acceptfilter serve``: http.server's, with one-line errors and access lines through logging."""

from __future__ import annotations

import errno
import http.server
import logging
import mimetypes
import sys
from typing import Any

access_log = logging.getLogger("acceptfilter.access")
log = logging.getLogger("acceptfilter")

#: The file-system errors that mean "no such file" (404); EACCES/EPERM are 403; any other is the server's (503).
NOT_FOUND = frozenset({errno.ENOENT, errno.ENOTDIR, errno.ENAMETOOLONG, errno.ELOOP})
FORBIDDEN = frozenset({errno.EACCES, errno.EPERM})


class FileServer(http.server.ThreadingHTTPServer):
    """ThreadingHTTPServer that reports a client gone mid-answer in one line, not a traceback.

    Under a flood, clients that reset or stop reading made the stock server
    print a BrokenPipeError/ConnectionResetError traceback per connection.
    """

    def server_activate(self) -> None:
        # mimetypes reads its tables on the first request otherwise: at the fd limit that raised from
        # guess_type (a traceback, no answer). Read them now, while descriptors are there.
        mimetypes.init()
        super().server_activate()

    def handle_error(self, request: Any, client_address: Any) -> None:
        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, TimeoutError)):
            client = client_address[0] if isinstance(client_address, tuple) and client_address else "unix"
            access_log.info("%s - - client went away: %s", client, type(exc).__name__,
                            extra={"fields": {"type": "access", "client": str(client), "error": type(exc).__name__}})
            return
        super().handle_error(request, client_address)


class FileHandler(http.server.SimpleHTTPRequestHandler):
    """SimpleHTTPRequestHandler whose access lines go to the ``acceptfilter.access`` logger.

    Through logging, they share stderr with the status line without tearing it
    (see :mod:`.console`) and follow ``--log-format``. Each line also says why the
    connection was surfaced and how long it was held.

    A percent-encoded NUL in the path (``GET /%00/``) made the stock handler raise
    ``ValueError: embedded null byte`` from ``open()`` (a traceback, and no answer
    for the client); it gets a 400 here. (A raw NUL never gets past httpready.)

    http.server answers 404 for *any* ``OSError`` of ``open()`` or ``listdir()``:
    at the fd limit (EMFILE) a file that exists was "not found". Here only
    ENOENT/ENOTDIR (and a name too long, a symlink loop) is 404, EACCES/EPERM
    403, and anything else (EMFILE, ENFILE, EIO, ENOMEM...) is the server's
    trouble: ``503 Service Unavailable`` and one log line that names the cause.
    """

    def send_head(self) -> Any:
        if "\x00" in self.path or "%00" in self.path.lower():
            self.send_error(400, "NUL byte in the path")
            return None
        try:
            return super().send_head()
        except ValueError:  # another path open() cannot take
            self.send_error(400, "bad path")
            return None
        except OSError as exc:  # outside http.server's own except clauses (mimetypes, fstat, stat)
            self._file_system_error(exc)
            return None

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        # http.server calls send_error(404) from inside `except OSError:`: the error it is handling tells
        # what really happened.
        exc = sys.exc_info()[1]
        if code == 404 and isinstance(exc, OSError) and exc.errno not in NOT_FOUND:
            self._file_system_error(exc)
            return
        super().send_error(code, message, explain)

    def _file_system_error(self, exc: OSError) -> None:
        if exc.errno in NOT_FOUND:
            super().send_error(404, "File not found")
        elif exc.errno in FORBIDDEN:
            super().send_error(403, "Forbidden")
        else:
            name = errno.errorcode.get(exc.errno or 0, "no errno")
            log.warning("cannot serve %s: %s (%s); answered 503", self.path, exc.strerror or exc, name,
                        extra={"fields": {"type": "event", "event": "file_system_error", "path": self.path,
                                          "errno": name}})
            super().send_error(503, "Service Unavailable", "The server cannot read files right now; try again.")

    #: send_error()'s message, told in the access record of the answer it makes (one record per request).
    _error_message: str | None = None

    def log_error(self, format: str, *args: Any) -> None:
        if format == "code %d, message %s" and len(args) == 2:  # send_error(): log_request() follows
            self._error_message = str(args[1])
            return
        super().log_error(format, *args)

    def address_string(self) -> str:
        addr = self.client_address
        return str(addr[0]) if isinstance(addr, tuple) and addr else "unix"

    def log_message(self, format: str, *args: Any) -> None:
        from ...listener import connection_info

        info = connection_info(self.request)
        why = f" [{info.reason}, held {info.held_for * 1000:.1f} ms]" if info else ""
        fields: dict[str, Any] = {"client": self.address_string(), "request": getattr(self, "requestline", "")}
        if format == '"%s" %s %s' and len(args) == 3:  # log_request(): the request, its status and size
            fields["status"], fields["size"] = str(args[1]), str(args[2])
            if self._error_message is not None:
                fields["error"] = self._error_message
                self._error_message = None
        if info:
            fields["reason"], fields["held_ms"] = info.reason, round(info.held_for * 1000, 3)
        access_log.info("%s - - [%s] %s%s", self.address_string(), self.log_date_time_string(), format % args, why,
                        extra={"fields": {"type": "access", **fields}})
