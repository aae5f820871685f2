"""Exceptions with messages that say what went wrong and what to do."""

from __future__ import annotations

__all__ = [
    "AcceptFilterError",
    "FilterLoadError",
    "FilterSpecError",
    "UnknownFilterError",
]


class AcceptFilterError(Exception):
    """Base class of every error this package raises on purpose."""


class FilterSpecError(AcceptFilterError, ValueError):
    """A filter spec string is malformed or names arguments the filter lacks."""


class UnknownFilterError(AcceptFilterError, LookupError):
    """No filter of that name is registered under ``acceptfilter.filters``."""


class FilterLoadError(AcceptFilterError, ImportError):
    """A registered filter's entry point failed to load (a broken plugin)."""
