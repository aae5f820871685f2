"""``python -m acceptfilter.integrations.gunicorn.filter_process_main``: how the arbiter starts the filter process.

A module of its own because the package imports :mod:`.filter_process` (the hooks
need its settings): ``-m`` of a module its package already imported makes runpy
execute it a second time and warn (``RuntimeWarning: ... found in sys.modules``)
on every gunicorn start. Nothing imports this one, so runpy runs it once.
"""

from __future__ import annotations

import sys

from .filter_process import main

if __name__ == "__main__":
    sys.exit(main())
