"""The one fuzzing budget and the cache directory, shared by ``acceptfilter fuzz``, check_filter() and the fixture.

Kept free of hypothesis so the CLI can show its defaults (and say hypothesis is missing)
without importing it.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["DEFAULT_EXAMPLES", "DEFAULT_GUIDED_SECONDS", "cache_dir"]

#: Examples per run (hypothesis phase); the coverage-guided phase before it runs up to 30 times as many inputs.
DEFAULT_EXAMPLES = 1000

#: Seconds the coverage-guided phase may run at most (it stops earlier once it finds nothing new).
DEFAULT_GUIDED_SECONDS = 30.0


def cache_dir() -> Path:
    """Where hypothesis keeps what it saves: ``$XDG_CACHE_HOME/acceptfilter/hypothesis``.

    Failing examples go to ``examples/`` under it (replayed first next time); the CLI also
    makes it hypothesis' home directory (its other caches).

    Never the working directory: ``acceptfilter fuzz`` is run from anywhere, and a
    ``.hypothesis`` folder left in a user's project is litter (``~/.cache`` when
    XDG_CACHE_HOME is unset, as the XDG base directory spec says).
    """
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "acceptfilter" / "hypothesis"
