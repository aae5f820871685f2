"""The ``acceptfilter`` command.

Each sub-command lives in a module with ``register(subparsers)``, which adds
its parser and sets ``func=run`` where ``run(args) -> int`` is the exit code.
Errors the user can fix (a bad spec, a port in use) are one clear line on
stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from ..errors import AcceptFilterError

__all__ = ["main"]

#: Modules that add a sub-command (each has ``register(subparsers)``).
_COMMAND_MODULES = (
    "acceptfilter.cli.list",
    "acceptfilter.cli.serve",
    "acceptfilter.cli.stats",
    "acceptfilter.cli.top",
    "acceptfilter.cli.run",
    "acceptfilter.cli.fuzz",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="acceptfilter",
        description="FreeBSD-style accept filters for Linux servers, in user space.",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv: debug)")
    from .. import __version__

    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        return int(args.func(args))
    except AcceptFilterError as exc:
        print(f"acceptfilter: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
