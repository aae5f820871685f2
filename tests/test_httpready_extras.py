"""httpready extras: body=N waits for a Content-Length body; the h2 preface is recognised."""

from __future__ import annotations

import socket
import subprocess
import threading
import time

import pytest
from acceptfilter.filters.httpready import H2_PREFACE, HttpReady

from acceptfilter import Verdict, load_filter
from acceptfilter.listener import wrap

from .filterutil import assert_split_independent

A, R, W = Verdict.ACCEPT, Verdict.REJECT, Verdict.WAIT
HEAD = b"POST /up HTTP/1.1\r\nHost: h\r\nContent-Length: 11\r\n\r\n"


def test_body_waited_for_and_split_independent() -> None:
    flt = load_filter("httpready:body=100")
    d = assert_split_independent(flt, HEAD + b"hello world")
    assert d.verdict is A and d.info["body"] == "complete" and d.info["content_length"] == 11
    assert flt.check(HEAD + b"hello", False).verdict is W
    assert flt.check(HEAD + b"hello", True).verdict is R  # EOF/deadline mid-body
    assert HttpReady().check(HEAD, False).verdict is A  # default: at the head, as before
    assert "body" not in HttpReady().check(HEAD, False).info


@pytest.mark.parametrize(
    "head",
    [
        b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",  # chunked passes at the head
        b"POST / HTTP/1.1\r\nContent-Length: 1000\r\n\r\n",  # larger than body=100
        b"POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",  # conflicting
        b"POST / HTTP/1.1\r\nContent-Length: -5\r\n\r\n",
        b"GET / HTTP/1.1\r\n\r\n",  # no body
    ],
)
def test_body_not_awaited(head: bytes) -> None:
    d = HttpReady(body=100).check(head, False)
    assert d.verdict is A and d.info.get("body", "not awaited") == "not awaited"


def test_body_never_waits_past_the_cap() -> None:
    flt = HttpReady(body=1000, max_bytes=80)
    head = b"POST / HTTP/1.1\r\nContent-Length: 60\r\n\r\n"
    assert flt.check(head, False).info["body"] == "not awaited"  # head + body > max_bytes
    zero = HttpReady(body=10).check(b"POST / HTTP/1.1\r\nContent-Length: 0\r\n\r\n", False)
    assert zero.verdict is A and zero.info["body"] == "complete"


def test_h2_preface_info_split_independent() -> None:
    d = assert_split_independent(HttpReady(), H2_PREFACE + b"\x00\x00\x00\x04")
    assert d.verdict is A and d.info["protocol"] == "h2" and d.info["version"] == "HTTP/2.0"
    assert HttpReady().check(H2_PREFACE[:-1], True).verdict is R


def test_slow_upload_waits_in_the_filter(core: str, listen_sock: socket.socket) -> None:
    addr = listen_sock.getsockname()
    with wrap(listen_sock, "httpready:body=1000", core=core, timeout=3) as listener, socket.create_connection(addr) as c:
        c.sendall(HEAD + b"hello")
        listener.settimeout(0.3)
        with pytest.raises(TimeoutError):
            listener.accept()
        c.sendall(b" world")
        listener.settimeout(3)
        sock, _, info = listener.accept_with_info()
        with sock:
            assert info["body"] == "complete"
            assert sock.recv(1000) == HEAD + b"hello world"


def test_h2_prior_knowledge_curl(core: str, listen_sock: socket.socket) -> None:
    port = listen_sock.getsockname()[1]
    with wrap(listen_sock, "httpready", core=core, timeout=3) as listener:
        proc = subprocess.Popen(
            ["curl", "-s", "--http2-prior-knowledge", "--max-time", "3", f"http://127.0.0.1:{port}/"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            listener.settimeout(4)
            sock, _, info = listener.accept_with_info()
            sock.close()
        finally:
            proc.wait(5)
    assert info["protocol"] == "h2"


def test_curl_post_body_arrives_whole(core: str, listen_sock: socket.socket) -> None:
    port = listen_sock.getsockname()[1]
    got: list[bytes] = []
    with wrap(listen_sock, "httpready:body=4096", core=core, timeout=3) as listener:
        def client() -> None:
            subprocess.run(["curl", "-s", "--max-time", "3", "-H", "Expect:", "--data-binary", "x" * 3000,
                            f"http://127.0.0.1:{port}/"], capture_output=True)  # fmt: skip

        t = threading.Thread(target=client)
        t.start()
        listener.settimeout(4)
        sock, _, info = listener.accept_with_info()
        with sock:
            time.sleep(0.05)
            got.append(sock.recv(65536, socket.MSG_PEEK))
            sock.sendall(b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n")
        t.join(5)
    assert info["content_length"] == 3000 and got[0].endswith(b"x" * 3000)
