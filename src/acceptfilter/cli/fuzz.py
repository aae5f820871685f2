"""``acceptfilter fuzz NAME|all``: fuzz registered filters against the filter contract.

Third-party filters are found by entry point like any other; ``--import`` loads a module
or a ``.py`` file first, so a filter that is not installed (a test file, a notebook
export) can be fuzzed too: it may call ``register_filter`` or just define ``Filter``
subclasses with a ``name``. Exit status: 0 all passed, 1 a counterexample, 2 usage errors.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import inspect
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

from ..errors import AcceptFilterError, FilterLoadError, FilterSpecError
from ..filter import Filter
from ..registry import available_filters, filter_class, register_filter
from ..testing.budget import DEFAULT_EXAMPLES
from .args import positive_int


def register(subparsers: Any) -> None:
    p: argparse.ArgumentParser = subparsers.add_parser(
        "fuzz", help="fuzz filters against the filter contract (needs acceptfilter[testing])"
    )
    p.add_argument(
        "names", nargs="+", metavar="NAME|all", help="filter specs to fuzz, or 'all' for every registered one"
    )
    p.add_argument("--examples", type=positive_int, default=DEFAULT_EXAMPLES, metavar="N",
                   help=f"examples per round (default {DEFAULT_EXAMPLES})")
    p.add_argument("--seconds", type=float, default=0.0, metavar="S", help="keep running fresh rounds for S seconds")
    p.add_argument(
        "--import",
        dest="imports",
        action="append",
        default=[],
        metavar="MODULE_OR_FILE",
        help="import a module or .py file that defines or registers filters (repeatable)",
    )
    p.add_argument(
        "--payloads",
        action="append",
        default=[],
        metavar="FILE",
        help="seed inputs, added to the built-in ones and the filter's examples: a file with one payload per line "
        "(backslash escapes such as \\r\\n; '#' starts a comment) or a directory of raw files (repeatable)",
    )
    p.add_argument("--sockets", action="store_true", help="also run payloads through real loopback listeners (slower)")
    p.set_defaults(func=run)


def _import(target: str) -> ModuleType:
    """Import a dotted module name or a file path; a clear error instead of a traceback."""
    path = Path(target)
    try:
        if target.endswith(".py") or path.is_file():
            if not path.is_file():
                raise AcceptFilterError(f"--import {target}: no such file")
            mod_name = f"_acceptfilter_fuzz_{path.stem}"
            spec = importlib.util.spec_from_file_location(mod_name, path)
            if spec is None or spec.loader is None:
                raise AcceptFilterError(f"--import {target}: cannot load this file as Python")
            module = importlib.util.module_from_spec(spec)
            folder = str(path.resolve().parent)  # as `python FILE` does: its sibling modules import
            if folder not in sys.path:
                sys.path.insert(0, folder)
            sys.modules[mod_name] = module
            spec.loader.exec_module(module)
            return module
        return importlib.import_module(target)
    except AcceptFilterError:
        raise
    except Exception as exc:
        raise AcceptFilterError(f"--import {target} failed: {type(exc).__name__}: {exc}") from None


def _register_defined(module: ModuleType) -> None:
    """Register Filter subclasses a module defines with a name but did not register itself."""
    for _, obj in inspect.getmembers(module, inspect.isclass):
        if not issubclass(obj, Filter) or obj is Filter or obj.__module__ != module.__name__ or not obj.name:
            continue
        try:
            if filter_class(obj.name) is obj:
                continue
        except AcceptFilterError:
            pass
        register_filter(obj, replace=True)


def read_payloads(target: str) -> list[bytes]:
    """Seeds from ``--payloads``: one escaped payload per line of a file, or each file of a directory raw."""
    import codecs

    path = Path(target)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file())
        seeds = [p.read_bytes() for p in files]
    elif path.is_file():
        seeds = []
        for number, line in enumerate(path.read_text("utf-8", errors="surrogateescape").splitlines(), 1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            try:
                seeds.append(codecs.escape_decode(line.encode("utf-8", errors="surrogateescape"))[0])
            except ValueError as exc:
                raise AcceptFilterError(f"--payloads {target}, line {number}: {exc}") from None
    else:
        raise AcceptFilterError(f"--payloads {target}: no such file or directory")
    if not seeds:
        raise AcceptFilterError(f"--payloads {target}: no payloads in it")
    return seeds


def _matcher_note(flt: Filter) -> str:
    """Say whether the matcher invariant had a matcher to check (and through which interpreters)."""
    from ..cmatcher import available
    from ..testing.check import DEFAULT_PEER

    try:
        program = flt.peer_matcher(DEFAULT_PEER)
    except Exception:  # reported by check_filter already; this is only a note
        return ""
    if program is None:
        return ", no matcher"
    return ", matcher agreed (C and Python mirror)" if available() else ", matcher agreed (Python mirror; no C core)"


def _targets(names: list[str]) -> list[str]:
    if "all" not in names:
        return names
    found = [info.name for info in available_filters()]
    return [*found, *(n for n in names if n != "all" and n not in found)]


def run(args: argparse.Namespace) -> int:
    try:
        import hypothesis  # noqa: F401
    except ImportError:
        raise AcceptFilterError("fuzzing needs hypothesis: pip install 'acceptfilter[testing]'") from None
    from hypothesis.configuration import set_hypothesis_home_dir

    from ..registry import load_filter
    from ..testing.budget import cache_dir
    from ..testing.check import ContractViolation, check_filter

    set_hypothesis_home_dir(cache_dir())  # never a .hypothesis folder in whatever directory fuzz runs from

    for target in args.imports:
        _register_defined(_import(target))
    seeds = [seed for target in args.payloads for seed in read_payloads(target)] or None
    specs = _targets(args.names)
    filters: list[tuple[str, Filter]] = []
    skipped = broken = 0
    for spec in specs:  # unknown names and bad specs fail here, before any fuzzing
        explicit = "all" not in args.names or spec in args.names
        try:
            filters.append((spec, load_filter(spec)))
        except FilterLoadError as exc:
            if explicit:
                raise
            # One broken plugin must not stop the others from being fuzzed (like `list`, which marks it).
            broken += 1
            print(f"BROKEN {spec}: {exc}", flush=True)
        except FilterSpecError as exc:
            if explicit:
                raise
            # "all" cannot guess required arguments (proxy's trusted=...): say so, never skip silently.
            skipped += 1
            print(f"skip  {spec}: cannot build it without arguments ({exc}); fuzz it as 'NAME:arg=value'", flush=True)
    failed = 0
    for spec, flt in filters:
        start = time.monotonic()
        rounds = 0
        try:
            while True:
                check_filter(flt, seeds, max_examples=args.examples)
                if args.sockets:
                    from ..testing.sockets import check_sockets

                    check_sockets(flt, seeds, max_examples=max(1, args.examples // 100))
                rounds += 1
                if time.monotonic() - start >= args.seconds:
                    break
        except ContractViolation as exc:
            failed += 1
            print(f"FAIL  {spec}: {exc}", flush=True)
            continue
        except Exception as exc:  # hypothesis' Flaky, a filter that breaks only sometimes: still a failure
            failed += 1
            print(f"FAIL  {spec}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}", flush=True)
            continue
        took = time.monotonic() - start
        print(
            f"ok    {spec}: {rounds * args.examples} examples in {rounds} round(s), {took:.1f}s{_matcher_note(flt)}",
            flush=True,
        )
    print(f"{len(filters) - failed} passed, {failed} failed" + (f", {skipped} skipped" if skipped else "")
          + (f", {broken} broken (failed to load)" if broken else ""))
    return 1 if failed or broken else 0
