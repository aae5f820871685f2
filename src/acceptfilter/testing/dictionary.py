"""The words a filter knows: every bytes/str literal in its module and its matcher's constants.

A parser only takes a branch when the bytes spell what the branch compares against
(``data.startswith(b"*")``, ``command == "SET"``, ``b"\\r\\n"``). Random bytes almost never
spell a four-letter command word; the literals in the filter's own source do, so the
guided fuzzer (:mod:`.guided`) splices them into its inputs -- the same idea as libFuzzer's
``-dict=`` files and AFL's auto-extracted tokens, taken from the AST instead of the binary.
"""

from __future__ import annotations

import ast
import inspect
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..filter import Filter

__all__ = ["filter_modules", "literals", "matcher_constants", "module_files", "words"]

#: Longer literals are docstrings and messages, not protocol words.
MAX_WORD = 64
#: Calls whose string arguments are messages for people (Decision.reject's reason, warnings, logs).
_MESSAGE_CALLS = frozenset(["reject", "pass_through", "warn", "debug", "info", "warning", "error", "print"])


def filter_modules(flt: Filter, extra: Iterable[type] = ()) -> list[str]:
    """Names of the modules that define ``flt``'s class, its bases and ``extra`` classes (not acceptfilter.filter)."""
    names: list[str] = []
    for cls in [*type(flt).__mro__, *extra]:
        mod = getattr(cls, "__module__", "")
        if mod in ("builtins", "acceptfilter.filter") or mod in names:
            continue
        names.append(mod)
    return names


def module_files(modules: Iterable[str]) -> set[str]:
    """The source files of ``modules`` (the names code objects carry in ``co_filename``)."""
    files = set()
    for name in modules:
        module = sys.modules.get(name)
        try:
            path = inspect.getsourcefile(module) if module is not None else None
        except TypeError:
            path = None
        if path:
            files.add(path)
            files.add(str(Path(path).resolve()))
    return files


def literals(source: str) -> set[bytes]:
    """Every short bytes and str constant in ``source`` (str as UTF-8 and Latin-1), docstrings left out."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return set()
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                docstrings.add(id(first.value))
    for node in ast.walk(tree):  # messages are not protocol words: reasons, errors, f-strings
        if isinstance(node, ast.Call):
            name = getattr(node.func, "attr", getattr(node.func, "id", ""))
            if name in _MESSAGE_CALLS:
                docstrings.update(id(n) for arg in node.args for n in ast.walk(arg))
            docstrings.update(id(n) for kw in node.keywords if kw.arg == "reason" for n in ast.walk(kw.value))
        elif isinstance(node, ast.Raise | ast.JoinedStr | ast.Assert):
            docstrings.update(id(n) for n in ast.walk(node))
    out: set[bytes] = set()
    for node in ast.walk(tree):
        if not isinstance(node, ast.Constant) or id(node) in docstrings:
            continue
        value = node.value
        if isinstance(value, bytes):
            out.add(value)
        elif isinstance(value, str):
            out.add(value.encode("utf-8"))
            try:
                out.add(value.encode("latin-1"))
            except UnicodeEncodeError:
                pass
    return {w for w in out if 0 < len(w) <= MAX_WORD}


def matcher_constants(flt: Filter) -> set[bytes]:
    """The literals and search terminators of the filter's compiled matcher, if it declares one."""
    try:
        program: Any = flt.matcher()
    except Exception:  # the matcher rule reports it
        return set()
    if program is None:
        return set()
    from ..matcher import Op

    out: set[bytes] = set()
    for op, a, b, *_ in getattr(program, "code", ()):
        if op == Op.LIT:
            out.add(bytes(program.lits[a : a + b]))
        elif op == Op.SEARCH:
            out.update(term for term, _ in program.terms(a, b))
    return {w for w in out if w}


def words(flt: Filter, extra: Iterable[type] = ()) -> list[bytes]:
    """The filter's dictionary: module literals plus matcher constants, sorted for reproducibility."""
    found: set[bytes] = set()
    for name in filter_modules(flt, extra):
        module = sys.modules.get(name)
        try:
            source = inspect.getsource(module) if module is not None else ""
        except (OSError, TypeError):
            continue
        found |= literals(source)
    found |= matcher_constants(flt)
    return sorted(found, key=lambda w: (len(w), w))
