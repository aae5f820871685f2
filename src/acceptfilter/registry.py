"""Find filters through entry points and build them from spec strings.

Filters live in the entry-point group ``acceptfilter.filters``; the built-in
ones register there exactly like a third-party plugin would::

    [project.entry-points."acceptfilter.filters"]
    myfilter = "mypackage.myfilter:MyFilter"

A **filter spec** names a filter and optionally its arguments (FreeBSD's
``af_arg``)::

    spec      = name [ ":" argument { "," argument } ]
    argument  = key "=" value | key          (a bare key means key=true)

    "httpready"
    "dataready:min_bytes=4"
    "httpready:timeout=5,max_bytes=8192,non_http=reject"
    "tlsready:sni=example.com|*.example.org"      (tuple values split on "|")

Values are converted to the type annotated on the filter's ``__init__``
keyword (``int``, ``float``, ``bool``, ``str``, ``tuple[str, ...]``, each
optionally ``| None``). Every filter accepts ``max_bytes`` and ``timeout``.
"""

from __future__ import annotations

import difflib
import inspect
import re
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from importlib.metadata import EntryPoint, entry_points
from typing import Any

from .errors import FilterLoadError, FilterSpecError, UnknownFilterError
from .filter import Filter

__all__ = [
    "ENTRY_POINT_GROUP",
    "FilterInfo",
    "available_filters",
    "did_you_mean",
    "filter_class",
    "load_chain",
    "load_filter",
    "parse_spec",
    "register_filter",
]

ENTRY_POINT_GROUP = "acceptfilter.filters"

_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]*$")
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}

#: Filters registered at run time with :func:`register_filter` (name -> class).
_runtime: dict[str, type[Filter]] = {}


@dataclass(frozen=True)
class FilterInfo:
    """What ``acceptfilter list`` shows for one registered filter."""

    name: str
    distribution: str
    description: str
    target: str
    error: str | None = None


def parse_spec(spec: str) -> tuple[str, dict[str, str]]:
    """Split ``"name:key=value,flag"`` into the name and raw string arguments."""
    if not isinstance(spec, str):
        raise FilterSpecError(f"a filter spec must be a string or a Filter, not {type(spec).__name__}")
    text = spec.strip()
    name, sep, rest = text.partition(":")
    name = name.strip()
    if not name:
        raise FilterSpecError(f"empty filter name in spec {spec!r}; expected e.g. 'httpready' or 'dataready:min_bytes=4'")
    if not _NAME_RE.match(name):
        raise FilterSpecError(f"invalid filter name {name!r} in spec {spec!r}: use letters, digits, '_', '-', '.'")
    args: dict[str, str] = {}
    if sep and not rest.strip():
        raise FilterSpecError(f"spec {spec!r} has ':' but no arguments after it")
    for part in rest.split(",") if sep else []:
        part = part.strip()
        if not part:
            raise FilterSpecError(f"empty argument in spec {spec!r} (two commas in a row?)")
        key, eq, value = part.partition("=")
        key = key.strip()
        if not key.isidentifier():
            raise FilterSpecError(f"invalid argument name {key!r} in spec {spec!r}")
        if key in args:
            raise FilterSpecError(f"argument {key!r} given twice in spec {spec!r}")
        args[key] = value.strip() if eq else "true"
    return name, args


def register_filter(cls: type[Filter], name: str | None = None, *, replace: bool = False) -> type[Filter]:
    """Register a filter class at run time (tests, notebooks), beside entry points.

    Usable as a decorator. A name that is already registered (by entry point or
    here) raises, like FreeBSD's EEXIST, unless ``replace`` is true.
    """
    if not (isinstance(cls, type) and issubclass(cls, Filter)):
        raise TypeError(f"register_filter() needs a Filter subclass, not {cls!r}")
    name = name or cls.name
    if not name or not _NAME_RE.match(name):
        raise FilterSpecError(f"cannot register {cls.__name__}: give it a valid name (class attribute 'name' or name=...)")
    if not replace and (name in _runtime or name in _entry_points()):
        raise FilterSpecError(f"a filter named {name!r} is already registered; pass replace=True to override it")
    if not cls.name:
        cls.name = name
    _runtime[name] = cls
    return cls


@lru_cache(maxsize=1)
def _entry_points() -> dict[str, list[EntryPoint]]:
    found: dict[str, list[EntryPoint]] = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        bucket = found.setdefault(ep.name, [])
        # The same distribution can show up twice (e.g. an editable install
        # seen through two sys.path entries): keep one per target.
        if all(other.value != ep.value for other in bucket):
            bucket.append(ep)
    return found


def _dist_name(ep: EntryPoint) -> str:
    dist = getattr(ep, "dist", None)
    return f"{dist.name} {dist.version}" if dist is not None else "an unknown distribution"


def _load_entry_point(name: str, ep: EntryPoint) -> type[Filter]:
    try:
        obj = ep.load()
    except Exception as exc:  # a broken plugin must not take the caller down unexplained
        raise FilterLoadError(
            f"filter {name!r} from {_dist_name(ep)} failed to load ({ep.value}): {type(exc).__name__}: {exc}"
        ) from exc
    if not (isinstance(obj, type) and issubclass(obj, Filter)):
        raise FilterLoadError(
            f"filter {name!r} from {_dist_name(ep)} points at {ep.value}, which is not an acceptfilter.Filter subclass"
        )
    if not obj.name:
        obj.name = name
    return obj


def filter_class(name: str) -> type[Filter]:
    """The class registered under ``name`` (run-time registrations win)."""
    if name in _runtime:
        return _runtime[name]
    eps = _entry_points().get(name)
    if not eps:
        names = sorted(set(_entry_points()) | set(_runtime))
        known = ", ".join(names) or "none"
        raise UnknownFilterError(
            f"unknown filter {name!r}{did_you_mean(name, names)}; registered filters: {known}. "
            f"A plugin registers one under the entry-point group {ENTRY_POINT_GROUP!r} "
            "(re-install an editable package after adding entry points)."
        )
    if len(eps) > 1:
        owners = " and ".join(f"{_dist_name(ep)} ({ep.value})" for ep in eps)
        raise FilterLoadError(f"filter name {name!r} is registered twice, by {owners}; uninstall one of them")
    return _load_entry_point(name, eps[0])


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """``" (did you mean 'timeout'?)"`` for the closest choice to a typo (difflib), or ``""``."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


#: What a value of each annotated type looks like, for the message when it is not one.
_EXPECTED = {
    bool: "one of 1/0, true/false, yes/no, on/off",
    int: "a whole number (like 5 or 0x10)",
    float: "a number (like 5 or 0.5)",
}


def _convert(key: str, raw: str, annotation: Any, spec: str) -> Any:
    """Convert one spec value to the type annotated on the filter's __init__."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(annotation) if a is not type(None)]
        if raw.lower() in {"none", ""} and len(options) < len(typing.get_args(annotation)):
            return None
        annotation = options[0] if len(options) == 1 else str
        origin = typing.get_origin(annotation)
    try:
        if annotation is bool:
            low = raw.lower()
            if low in _TRUE:
                return True
            if low in _FALSE:
                return False
            raise ValueError(raw)
        if annotation is int:
            return int(raw, 0)
        if annotation is float:
            return float(raw)
        if origin is tuple or annotation is tuple:
            return tuple(item.strip() for item in raw.split("|") if item.strip())
        return raw
    except ValueError:
        # Python's wording ("invalid literal for int() with base 0") means nothing to a user.
        type_name = getattr(annotation, "__name__", str(annotation))
        expected = _EXPECTED.get(annotation, f"a {type_name}")
        raise FilterSpecError(f"argument {key}={raw!r} in spec {spec!r} is not valid: expected {expected}") from None


def _keyword_types(cls: type[Filter]) -> dict[str, Any]:
    """Keyword parameters of cls.__init__ (through its bases) and their types."""
    types_by_name: dict[str, Any] = {}
    for klass in reversed(cls.__mro__):
        init = klass.__dict__.get("__init__")
        if init is None or not issubclass(klass, Filter):
            continue
        try:
            hints = typing.get_type_hints(init)
        except Exception:
            hints = {}
        for param in inspect.signature(init).parameters.values():
            if param.name == "self" or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
                continue
            types_by_name[param.name] = hints.get(param.name, str)
    return types_by_name


def _instantiate(cls: type[Filter], text_args: Mapping[str, str], py_args: Mapping[str, Any], spec: str) -> Filter:
    accepted = _keyword_types(cls)
    unknown = sorted((set(text_args) | set(py_args)) - set(accepted))
    if unknown:
        hint = did_you_mean(unknown[0], accepted) if len(unknown) == 1 else ""
        raise FilterSpecError(
            f"filter {cls.name!r} has no argument {', '.join(map(repr, unknown))} (in spec {spec!r}){hint}; "
            f"it takes: {', '.join(sorted(accepted)) or 'no arguments'}"
        )
    kwargs = {key: _convert(key, raw, accepted[key], spec) for key, raw in text_args.items()}
    kwargs.update(py_args)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise FilterSpecError(f"filter {cls.name!r} rejected spec {spec!r}: {exc}") from None


def load_filter(spec: str | Filter, **kwargs: Any) -> Filter:
    """Build a filter from a spec string (or return a ``Filter`` instance as is).

    Keyword arguments are passed to the filter's constructor as Python values
    and override arguments of the same name in the spec.
    """
    if isinstance(spec, Filter):
        if kwargs:
            raise FilterSpecError("keyword arguments cannot be applied to an already built Filter instance")
        return spec
    if isinstance(spec, type) and issubclass(spec, Filter):
        raise FilterSpecError(f"pass an instance ({spec.__name__}()) or a spec string, not the class {spec.__name__}")
    name, raw_args = parse_spec(spec)
    text_args = {k: v for k, v in raw_args.items() if k not in kwargs}
    return _instantiate(filter_class(name), text_args, kwargs, spec)


def load_chain(specs: str | Filter | Iterable[str | Filter]) -> tuple[Filter, ...]:
    """Build a chain: one spec, or several in order (each sees the bytes after the previous one's consume)."""
    if isinstance(specs, (str, Filter)):
        return (load_filter(specs),)
    chain = tuple(load_filter(s) for s in specs)
    if not chain:
        raise FilterSpecError("a filter chain needs at least one filter")
    return chain


def available_filters() -> list[FilterInfo]:
    """Every registered filter, loaded to read its description; broken ones say why."""
    infos: list[FilterInfo] = []
    for name, eps in sorted(_entry_points().items()):
        for ep in eps:
            try:
                cls = _load_entry_point(name, ep)
                desc, error = cls.describe(), None
            except FilterLoadError as exc:
                desc, error = "", str(exc)
            infos.append(FilterInfo(name, _dist_name(ep), desc, ep.value, error))
    for name, cls in sorted(_runtime.items()):
        infos.append(FilterInfo(name, "(registered at run time)", cls.describe(), f"{cls.__module__}:{cls.__qualname__}"))
    return infos


def _clear_cache() -> None:
    """Forget discovered entry points (after installing a plugin in-process)."""
    _entry_points.cache_clear()

