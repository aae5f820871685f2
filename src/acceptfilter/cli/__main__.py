"""``python -m acceptfilter.cli``: the ``acceptfilter`` command."""

import sys

from . import main

sys.exit(main())
