"""Argument types for the command line: one clear sentence per bad value, never Python's wording.

``int("abc")`` says ``invalid literal for int() with base 10: 'abc'``; a user typed
``--port abc`` and should read ``--port takes a whole number, not 'abc'``. argparse
prefixes the option name itself, so these messages start with what was expected.
"""

from __future__ import annotations

import argparse
import math

__all__ = ["IDLE_TIMEOUT_HELP", "MAX_HELD_HELP", "ON_TIMEOUT_HELP", "TIMEOUT_HELP", "non_negative_float",
           "non_negative_int", "on_timeout", "port", "positive_float", "positive_int"]


def _whole(text: str) -> int:
    try:
        return int(text.strip(), 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"takes a whole number, not {text!r}") from None


def _number(text: str) -> float:
    try:
        value = float(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"takes a number of seconds (like 5 or 0.5), not {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"takes a finite number, not {text!r}")
    return value


def positive_int(text: str) -> int:
    value = _whole(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def non_negative_int(text: str) -> int:
    value = _whole(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, not {value}")
    return value


def port(text: str) -> int:
    value = _whole(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be between 0 and 65535, not {value}")
    return value


def positive_float(text: str) -> float:
    value = _number(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0 seconds, not {text!r}")
    return value


def non_negative_float(text: str) -> float:
    value = _number(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 (no limit) or more seconds, not {text!r}")
    return value


# argparse names the type in its "invalid <type> value" fallback; keep ours readable.
for _fn, _name in ((positive_int, "number"), (non_negative_int, "number"), (port, "port"), (positive_float, "seconds"),
                   (non_negative_float, "seconds")):
    _fn.__name__ = _name


def on_timeout(text: str) -> str:
    """``surface``, ``close``, ``reset`` or ``route:NAME``, checked when the command line is read.

    Whether NAME is one of the routes is checked later, against ``--route``/``--default``.
    """
    from ..errors import FilterSpecError
    from ..policy import parse_action

    try:
        parse_action(text, "on_timeout")
    except FilterSpecError:
        raise argparse.ArgumentTypeError(f"takes surface, close, reset or route:NAME, not {text!r}") from None
    return text.strip()


ON_TIMEOUT_HELP = ("what a connection whose deadline passed gets: close (default; a partial HTTP request is "
                   "answered 408 Request Timeout first), surface (the application sees it and applies its own "
                   "timeouts), reset (RST), or route:NAME (with --route: that route)")
TIMEOUT_HELP = ("seconds a connection that has begun its request may be held, from its first byte "
                "(default: 5, or the filter's timeout=)")
IDLE_TIMEOUT_HELP = ("seconds a connection that has sent nothing may be held (default: 620, longer than every "
                     "common balancer keeps an idle connection; 0: no limit). With a server-first route "
                     "(--default, silent) idle clients are served at the deadline instead")
MAX_HELD_HELP = ("bound on held connections (default: the fd limit, ulimit -n, less a quarter of it for the "
                 "application); when full, an idle connection of the source address holding the most goes first")
