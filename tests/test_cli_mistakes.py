"""Every mistake a user makes on the command line: exactly one line on stderr, a non-zero status, no traceback.

One table, run as a user runs the command (``python -m acceptfilter.cli`` in a subprocess).
``{taken}`` is a port another socket listens on, ``{silent}`` one nobody listens on.
"""

from __future__ import annotations

import ctypes
import os
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

PR_CAPBSET_DROP, CAP_NET_BIND_SERVICE = 24, 10

MISTAKES: list[tuple[str, list[str], str]] = [
    ("unknown filter", ["serve", "--filter", "nope"], "unknown filter 'nope'"),
    ("filter typo", ["serve", "--filter", "htpready"], "unknown filter 'htpready' (did you mean 'httpready'?)"),
    ("unknown argument", ["serve", "--filter", "httpready:bogus=1"], "has no argument 'bogus'"),
    ("argument typo", ["serve", "--filter", "httpready:timout=5"], "(did you mean 'timeout'?)"),
    ("bad value in a spec", ["serve", "--filter", "httpready:max_bytes=abc"], "max_bytes='abc' in spec 'httpready:max_bytes=abc' is not valid: expected a whole number"),
    ("bad float in a spec", ["serve", "--filter", "httpready:timeout=soon"], "expected a number (like 5 or 0.5)"),
    ("empty spec", ["serve", "--filter", ""], "empty filter name"),
    ("spec with a colon and nothing after", ["serve", "--filter", "httpready:"], "no arguments after it"),
    ("bad port", ["serve", "--port", "abc"], "argument --port/-p: takes a whole number, not 'abc'"),
    ("port out of range", ["serve", "--port", "70000"], "must be between 0 and 65535, not 70000"),
    ("bad timeout", ["serve", "--timeout", "soon"], "argument --timeout: takes a number of seconds"),
    ("zero max-held", ["serve", "--max-held", "0"], "argument --max-held: must be at least 1, not 0"),
    ("port in use", ["serve", "--port", "{taken}"], "cannot listen on 127.0.0.1:{taken}: the port is already in use"),
    ("privileged port", ["serve", "--port", "80"], "cannot listen on 127.0.0.1:80: permission denied"),
    ("no such directory", ["serve", "--directory", "/no/such/dir"], "--directory '/no/such/dir' is not a directory"),
    ("unknown on-timeout", ["serve", "--on-timeout", "later"], "takes surface, close, reset or route:NAME, not 'later'"),
    ("on-timeout route without routes", ["serve", "--on-timeout", "route:ssh"], "--on-timeout route:ssh needs --route"),
    ("on-timeout route that does not exist", ["serve", "--route", "http=httpready", "--on-timeout", "route:ssh"],
     "--on-timeout route:ssh: 'ssh' is not one of the routes: http"),
    ("serve-route without routes", ["serve", "--serve-route", "web"], "--serve-route web needs --route"),
    ("forward to a host that does not resolve",
     ["serve", "--route", "http=httpready", "--route", "t=tlsready", "--forward", "t=no-such-host.invalid:443"],
     "--forward t=no-such-host.invalid:443: cannot resolve 'no-such-host.invalid'"),
    ("unix socket without a path", ["serve", "--bind", "unix:"], "--bind unix:PATH needs a path"),
    ("defer-accept on a unix socket", ["serve", "--bind", "unix:/tmp/af-defer.sock", "--defer-accept", "1"],
     "--defer-accept is TCP_DEFER_ACCEPT, for TCP: not with --bind unix:PATH"),
    ("negative defer-accept", ["serve", "--defer-accept", "-1"], "argument --defer-accept: must be 0 or more, not -1"),
    ("address not on this machine", ["serve", "--bind", "192.0.2.1"], "cannot listen on 192.0.2.1:"),
    ("unknown option", ["serve", "--colour", "red"], "unrecognized arguments: --colour red"),
    ("option typo", ["serve", "--timout", "5"], "unrecognized arguments: --timout 5 (did you mean '--timeout'?)"),
    ("unknown command", ["serv"], "invalid choice: 'serv'"),
    ("command typo", ["fuz", "all"], "(did you mean 'fuzz'?)"),
    ("stats on a silent port", ["stats", "{silent}"], "nothing is listening on port {silent}"),
    ("stats with a bad backlog", ["stats", "8000", "--backlog", "lots"], "argument --backlog: takes a whole number, not 'lots'"),
    ("top with a zero interval", ["top", "--interval", "0"], "argument --interval/-i: must be more than 0 seconds"),
    ("fuzz an unknown filter", ["fuzz", "nosuchfilter"], "unknown filter 'nosuchfilter'"),
    ("fuzz with no examples", ["fuzz", "dataready", "--examples", "0"], "argument --examples: must be at least 1, not 0"),
    ("fuzz with a missing payload file", ["fuzz", "dataready", "--payloads", "/no/such/seeds"], "--payloads /no/such/seeds: no such file or directory"),
    ("run without a server", ["run"], "give the server command after --"),
    ("run with a route policy", ["run", "--on-timeout", "route:x", "--", "uvicorn", "app:app"], "acceptfilter run has no routes"),
    ("run with a bad metrics port", ["run", "--metrics-port", "lots", "--", "uvicorn", "app:app"],
     "--metrics-port takes PORT or HOST:PORT, not 'lots'"),
    ("serve --workers with the metrics port in use", ["serve", "--workers", "2", "--metrics-port", "{taken}"],
     "cannot listen on 127.0.0.1:{taken}: the port is already in use; stop the other server or pick another --metrics-port"),
    ("metrics of port 0", ["metrics", "0"], "PORT must be between 1 and 65535"),
    ("metrics served on a port in use", ["metrics", "8000", "--serve", "{taken}"],
     "the port is already in use; stop the other server or pick another --serve"),
]


def _no_bind_privilege() -> None:
    """In the child, before exec: drop CAP_NET_BIND_SERVICE, so root gets EACCES on port 80 like a user."""
    if os.geteuid() == 0:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_CAPBSET_DROP, CAP_NET_BIND_SERVICE, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


@pytest.fixture
def ports() -> Iterator[dict[str, str]]:
    taken = socket.create_server(("127.0.0.1", 0))
    with socket.create_server(("127.0.0.1", 0)) as free:
        silent = free.getsockname()[1]
    yield {"taken": str(taken.getsockname()[1]), "silent": str(silent)}
    taken.close()


@pytest.mark.parametrize(("args", "message"), [(a, m) for _, a, m in MISTAKES], ids=[n for n, _, _ in MISTAKES])
def test_mistake_is_one_line(args: list[str], message: str, ports: dict[str, str], tmp_path: Path) -> None:
    argv = [a.format(**ports) for a in args]
    if argv[0] == "serve":
        argv += ["--no-status", "--directory", str(tmp_path)] if "--directory" not in argv else ["--no-status"]
        argv += [] if "--port" in argv else ["--port", "0"]
    preexec: Callable[[], None] | None = _no_bind_privilege if "80" in argv else None
    out = subprocess.run([sys.executable, "-m", "acceptfilter.cli", *argv], capture_output=True, text=True,
                         timeout=60, preexec_fn=preexec, cwd=tmp_path)
    assert out.returncode != 0, (out.stdout, out.stderr)
    assert "Traceback" not in out.stderr, out.stderr
    assert out.stderr.count("\n") == 1 and out.stderr.endswith("\n"), repr(out.stderr)
    assert out.stderr.startswith("acceptfilter: "), out.stderr
    assert message.format(**ports) in out.stderr
    assert "invalid literal" not in out.stderr and "int()" not in out.stderr  # never Python's wording


def test_on_timeout_help_names_every_action() -> None:
    """Issue 15, item 8: route:NAME was missing from --on-timeout's help."""
    out = subprocess.run([sys.executable, "-m", "acceptfilter.cli", "serve", "--help"], capture_output=True, text=True,
                         timeout=60, env={**os.environ, "COLUMNS": "400"})
    line = next(ln for ln in out.stdout.splitlines() if ln.strip().startswith("--on-timeout"))
    assert all(word in line for word in ("surface", "close", "reset", "route:NAME")), line
