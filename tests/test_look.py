"""acceptfilter._look.Looker: af_look() for Python (csrc/pylook.c), on real loopback sockets.

What the gunicorn worker's first look relies on: the next connection as
socket.accept() would give it (a blocking fd, the same address tuple), the
peeked bytes, the compiled matcher's verdict with its consume read off, errors
as socket.accept() raises them, and one thread at a time per Looker.
"""

from __future__ import annotations

import errno
import socket
import threading
from typing import Any

import pytest

from acceptfilter import diag
from acceptfilter._look import Looker
from acceptfilter.integrations.gunicorn.supervisor import _compiled_matcher
from acceptfilter.policy import Route
from acceptfilter.registry import load_chain

from .conftest import wait_for

HEAD = b"GET /look HTTP/1.1\r\nHost: example.test\r\n\r\n"


def _listening(host: str = "127.0.0.1", family: int = socket.AF_INET, *, defer: bool = False) -> socket.socket:
    """A non-blocking listen socket. ``defer``: TCP_DEFER_ACCEPT, as the gunicorn integration sets
    it, so a connection is queued only once its first segment (bytes or FIN) is there."""
    try:
        sock = socket.create_server((host, 0), family=family, backlog=64)
    except OSError as exc:  # pragma: no cover - a host without IPv6
        pytest.skip(f"no {host}: {exc}")
    if defer:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, 1)
    sock.setblocking(False)
    return sock


def _queued(listen: socket.socket, n: int) -> None:
    wait_for(lambda: diag.inspect(listen).accept_queue >= n, timeout=30)


def _httpready() -> tuple[Looker, Any]:
    matcher: Any = _compiled_matcher(Route("default", load_chain("httpready")))
    return Looker(int(matcher.ffi.cast("uintptr_t", matcher.ptr)), 4096, matcher), matcher


def test_an_empty_queue_is_none() -> None:
    with _listening() as listen:
        assert Looker(0, 4096, None).look(listen.fileno()) is None


@pytest.mark.parametrize(("host", "family"), [("127.0.0.1", socket.AF_INET), ("::1", socket.AF_INET6)])
def test_a_connection_comes_as_socket_accept_gives_it(host: str, family: int) -> None:
    with _listening(host, family) as quiet_listen, _listening(host, family, defer=True) as talker_listen:
        quiet = socket.create_connection(quiet_listen.getsockname()[:2])
        talker = socket.create_connection(talker_listen.getsockname()[:2])
        talker.sendall(b"hello")
        _queued(quiet_listen, 1)
        _queued(talker_listen, 1)
        looker = Looker(0, 4096, None)  # no matcher: a look, never a verdict
        for listen, client, sent in ((quiet_listen, quiet, None), (talker_listen, talker, b"hello")):
            got = looker.look(listen.fileno())
            assert got is not None and looker.look(listen.fileno()) is None
            fd, addr, data, ready, consume = got
            with socket.socket(family, socket.SOCK_STREAM, 0, fd) as conn:
                assert conn.getblocking() and conn.gettimeout() is None  # blocking, as accept() gives it
                assert addr == conn.getpeername() == client.getsockname()  # socket.accept()'s tuple shape
                assert (data, ready, consume) == (sent, False, 0)  # None: nothing sent yet
                if sent:
                    assert conn.recv(100) == sent  # peeked, not read
            client.close()


def test_a_certified_head_comes_with_its_consume_read_off() -> None:
    looker, _ = _httpready()
    with _listening(defer=True) as listen:
        client = socket.create_connection(listen.getsockname())
        client.sendall(HEAD)
        _queued(listen, 1)
        got = looker.look(listen.fileno())
        assert got is not None
        fd, addr, data, ready, consume = got
        with socket.socket(fileno=fd) as conn:
            assert ready is True and data == HEAD and addr == client.getsockname()
            assert conn.recv(4096) == HEAD[consume:]  # httpready consumes nothing: the server reads it all
        client.close()


def test_an_incomplete_head_is_not_certified() -> None:
    looker, _ = _httpready()
    with _listening(defer=True) as listen:
        client = socket.create_connection(listen.getsockname())
        client.sendall(HEAD[:10])
        _queued(listen, 1)
        got = looker.look(listen.fileno())
        assert got is not None
        fd, _, data, ready, consume = got
        assert (data, ready, consume) == (HEAD[:10], False, 0)
        with socket.socket(fileno=fd) as conn:
            assert conn.recv(100) == HEAD[:10]  # nothing read off
        client.close()


def test_a_client_gone_before_a_byte_is_skipped() -> None:
    with _listening(defer=True) as listen:  # deferred: queued once its FIN is there
        gone = socket.create_connection(listen.getsockname())
        gone.close()
        _queued(listen, 1)
        stays = socket.create_connection(listen.getsockname())
        stays.sendall(b"x")
        _queued(listen, 2)
        looker = Looker(0, 4096, None)
        got = looker.look(listen.fileno())
        assert got is not None and got[1] == stays.getsockname() and got[2] == b"x"
        socket.close(got[0])
        assert looker.look(listen.fileno()) is None
        stays.close()


def test_errors_are_what_socket_accept_raises() -> None:
    sock = _listening()
    fd = sock.fileno()
    sock.close()
    with pytest.raises(OSError) as raised:
        Looker(0, 4096, None).look(fd)
    assert raised.value.errno == errno.EBADF
    unlistened = socket.socket()
    with unlistened, pytest.raises(OSError) as raised:
        Looker(0, 4096, None).look(unlistened.fileno())
    assert raised.value.errno == errno.EINVAL


@pytest.mark.parametrize(("args", "error", "says"), [
    ((0, 0, None), ValueError, "cap must be 1 .. 1073741824 bytes, not 0"),
    ((0, -1, None), ValueError, "cap must be 1 .. 1073741824 bytes, not -1"),
    ((0, 2**31, None), ValueError, "cap must be 1 .. 1073741824 bytes, not 2147483648"),
    ((-1, 4096, None), OverflowError, "negative"),
    ((2**64, 4096, None), OverflowError, ""),
])
def test_bad_arguments_are_refused(args: tuple[Any, ...], error: type[Exception], says: str) -> None:
    with pytest.raises(error) as raised:
        Looker(*args)
    assert says in str(raised.value)
    with pytest.raises(OverflowError):
        Looker(0, 4096, None).look(2**40)


def test_one_thread_at_a_time_per_looker() -> None:
    """look() runs without the GIL on the Looker's one buffer: a second thread gets a clear error."""
    blocking = socket.create_server(("127.0.0.1", 0), backlog=8)  # accept4 waits in there
    other = _listening()
    looker = Looker(0, 4096, None)
    result: list[Any] = []

    def wait_in_accept() -> None:
        while True:
            try:
                result.append(looker.look(blocking.fileno()))
                return
            except RuntimeError:  # the main thread's look was running: try again
                continue

    waiter = threading.Thread(target=wait_in_accept)
    waiter.start()

    def refused() -> bool:
        try:
            assert looker.look(other.fileno()) is None
        except RuntimeError as exc:
            assert "already running in another thread" in str(exc)
            return True
        return False

    wait_for(refused, timeout=30)
    client = socket.create_connection(blocking.getsockname())
    client.sendall(b"x")
    waiter.join(timeout=30)
    assert not waiter.is_alive() and result and result[0] is not None
    socket.close(result[0][0])
    assert looker.look(other.fileno()) is None  # free again
    for s in (client, blocking, other):
        s.close()


def test_the_looker_keeps_its_program_owner_alive() -> None:
    """The Looker holds exactly one reference to its program's owner, and the program works with no other.

    The owner is a CProgram of its own, not the cached one ``compile_program`` shares: a count of
    references to a shared object changes whenever an earlier test's listener is collected (this
    test failed when it ran after tests/test_listener.py, which stopped scripts/sanitize.sh).
    """
    import gc
    import sys

    from acceptfilter.cmatcher import CProgram

    owner = CProgram(load_chain("httpready")[0].matcher())  # type: ignore[arg-type]
    looker = Looker(int(owner.ffi.cast("uintptr_t", owner.ptr)), 4096, owner)
    gc.collect()
    before = sys.getrefcount(owner)
    del looker
    gc.collect()
    assert sys.getrefcount(owner) == before - 1  # the Looker held exactly one reference
    looker = Looker(int(owner.ffi.cast("uintptr_t", owner.ptr)), 4096, owner)
    del owner  # the Looker's reference alone keeps the program's arrays alive
    gc.collect()
    with _listening(defer=True) as listen:
        client = socket.create_connection(listen.getsockname())
        client.sendall(HEAD)
        _queued(listen, 1)
        got = looker.look(listen.fileno())
        assert got is not None and got[3] is True  # the matcher still certified the head
        socket.socket(fileno=got[0]).close()
        client.close()
