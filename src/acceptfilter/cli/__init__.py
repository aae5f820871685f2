"""The ``acceptfilter`` command.

Each sub-command lives in a module with ``register(subparsers)``, which adds
its parser and sets ``func=run`` where ``run(args) -> int`` is the exit code.
Errors the user can fix (a bad spec, a port in use, a bad value) are exactly one
line on stderr and exit status 2, never a traceback: argparse's own errors too
(it would print the whole usage block first).
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from ..errors import AcceptFilterError

__all__ = ["main"]

#: Modules that add a sub-command (each has ``register(subparsers)``).
_COMMAND_MODULES = (
    "acceptfilter.cli.list",
    "acceptfilter.cli.serve",
    "acceptfilter.cli.stats",
    "acceptfilter.cli.top",
    "acceptfilter.cli.metrics",
    "acceptfilter.cli.run",
    "acceptfilter.cli.fuzz",
)


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line: ``acceptfilter: error: ...`` (the usage is a --help away)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"acceptfilter: error: {message}{self._closest(message)}; see {self.prog} --help\n")

    def _closest(self, message: str) -> str:
        """The did-you-mean for an unknown command (``serv``) or option (``--timout``)."""
        from ..registry import did_you_mean

        choice = re.match(r"argument \S+: invalid choice: '([^']*)' \(choose from (.*)\)$", message)
        if choice:
            return did_you_mean(choice.group(1), re.findall(r"'([^']*)'", choice.group(2)))
        unknown = re.match(r"unrecognized arguments: (--?[\w-]+)", message)
        if unknown:
            return did_you_mean(unknown.group(1), self._option_string_actions)
        return ""

    def parse_args(self, args: Sequence[str] | None = None, namespace: Any = None) -> Any:  # type: ignore[override]
        """Unknown options are reported by the sub-command's parser, which knows its own options."""
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            sub = self._subcommand_parser(getattr(parsed, "command", None))
            (sub or self).error(f"unrecognized arguments: {' '.join(extras)}")
        return parsed

    def _subcommand_parser(self, name: str | None) -> Parser | None:
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction) and name in action.choices:
                found = action.choices[name]
                return found if isinstance(found, Parser) else None
        return None


def _common_options() -> argparse.ArgumentParser:
    """Options every sub-command takes too, so ``acceptfilter serve -v`` works like ``acceptfilter -v serve``."""
    common = argparse.ArgumentParser(add_help=False)
    # SUPPRESS: a sub-command without -v must not reset the count given before it.
    common.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS,
                        help="more logging from acceptfilter (-vv: debug); other libraries stay quiet")
    return common


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="acceptfilter",
        description="FreeBSD-style accept filters for Linux servers, in user space.",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="more logging from acceptfilter (-vv: debug); other libraries stay quiet")
    from .. import __version__

    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    common = _common_options()
    original = subparsers.add_parser

    def add_parser(name: str, **kwargs: Any) -> argparse.ArgumentParser:
        kwargs.setdefault("parents", [common])
        return original(name, **kwargs)

    subparsers.add_parser = add_parser  # type: ignore[method-assign,assignment]
    for name in _COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def _quiet_broken_pipe() -> int:
    """stdout went away (``acceptfilter stats 8000 | head -1``): exit like a Unix tool, with no traceback.

    Python flushes stdout once more at exit; point it at /dev/null so that flush
    cannot raise again.
    """
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass
    return 141  # 128 + SIGPIPE, what a shell reports for a tool killed by it


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from .console import configure_logging

    configure_logging(args.verbose, getattr(args, "log_format", "text"))
    try:
        return int(args.func(args))
    except AcceptFilterError as exc:
        print(f"acceptfilter: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        return _quiet_broken_pipe()
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
