"""httpready: surface a connection once it has sent a complete HTTP request head.

FreeBSD's accf_http(9) holds only ``GET``/``HEAD`` and looks for the head's
end only at the tail of the buffer. This one:

* holds every method (POST and PUT heads are what slow uploads start with);
* finds the end of the head (``\\r\\n\\r\\n``, or a bare ``\\n\\n``/``\\n\\r\\n``)
  anywhere in the buffer, so a GET with a body or a pipelined second request
  does not keep the first one waiting;
* surfaces an HTTP/0.9 simple request at its line end — ``GET`` only, as
  RFC 1945 defines it, with a path or absolute URI (``SSH-2.0-OpenSSH_9.2p1
  Debian-2\\r\\n``, ``EHLO x\\r\\n`` or redis's ``GET key\\r\\n`` look like
  "token SP word CRLF" too, and are not HTTP);
* recognises the HTTP/2 prior-knowledge preface and surfaces it whole;
* rejects first bytes that cannot be HTTP (TLS, SSH, one NUL byte) at once
  (``non_http=reject``, the default). FreeBSD passes them through instead;
  ``non_http=accept`` does that, but then one garbage byte is enough to get
  a connection past the filter and pin a worker of a thread- or
  process-per-connection server, which is what the filter is there to
  prevent. Behind a router either setting means "no match" for this route;
* scans each byte once per connection (incremental state), never the whole
  head again on each arrival;
* with ``body=N``, also waits for a request body of at most N bytes when the
  head has a valid ``Content-Length`` (slow uploads then wait here, not in a
  worker); a chunked body, a larger one, or one that would not fit in
  ``max_bytes`` is surfaced at the end of the head (``info["body"]`` says
  ``"complete"`` or ``"not awaited"``). So is a head carrying
  ``Expect: 100-continue`` (``info["expect"]``): its client holds the body back
  until the server answers ``100 Continue`` (curl does for uploads over 1 MB),
  so waiting for it here would wait for the deadline.

``info`` carries ``method``, ``target``, ``version`` and ``host`` (``protocol``
is ``"http/1"``, ``"http/0.9"``, ``"h2"`` or ``"unknown"`` for passed non-HTTP).

At the end (EOF, deadline, cap) an incomplete head is rejected, so the
engine's timeout policy decides about idle and slow clients; a head larger
than ``max_bytes`` is rejected unless ``oversize=accept`` lets the
application answer it (with 431, say).
"""

from __future__ import annotations

import re
from typing import Any

from acceptfilter.filter import DEFAULT_MAX_BYTES, WAIT, Decision, Filter
from acceptfilter.matcher import Builder, Program, byte_range

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

# RFC 9110 token characters (a method is a token).
_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]*")
_MAX_METHOD = 32
# The request line once its end is known: method SP target [SP HTTP/x.y].
_REQUEST_LINE = re.compile(rb"([!#$%&'*+.^_`|~0-9A-Za-z-]+) ([\x21-\x7e]+)(?: (HTTP/[0-9]\.[0-9]))?\r?$")
# An HTTP/0.9 Request-URI: an abs_path or an absoluteURI (scheme "://").
_SIMPLE_URI = re.compile(rb"/|[A-Za-z][A-Za-z0-9+.-]*://")
_HOST = re.compile(rb"^host[ \t]*:[ \t]*([^\r\n]*?)[ \t]*\r?$", re.IGNORECASE | re.MULTILINE)
_CONTENT_LENGTH = re.compile(rb"^content-length[ \t]*:[ \t]*([^\r\n]*?)[ \t]*\r?$", re.IGNORECASE | re.MULTILINE)
_TRANSFER_ENCODING = re.compile(rb"^transfer-encoding[ \t]*:", re.IGNORECASE | re.MULTILINE)
# RFC 9110 10.1.1: 100-continue is the only expectation; its value is case-insensitive.
_EXPECT_CONTINUE = re.compile(rb"^expect[ \t]*:[ \t]*100-continue[ \t]*\r?$", re.IGNORECASE | re.MULTILINE)


class HttpReady(Filter):
    """Wait for a complete HTTP request head (any method, HTTP/0.9, h2 preface)."""

    name = "httpready"
    #: A head not complete by the deadline is answered, as nginx, Apache (mod_reqtimeout)
    #: and HAProxy answer one, before the close: the client learns why, a browser retries.
    timeout_reply = b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"

    def __init__(
        self,
        *,
        non_http: str = "reject",
        oversize: str = "reject",
        body: int = 0,
        max_bytes: int = DEFAULT_MAX_BYTES,
        timeout: float | None = None,
    ) -> None:
        super().__init__(max_bytes=max_bytes, timeout=timeout)
        if non_http not in ("accept", "reject"):
            raise ValueError(f"non_http must be 'accept' or 'reject', not {non_http!r}")
        if oversize not in ("accept", "reject"):
            raise ValueError(f"oversize must be 'accept' or 'reject', not {oversize!r}")
        if body < 0:
            raise ValueError(f"body must be a byte count >= 0, not {body}")
        self.non_http = non_http
        self.oversize = oversize
        #: Wait for a Content-Length body of at most this many bytes (0: never).
        self.body = body

    def session(self) -> _HttpSession:
        return _HttpSession(self)

    def check(self, data: bytes, final: bool) -> Decision:
        """One-shot check (a fresh session): handy in tests and the REPL."""
        return _HttpSession(self).check(data, final)

    def matcher(self) -> Program | None:
        """Compiled: a complete ``METHOD SP target SP HTTP/1.0|1.1 CRLF ... CRLF CRLF`` head; None with ``body=N``.

        The request line's shape (a 1..32-byte token, a space, a printable target,
        `` HTTP/1.0`` or `` HTTP/1.1``, CRLF) starts at byte 0, then the head's end -- the first
        CRLF CRLF (counting the request line's own CRLF), with no bare-LF end before it -- lies
        within ``max_bytes``. Nothing else is certified: bare-LF heads, other versions, HTTP/0.9 lines, the h2 preface, leading
        empty lines and non-HTTP bytes are left to :meth:`check`, so the matcher stays sound
        whatever those rules become. ``body=N`` may wait past the head: no matcher. Whether it
        does depends on two headers in any letter case (``Content-Length``, and
        ``Expect: 100-continue``, which makes the head ready at its end), and the bytecode has
        no case-insensitive search to certify either; the check decides those heads.
        """
        if self.body:
            return None
        token = b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
        b = Builder(self.max_bytes)
        b.run(token, 1, _MAX_METHOD).lit(b" ").run(byte_range(0x21, 0x7E), 1, self.max_bytes)
        b.lit(b" HTTP/1.").run(b"01", 1, 1).lit(b"\r\n")
        # The check ends the head at the first LF LF or LF CR LF: found before a CRLF CRLF (a bare-LF
        # line end), the matcher must say NO -- not MORE, which would hold the connection from Python.
        return b.search([b"\r\n\r\n"], fail=[b"\n\n", b"\n\r\n"], back=2).ready().build()


class _HttpSession:
    """Per-connection scan state; every byte is looked at a bounded number of times."""

    __slots__ = ("_decided", "_filter", "_line", "_line_end", "_need", "_pending", "_scanned", "_start")

    def __init__(self, flt: HttpReady) -> None:
        self._filter = flt
        self._start = -1  # offset of the request line (after leading empty lines)
        self._line_end = -1  # offset of the request line's "\n"
        self._scanned = 0  # bytes already searched for the end of the head
        self._decided: Decision | None = None
        self._need = -1  # with body=N: bytes needed for head + body, once the head is complete
        self._pending: Decision | None = None  # the ACCEPT to give once the body is there
        self._line: tuple[bytes, bytes, bytes | None] | None = None  # the request line's parts, once matched

    def check(self, data: bytes, final: bool) -> Decision:
        if self._decided is not None:
            return self._decided
        if len(data) > self._filter.max_bytes:
            data = data[: self._filter.max_bytes]  # decide on the cap, however TCP split it
        if self._pending is not None:
            decision = self._pending if len(data) >= self._need else WAIT
            if decision is WAIT and final:
                decision = Decision.reject("incomplete request body")
        else:
            decision = self._scan(data)
        if decision is WAIT and (final or len(data) >= self._filter.max_bytes):
            decision = self._incomplete(data)
        if decision.decided:
            self._decided = decision
        return decision

    def _incomplete(self, data: bytes) -> Decision:
        if len(data) >= self._filter.max_bytes and self._filter.oversize == "accept":
            return Decision.accept(self._line_info(data), reason="head larger than max_bytes")
        if len(data) >= self._filter.max_bytes:
            return Decision.reject(f"request head larger than max_bytes={self._filter.max_bytes}")
        return Decision.reject("incomplete request head")

    def _non_http(self, why: str) -> Decision:
        if self._filter.non_http == "reject":
            return Decision.reject(f"not HTTP: {why}")
        return Decision.pass_through({"protocol": "unknown"}, reason=f"not HTTP ({why}), passed")

    def _scan(self, data: bytes) -> Decision:
        if self._start < 0:
            start = 0
            while data.startswith((b"\r\n", b"\n"), start):
                start += 2 if data[start] == 0x0D else 1
            if start >= len(data) or data[start:] == b"\r":
                return WAIT
            self._start = start
        start = self._start
        if self._line_end < 0:
            verdict = self._request_line(data, start)
            if verdict is not None:
                return verdict
        # The request line is complete and HTTP/1.x: look for the empty line.
        # Resume two bytes back so a terminator split across arrivals is found.
        pos = max(self._line_end, self._scanned - 2)
        end = _find_head_end(data, pos)
        if end < 0:
            self._scanned = len(data)
            return WAIT
        return self._complete(data, end)

    def _request_line(self, data: bytes, start: int) -> Decision | None:
        """Decide what can be decided before the head's end; None to keep scanning."""
        head = data[start : start + len(H2_PREFACE)]
        if H2_PREFACE.startswith(head):
            if len(head) < len(H2_PREFACE):
                return WAIT
            return Decision.accept({"protocol": "h2", "method": "PRI", "target": "*", "version": "HTTP/2.0"})
        # The method must be a token followed by a space.
        limit = min(len(data), start + _MAX_METHOD + 1)
        i = _TOKEN.match(data, start, limit).end()  # type: ignore[union-attr]  # `*` always matches
        if i == limit:
            return WAIT if i == len(data) and i - start <= _MAX_METHOD else self._non_http("method too long")
        if data[i] != 0x20 or i == start:
            return self._non_http("no method token")
        nl = data.find(b"\n", i, start + self._filter.max_bytes)
        if nl < 0:
            # Reject early what can never become a request line.
            if any(b < 0x20 or b == 0x7F for b in data[i + 1 : i + 1 + 64] if b not in (0x20, 0x0D)):
                return self._non_http("control byte in request line")
            return WAIT
        match = _REQUEST_LINE.match(data, start, nl)
        if match is None:
            return self._non_http("malformed request line")
        self._line_end = nl
        self._scanned = nl
        self._line = (match.group(1), match.group(2), match.group(3))
        if match.group(3) is None:  # HTTP/0.9: the line is the whole request
            if match.group(1) != b"GET" or not _SIMPLE_URI.match(match.group(2)):
                # RFC 1945: Simple-Request = "GET" SP Request-URI CRLF, the URI an
                # abs_path or an absoluteURI; redis's inline "GET key" is neither.
                return self._non_http("a request line without a version is HTTP/0.9: GET and a URI only")
            return Decision.accept(self._line_info(data), reason="HTTP/0.9 request line")
        return None

    def _line_info(self, data: bytes) -> dict[str, Any]:
        if self._line is not None:
            raw_method, raw_target, raw_version = self._line
            return {
                "protocol": "http/1" if raw_version else "http/0.9",
                "method": raw_method.decode("latin-1"),
                "target": raw_target.decode("latin-1"),
                "version": raw_version.decode("latin-1") if raw_version else "HTTP/0.9",
            }
        start = max(self._start, 0)
        nl = self._line_end if self._line_end >= 0 else data.find(b"\n", start)
        line = data[start : nl if nl >= 0 else len(data)]
        match = _REQUEST_LINE.match(line)
        if match is None:
            return {"protocol": "http/1"}
        method, target, version = (g.decode("latin-1") if g else None for g in match.groups())
        return {
            "protocol": "http/1" if version else "http/0.9",
            "method": method,
            "target": target,
            "version": version or "HTTP/0.9",
        }

    def _complete(self, data: bytes, end: int) -> Decision:
        info = self._line_info(data)
        host = _HOST.search(data, self._line_end + 1, end)
        info["host"] = host.group(1).decode("latin-1") if host else None
        if not self._filter.body:
            return Decision.accept(info)
        length = self._body_length(data, end)
        if length is None or length > self._filter.body or end + length > self._filter.max_bytes:
            info["body"] = "not awaited"
            return Decision.accept(info)
        if _EXPECT_CONTINUE.search(data, self._line_end + 1, end):
            # The client sends the body only once the server answers 100 Continue.
            info["body"] = "not awaited"
            info["expect"] = "100-continue"
            return Decision.accept(info, reason="Expect: 100-continue: the body follows the server's 100")
        info["body"] = "complete"
        info["content_length"] = length
        self._pending = Decision.accept(info)
        self._need = end + length
        return self._pending if len(data) >= self._need else WAIT

    def _body_length(self, data: bytes, end: int) -> int | None:
        """A single valid Content-Length without Transfer-Encoding, else None (not awaited)."""
        if _TRANSFER_ENCODING.search(data, self._line_end + 1, end):
            return None
        values = {m.group(1) for m in _CONTENT_LENGTH.finditer(data, self._line_end + 1, end)}
        if len(values) != 1:
            return None
        raw = values.pop()
        return int(raw) if raw.isdigit() and len(raw) <= 12 else None


def _find_head_end(data: bytes, pos: int) -> int:
    """Offset just past the first empty line (``\\n\\n`` or ``\\n\\r\\n``) at or after ``pos``, or -1."""
    lf = data.find(b"\n\n", pos)
    crlf = data.find(b"\n\r\n", pos, lf + 1 if lf >= 0 else len(data))
    if crlf >= 0:
        return crlf + 3
    return lf + 2 if lf >= 0 else -1
