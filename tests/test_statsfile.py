"""Engines' stats files: found by port, consistent under concurrent writes, gone with their process."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import acceptfilter
from acceptfilter.statsfile import StatsWriter, flatten, merge, read_port, runtime_dir, unflatten

from .conftest import wait_for


def test_a_wrapped_listener_publishes_and_removes_its_file(core: str) -> None:
    with socket.create_server(("127.0.0.1", 0)) as sock:
        port = sock.getsockname()[1]
        listener = acceptfilter.wrap(sock, "httpready", timeout=30, core=core)
        clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(2)]
        wait_for(lambda: [e.stats.get("held") for e in read_port(port)] == [2], 30)
        (engine,) = read_port(port)
        assert engine.pid == os.getpid() and engine.address == "127.0.0.1"
        assert Path(engine.path).parent == runtime_dir()
        assert engine.stats["accepted"] == 2 and engine.stats["engines"] == 1
        wait_for(lambda: read_port(port)[0].stats["oldest_held_age"] > 0.05, 30)
        listener.close()
        assert read_port(port) == [] and not Path(engine.path).exists()
        for c in clients:
            c.close()


def test_layout_carries_counters_it_does_not_know() -> None:
    """A counter added to the engine later is published and read back with no change to the layout."""
    stats = {"held": 3, "held_partial": 1, "some_future_counter": 7, "surfaced_by_route": {"http": 4, "ssh": 1},
             "oldest_held_age": 1.5, "time_to_surface": {"buckets": [0.1], "counts": [2, 1], "sum": 0.3, "count": 3}}
    with socket.create_server(("127.0.0.1", 0)) as sock:
        writer = StatsWriter(sock, "test")
        try:
            writer.write(stats)
            (engine,) = read_port(sock.getsockname()[1])
        finally:
            writer.close()
    assert engine.stats["some_future_counter"] == 7 and engine.stats["surfaced_by_route"] == {"http": 4, "ssh": 1}
    assert engine.stats["oldest_held_age"] == 1.5 and engine.stats["time_to_surface"]["counts"] == [2, 1]
    assert unflatten(dict(flatten({"a": {"b": 2}}))) == {"a": {"b": 2}}
    summed = merge([{"held": 1, "oldest_held_age": 2.0, "surfaced_by_route": {"a": 1}},
                    {"held": 2, "oldest_held_age": 5.0, "surfaced_by_route": {"a": 2, "b": 1}}])
    assert summed == {"held": 3, "oldest_held_age": 5.0, "surfaced_by_route": {"a": 3, "b": 1}}


def test_readers_never_see_a_torn_write() -> None:
    """The seqlock: every snapshot read while another thread rewrites the file is one whole write."""
    with socket.create_server(("127.0.0.1", 0)) as sock:
        port = sock.getsockname()[1]
        writer = StatsWriter(sock, "test")
        stop = threading.Event()

        def write() -> None:
            n = 0
            while not stop.is_set():
                n += 1
                writer.write({f"k{i}": n for i in range(150)})  # every slot holds the same value in one write

        thread = threading.Thread(target=write)
        thread.start()
        try:
            seen = 0
            for _ in range(300):
                for engine in read_port(port):
                    assert len(set(engine.stats.values())) == 1, engine.stats
                    seen += 1
        finally:
            stop.set()
            thread.join()
            writer.close()
    assert seen > 0


_HOLDER = """
import socket, sys, time
import acceptfilter
sock = socket.create_server(("127.0.0.1", 0))
listener = acceptfilter.wrap(sock, "httpready")
print(sock.getsockname()[1], flush=True)
time.sleep(600)
"""


def test_a_killed_process_file_is_ignored_and_cleaned() -> None:
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        (engine,) = read_port(port)
        assert engine.pid == proc.pid
    finally:
        proc.send_signal(signal.SIGKILL)  # no close(), no atexit: the file stays behind
        proc.wait()
    assert Path(engine.path).exists()
    assert read_port(port) == []  # its pid is gone: ignored ...
    assert not Path(engine.path).exists()  # ... and removed


def test_a_forked_child_neither_publishes_nor_removes_the_parents_files() -> None:
    with socket.create_server(("127.0.0.1", 0)) as sock:
        port = sock.getsockname()[1]
        with acceptfilter.wrap(sock, "httpready"):
            (engine,) = read_port(port)
            pid = os.fork()
            if pid == 0:  # what the child's exit runs (publish's atexit hook), then nothing else of pytest's
                from acceptfilter import publish

                publish._remove_all()
                os._exit(0)
            os.waitpid(pid, 0)
            assert Path(engine.path).exists() and [e.pid for e in read_port(port)] == [os.getpid()]
