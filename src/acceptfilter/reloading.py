"""What a reload (SIGHUP) does before it rebuilds any filter: discover installed filters again.

Shared by ``acceptfilter serve`` and the servers ``acceptfilter run`` starts
(uvicorn, alone or with ``--workers N``), so that SIGHUP means the same
everywhere: an upgraded plugin takes effect, and one that no longer imports
fails the reload with one line while the old filters stay in place.
"""

from __future__ import annotations

import importlib
import sys

from .errors import AcceptFilterError

__all__ = ["reload_filter_modules"]


def reload_filter_modules() -> None:
    """Clear the registry's cache and re-import every loaded filter module (one line on failure)."""
    from . import registry

    registry._clear_cache()
    seen: set[str] = set()
    for eps in registry._entry_points().values():
        for ep in eps:
            module = ep.value.partition(":")[0].strip()
            if module in sys.modules and module not in seen:
                seen.add(module)
                try:
                    importlib.reload(sys.modules[module])
                except Exception as exc:  # the old module stays in sys.modules: say so, change nothing
                    raise AcceptFilterError(f"re-importing {module} ({ep.name}) failed: {type(exc).__name__}: {exc}") from None
