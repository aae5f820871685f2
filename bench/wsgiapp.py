"""The trivial WSGI app the slow-client benchmark serves with gunicorn."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

BODY = b"ok"


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(BODY)))])
    return [BODY]
