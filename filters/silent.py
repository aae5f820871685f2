"""silent: match a client that has said nothing when its deadline passes (a server-first protocol).

SSH clients that wait for the banner, SMTP, MySQL, FTP: the client connects
and waits for the server to speak, so no filter can recognise it from its
bytes. sslh and Envoy users route such clients "on timeout". As a route's
filter this says exactly that: it waits while nothing has arrived, rejects as
soon as any byte arrives (that client is not silent: another route, or the
reject policy, decides), and at the end (deadline, eviction) accepts the
connection that is still silent. ``to=NAME`` labels it for route NAME (a
route with filters of its own, e.g. ``sshready`` for the SSH clients that do
speak first), so both kinds of client reach one place.

``acceptfilter serve --default NAME`` builds its default route from this
filter, so a half-sent command or garbage that every route rejected does not
reach the silent route's backend: it gets ``--on-reject`` instead. (A
connection that closes having sent nothing is closed by the engine before
any filter sees it.)
"""

from __future__ import annotations

from acceptfilter.filter import ACCEPT, WAIT, Decision, Filter


class Silent(Filter):
    """Accept, at the deadline, a connection that has sent nothing; reject any that sends a byte."""

    name = "silent"
    accepts_silence = True

    def __init__(self, *, to: str = "", max_bytes: int = 1, timeout: float | None = None) -> None:
        super().__init__(max_bytes=max(1, max_bytes), timeout=timeout)
        self.to = to.strip() or None
        self._accept = ACCEPT if self.to is None else Decision.accept(route=self.to, reason="silent until the deadline")

    def check(self, data: bytes, final: bool) -> Decision:
        if data:
            return Decision.reject("the client spoke first: not a server-first (silent) client")
        return self._accept if final else WAIT
