"""Live counters of every engine, in a small fixed-layout file the CLI finds by port.

Each listening engine (``serve``, ``serve --workers``, ``run``, gunicorn's filter
process, any ``wrap()``/``route()`` in any program) owns one file in the runtime
directory, named by listening port, address and pid::

    $ACCEPTFILTER_RUNTIME_DIR                (tests, or an operator's choice)
    /run/acceptfilter                        (root)
    $XDG_RUNTIME_DIR/acceptfilter            (a user session)
    $TMPDIR/acceptfilter-UID                 (otherwise)

    8000-127.0.0.1-4242-0.afstats            PORT-ADDRESS-PID-SERIAL

so ``acceptfilter stats PORT``, ``top`` and the metrics exporter read every engine
on a port without any code from the user, whichever process runs it.

The layout (version 1, little-endian, 8 KiB) is self-describing: a header, then
``SLOTS`` slots of (name, float64 value). The names are the keys of the engine's
``stats()`` flattened (``surfaced_by_route/http``), so a counter added to the
engine later is published with no change here, and a reader built before it
simply shows it. A seqlock makes reads consistent without ever blocking the
writer: the writer makes ``generation`` odd, writes, makes it even; a reader
copies the file and retries when the generation was odd or changed meanwhile.
"""

from __future__ import annotations

import mmap
import os
import re
import socket
import struct
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "SLOTS",
    "VERSION",
    "EngineFile",
    "StatsWriter",
    "flatten",
    "merge",
    "read_port",
    "runtime_dir",
    "search_dirs",
    "unflatten",
]

MAGIC = b"AFSTATS\x00"
VERSION = 1
SLOTS = 200
_NAME = 40
#: magic, version, slots, generation, pid, port, start ticks, updated (unix time), inode, family, address, label
_HEADER = struct.Struct("<8sIIQIIQdQI4x64s64s")
_HEADER_SIZE = 256
_SLOT = struct.Struct(f"<{_NAME}sd")
SIZE = _HEADER_SIZE + SLOTS * _SLOT.size
_GEN_OFFSET = 16
_SUFFIX = ".afstats"
#: Merged over engines by the maximum, not the sum.
_MAX_KEYS = frozenset({"oldest_held_age", "deadline"})


def runtime_dir() -> Path:
    """Where this process publishes (see the module docstring for the order)."""
    override = os.environ.get("ACCEPTFILTER_RUNTIME_DIR")
    if override:
        return Path(override)
    if os.geteuid() == 0:
        return Path("/run/acceptfilter")
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg and os.path.isdir(xdg) and os.access(xdg, os.W_OK):
        return Path(xdg) / "acceptfilter"
    return Path(tempfile.gettempdir()) / f"acceptfilter-{os.geteuid()}"


def search_dirs() -> list[Path]:
    """Where readers look: this user's directory and, for root, every user's (a server may run as www-data)."""
    if os.environ.get("ACCEPTFILTER_RUNTIME_DIR"):
        return [runtime_dir()]
    dirs = [runtime_dir(), Path("/run/acceptfilter")]
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg:
        dirs.append(Path(xdg) / "acceptfilter")
    tmp = Path(tempfile.gettempdir())
    dirs.append(tmp / f"acceptfilter-{os.geteuid()}")
    if os.geteuid() == 0:
        dirs += sorted(tmp.glob("acceptfilter-*")) + sorted(Path("/run/user").glob("*/acceptfilter"))
    seen: list[Path] = []
    for d in dirs:
        if d not in seen:
            seen.append(d)
    return seen


def _start_ticks(pid: int) -> int:
    """The process's start time in clock ticks (field 22 of /proc/PID/stat): tells a reused pid apart."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except OSError:
        return 0
    return int(raw[raw.rindex(b")") + 2:].split()[19])


def flatten(stats: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, float]]:
    """``stats()`` as (name, value) pairs: nested mappings and lists joined with ``/``, numbers only."""
    for key, value in stats.items():
        name = f"{prefix}{key}"
        if isinstance(value, bool | int | float):
            yield name, float(value)
        elif isinstance(value, Mapping):
            yield from flatten(value, name + "/")
        elif isinstance(value, list | tuple) and name.endswith("time_to_surface/counts"):
            for i, item in enumerate(value):
                yield f"{name}/{i}", float(item)


def unflatten(pairs: Mapping[str, float]) -> dict[str, Any]:
    """The inverse of :func:`flatten` (whole numbers as int; the histogram's counts as a list)."""
    out: dict[str, Any] = {}
    for name, value in pairs.items():
        parts = name.split("/")
        node = out
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = int(value) if value.is_integer() else value
    hist = out.get("time_to_surface")
    if isinstance(hist, dict) and isinstance(hist.get("counts"), dict):
        counts = hist["counts"]
        hist["counts"] = [counts[str(i)] for i in range(len(counts)) if str(i) in counts]
        from .engine import LATENCY_BUCKETS

        hist["buckets"] = list(LATENCY_BUCKETS[:max(0, len(hist["counts"]) - 1)])
    return out


def _alive(pid: int, ticks: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process: alive
    return ticks == 0 or _start_ticks(pid) in (0, ticks)


class StatsWriter:
    """One engine's file: created at start, rewritten by :meth:`write`, removed by :meth:`close`."""

    _serial = 0

    def __init__(self, sock: socket.socket, label: str) -> None:
        host, port = sock.getsockname()[:2]
        self.port = int(port)
        directory = runtime_dir()
        directory.mkdir(mode=0o755 if os.geteuid() == 0 else 0o700, parents=True, exist_ok=True)
        StatsWriter._serial += 1
        safe = re.sub(r"[^0-9A-Za-z.:%_]", "_", str(host))
        self.path = directory / f"{self.port}-{safe}-{os.getpid()}-{StatsWriter._serial}{_SUFFIX}"
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            os.ftruncate(fd, SIZE)
            self._map = mmap.mmap(fd, SIZE)
        finally:
            os.close(fd)
        self._generation = 0
        #: write() (the publishing thread or a loop) and close() (whoever closes the listener) may
        #: race: a write into an unmapped file raised in the publishing thread.
        self._lock = threading.Lock()
        self._closed = False
        self._fixed = (os.getpid(), self.port, _start_ticks(os.getpid()), os.fstat(sock.fileno()).st_ino,
                       int(sock.family), str(host).encode()[:64], label.encode()[:64])

    def write(self, stats: Mapping[str, Any]) -> None:
        """Publish a snapshot: readers see this one whole, or the previous one, never a mix."""
        pairs = [(n.encode(), v) for n, v in flatten(stats)]
        with self._lock:
            if not self._closed:
                self._write(pairs)

    def _write(self, pairs: list[tuple[bytes, float]]) -> None:
        m = self._map
        self._generation += 1  # odd: a write is under way
        struct.pack_into("<Q", m, _GEN_OFFSET, self._generation)
        pid, port, ticks, inode, family, host, label = self._fixed
        _HEADER.pack_into(m, 0, MAGIC, VERSION, SLOTS, self._generation, pid, port, ticks, time.time(),
                          inode, family, host, label)
        offset = _HEADER_SIZE
        for name, value in [p for p in pairs if len(p[0]) <= _NAME][:SLOTS]:
            _SLOT.pack_into(m, offset, name, value)
            offset += _SLOT.size
        m[offset:SIZE] = bytes(SIZE - offset)
        self._generation += 1  # even: whole again
        struct.pack_into("<Q", m, _GEN_OFFSET, self._generation)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass
            self._map.close()


@dataclass(frozen=True)
class EngineFile:
    """One engine's published counters, as a reader found them."""

    path: str
    pid: int
    port: int
    address: str
    label: str
    inode: int
    updated: float
    stats: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {"pid": self.pid, "address": self.address, "port": self.port, "label": self.label,
                "age_of_data": round(max(0.0, time.time() - self.updated), 3), "stats": self.stats}


def _read(path: Path) -> EngineFile | None:
    """One consistent copy of ``path`` (seqlock), or None if it is not (yet) a stats file."""
    for _ in range(100):
        try:
            with open(path, "rb") as f:
                raw = f.read(SIZE)
                f.seek(_GEN_OFFSET)
                after = struct.unpack("<Q", f.read(8))[0]
        except (OSError, struct.error):
            return None
        if len(raw) < SIZE:
            return None
        magic, version, slots, gen, pid, port, ticks, updated, inode, _family, host, label = _HEADER.unpack_from(raw)
        if magic != MAGIC or version != VERSION:
            return None
        if gen % 2 or gen != after:
            time.sleep(0.001)
            continue
        pairs: dict[str, float] = {}
        for i in range(min(slots, SLOTS)):
            name, value = _SLOT.unpack_from(raw, _HEADER_SIZE + i * _SLOT.size)
            name = name.rstrip(b"\x00")
            if not name:
                break
            pairs[name.decode(errors="replace")] = value
        if not _alive(pid, ticks):
            try:
                path.unlink()  # its process is gone: clean up after it
            except OSError:
                pass
            return None
        return EngineFile(str(path), pid, port, host.rstrip(b"\x00").decode(), label.rstrip(b"\x00").decode(),
                          inode, updated, unflatten(pairs))
    return None


def read_port(port: int | None = None) -> list[EngineFile]:
    """Every live engine publishing on ``port`` (None: on any port), sorted by port, address and pid."""
    found: list[EngineFile] = []
    seen: set[str] = set()
    pattern = f"{port}-*{_SUFFIX}" if port else f"*{_SUFFIX}"
    for directory in search_dirs():
        try:
            paths = sorted(directory.glob(pattern))
        except OSError:
            continue
        for path in paths:
            if path.name in seen:
                continue
            seen.add(path.name)
            engine = _read(path)
            if engine is not None:
                found.append(engine)
    return sorted(found, key=lambda e: (e.port, e.address, e.pid, e.path))


def merge(stats: list[Mapping[str, Any]]) -> dict[str, Any]:
    """Several engines' stats as one: counters and gauges summed, ages and deadlines by their maximum."""
    out: dict[str, Any] = {}
    for one in stats:
        _merge_into(out, one)
    return out


def _merge_into(out: dict[str, Any], one: Mapping[str, Any]) -> None:
    for key, value in one.items():
        if isinstance(value, Mapping):
            _merge_into(out.setdefault(key, {}), value)
        elif isinstance(value, list):
            have = out.get(key)
            if isinstance(have, list) and len(have) == len(value) and key == "counts":
                out[key] = [a + b for a, b in zip(have, value, strict=True)]
            elif have is None:
                out[key] = list(value)
        elif isinstance(value, bool):
            out[key] = bool(out.get(key)) or value
        elif isinstance(value, int | float):
            if key in _MAX_KEYS:
                out[key] = max(out.get(key, value), value)
            else:
                out[key] = out.get(key, 0) + value
