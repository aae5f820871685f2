"""MkDocs hooks for the docs site (mkdocs.yml ``hooks:``), run by every ``mkdocs build``.

* Fence info strings: the snippets use pytest-markdown-docs' words after the language
  (```` ```python notest ````, ```` ```python continuation ````). Python-Markdown's fences take one
  word only and would print the fence as text, so the extra words are dropped before rendering.
* The command-line reference: ``<!-- cli-reference -->`` in a page is replaced by the ``--help`` of
  ``acceptfilter`` and of every sub-command, taken from the argparse parsers themselves
  (``acceptfilter.cli.build_parser``), so it cannot drift from the code.
"""

from __future__ import annotations

import argparse
import os
import re
from typing import Any

CLI_MARKER = "<!-- cli-reference -->"
_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})(?P<lang>[\w#.+-]+)[ \t]+[^\n`{]*$", re.M)


def strip_fence_options(markdown: str) -> str:
    """```` ```python notest ```` -> ```` ```python ````: the rendered page shows the language only."""
    return _FENCE.sub(lambda m: f"{m['indent']}{m['fence']}{m['lang']}", markdown)


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def cli_reference() -> str:
    """Markdown: ``acceptfilter --help``, then one section per sub-command with its ``--help``."""
    from acceptfilter.cli import build_parser

    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "100"  # argparse wraps to the terminal: the same width on every build
    try:
        parser = build_parser()
        out = ["## acceptfilter", "", "```text", parser.format_help().rstrip(), "```", ""]
        for name, sub in _subparsers(parser).items():
            out += [f"## acceptfilter {name}", "", "```text", sub.format_help().rstrip(), "```", ""]
    finally:
        if old is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = old
    return "\n".join(out)


def on_page_markdown(markdown: str, **kwargs: Any) -> str:
    if CLI_MARKER in markdown:
        markdown = markdown.replace(CLI_MARKER, cli_reference())
    return strip_fence_options(markdown)
