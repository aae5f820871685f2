"""The status line of ``acceptfilter serve``: every term of the invariant and the kernel queue, refreshed."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from ...diag import KernelQueue
from ..console import console

if TYPE_CHECKING:
    from .server import Current

status_log = logging.getLogger("acceptfilter.status")


_TERMS = ("accepted", "held", "surfaced", "rejected", "closed_empty", "aborted", "failed", "dropped", "timed_out",
          "evicted")


def status_line(stats: dict[str, Any], queue: tuple[int, int] | None) -> str:
    """One line an operator can read at a glance, with every outcome of the invariant.

    ``accepted == surfaced + rejected + closed_empty + aborted + failed + dropped + detached + held``:
    each term is on the line, so the sum can be checked by eye; then the
    causes (timed out, evicted) and the kernel's accept queue / backlog.
    """
    kernel = "?" if queue is None else f"{queue[0]}/{queue[1]}"
    return (f"accepted {stats['accepted']} = held {stats['held']} + surfaced {stats['surfaced']} "
            f"+ rejected {stats['rejected']} + closed empty {stats['closed_empty']} + aborted {stats['aborted']} "
            f"+ failed {stats['failed']} "
            f"+ dropped {stats['dropped']} + detached {stats['detached']}  timed out {stats['timed_out']}  "
            f"evicted {stats['evicted']}  kernel queue {kernel}")


def status_loop(current: Current, interval: float) -> None:
    """Refresh the status line in place on a terminal; print plain (or JSON) lines otherwise."""
    queue = KernelQueue(current.sock)
    while not current.stop.wait(interval):
        kernel = queue.read()
        try:
            stats = current.stats()
        except Exception:  # the server is shutting down under us
            return
        show_status(stats, kernel, json_logs=current.json_logs)


def show_status(stats: dict[str, Any], kernel: tuple[int, int] | None, *, json_logs: bool, prefix: str = "",
                in_place: bool = True, **extra: Any) -> None:
    """The status line: in place on a terminal (``in_place``), a plain line or a JSON object otherwise."""
    line = prefix + status_line(stats, kernel)
    if json_logs:
        fields: dict[str, Any] = {k: stats[k] for k in (*_TERMS, "queued") if k in stats}
        if kernel is not None:
            fields.update(kernel_queue=kernel[0], kernel_backlog=kernel[1])
        status_log.info("%s", line, extra={"fields": {"type": "status", **extra, **fields}})
    elif in_place:
        console.status(line)
    else:
        console.line(line)
