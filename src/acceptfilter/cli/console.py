"""stderr shared by the live status line and the log lines, and the log formats.

On a terminal ``serve`` redraws one status line in place (``\\r`` + erase). A log
line written while that line is on screen would be glued to it
(``kernel queue 0/1024127.0.0.1 - - [...] "GET / HTTP/1.1" 200``), so every
write goes through one :class:`Console`: it erases the status line, writes the
log line, and draws the status line again below it. Off a terminal the status
is a plain ``status: ...`` log line like any other.

``--log-format json`` makes every line (access, events, status) one JSON object,
for log shippers.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from typing import Any, TextIO

__all__ = ["Console", "ConsoleHandler", "JsonFormatter", "configure_logging", "console"]

_ERASE = "\r\x1b[K"


class Console:
    """Serialises writes to one stream; keeps a redrawable status line at the bottom of a terminal."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self._stream = stream
        self._lock = threading.Lock()
        self._status = ""

    @property
    def stream(self) -> TextIO:
        return self._stream if self._stream is not None else sys.stderr

    def isatty(self) -> bool:
        try:
            return self.stream.isatty()
        except (AttributeError, ValueError):
            return False

    def line(self, text: str) -> None:
        """Write one whole line, above the status line if one is shown."""
        with self._lock:
            stream = self.stream
            try:
                if self._status:
                    stream.write(_ERASE)
                stream.write(text + "\n")
                if self._status:
                    stream.write(self._status)
                stream.flush()
            except (OSError, ValueError):  # stderr closed or gone: nothing left to tell
                pass

    def status(self, text: str) -> None:
        """Show ``text`` as the status: in place on a terminal, else as a ``status:`` line."""
        if not self.isatty():
            self.line(f"status: {text}")
            return
        with self._lock:
            self._status = text
            try:
                self.stream.write(_ERASE + text)
                self.stream.flush()
            except (OSError, ValueError):
                pass

    def clear_status(self) -> None:
        """Erase the status line (before the program's last words)."""
        with self._lock:
            if self._status:
                self._status = ""
                try:
                    self.stream.write(_ERASE)
                    self.stream.flush()
                except (OSError, ValueError):
                    pass


#: The process's one console on stderr.
console = Console()


class ConsoleHandler(logging.Handler):
    """A logging handler that writes through :data:`console`, so logs never tear the status line."""

    def __init__(self, target: Console | None = None) -> None:
        super().__init__()
        self.target = target or console

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.target.line(self.format(record))
        except Exception:
            self.handleError(record)


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ``ts``, ``level``, ``logger``, ``message`` and the record's ``fields``.

    Access lines carry their fields (client, request, status, reason, held_ms) in
    ``extra={"fields": {...}}``, so a log shipper gets them as keys, not as text to parse.
    """

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            out.update(fields)
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


class _TextFormatter(logging.Formatter):
    """Access lines as they are (http.server's format); other records with time, logger and level."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(name)s %(levelname)s %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        if record.name in ("acceptfilter.access", "acceptfilter.status"):
            return record.getMessage()
        return super().format(record)


def configure_logging(verbose: int, log_format: str = "text") -> None:
    """Logging for the command: -v is INFO, -vv DEBUG, for acceptfilter's loggers only.

    Other libraries (pyroute2, asyncio) stay at WARNING: their debug output would
    drown ours. Access lines (``acceptfilter.access``) are always on.
    """
    handler = ConsoleHandler()
    handler.setFormatter(JsonFormatter() if log_format == "json" else _TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    logging.getLogger("acceptfilter").setLevel(logging.WARNING - 10 * min(verbose, 2))
    logging.getLogger("acceptfilter.access").setLevel(logging.INFO)
    logging.getLogger("acceptfilter.status").setLevel(logging.INFO)
