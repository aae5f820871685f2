"""``acceptfilter list``: every registered filter, its distribution and what it does."""

from __future__ import annotations

import argparse
import json
from typing import Any

from ..registry import available_filters


def register(subparsers: Any) -> None:
    p: argparse.ArgumentParser = subparsers.add_parser("list", help="list the registered filters")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    infos = available_filters()
    if args.json:
        print(json.dumps([info.__dict__ for info in infos], indent=2))
        return 0
    width = max((len(i.name) for i in infos), default=4)
    dist_width = max((len(i.distribution) for i in infos), default=4)
    for info in infos:
        text = info.description if info.error is None else f"BROKEN: {info.error}"
        print(f"{info.name:<{width}}  {info.distribution:<{dist_width}}  {text}")
    return 1 if any(i.error for i in infos) else 0
