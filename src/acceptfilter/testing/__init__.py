"""Fuzz-testing toolkit for filters: hypothesis strategies, check_filter(), a socket harness.

Needs the optional extra ``acceptfilter[testing]`` (hypothesis). Names are imported
lazily so the pytest plugin in this package stays import-light.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "ContractViolation",
    "check_filter",
    "check_payload",
    "check_sockets",
    "filter_state_machine",
    "strategies",
]

_WHERE = {
    "ContractViolation": "check",
    "check_filter": "check",
    "check_payload": "check",
    "filter_state_machine": "check",
    "check_sockets": "sockets",
    "strategies": None,
}


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module = _WHERE[name]
    if module is None:
        return importlib.import_module(f"{__name__}.{name}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
