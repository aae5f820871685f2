"""sshready: surface a connection once it has sent a whole SSH identification line.

RFC 4253 §4.2: the client sends ``SSH-protoversion-softwareversion SP
comments CR LF`` (at most 255 bytes) as soon as the connection is up, before
or after the server's own line (OpenSSH does not wait). Debian and Ubuntu
add a comment (``SSH-2.0-OpenSSH_9.2p1 Debian-2+deb12u10``), which is why
this filter exists: a routing rule that sent "everything else" to sshd also
sent it garbage, and a "token SP word CRLF" line looked like HTTP/0.9.

``info``: ``protocol`` (``"ssh"``), ``version`` (``"2.0"``, or ``"1.99"``
from old clients), ``software`` and ``comment`` (None when absent).

Rejected at once: first bytes that cannot begin ``SSH-``; a line longer than
255 bytes or without its CR LF by then; a malformed line. At the end (EOF,
deadline) an incomplete line is rejected. Clients that wait for the server to
speak first are silent: route them with ``silent`` (``serve --default``).
"""

from __future__ import annotations

import re

from acceptfilter.filter import WAIT, Decision, Filter

_PREFIX = b"SSH-"
_MAX_LINE = 255  # RFC 4253: the identification string, CR LF included
_LINE = re.compile(rb"SSH-(2\.0|1\.99)-([\x21-\x2c\x2e-\x7e]+)(?: ([\x20-\x7e]*))?\r?\n")


class SshReady(Filter):
    """Wait for the SSH client's identification line (RFC 4253 §4.2)."""

    name = "sshready"

    def __init__(self, *, max_bytes: int = _MAX_LINE, timeout: float | None = None) -> None:
        super().__init__(max_bytes=max(len(_PREFIX), min(max_bytes, _MAX_LINE)), timeout=timeout)

    def check(self, data: bytes, final: bool) -> Decision:
        if len(data) > self.max_bytes:
            data = data[: self.max_bytes]
        n = min(len(data), len(_PREFIX))
        if data[:n] != _PREFIX[:n]:
            return Decision.reject("not an SSH identification line")
        end = data.find(b"\n")
        if end < 0:
            if final or len(data) >= self.max_bytes:
                return Decision.reject("incomplete SSH identification line")
            return WAIT
        match = _LINE.fullmatch(data, 0, end + 1)
        if match is None:
            return Decision.reject("malformed SSH identification line")
        version, software, comment = match.groups()
        return Decision.accept({
            "protocol": "ssh",
            "version": version.decode("ascii"),
            "software": software.decode("ascii"),
            "comment": comment.decode("ascii") if comment else None,
        })
