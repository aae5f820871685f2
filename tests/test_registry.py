"""Entry-point discovery and the spec grammar."""

from __future__ import annotations

import sys
from importlib.metadata import EntryPoint

import pytest
from acceptfilter.filters.httpready import HttpReady

import acceptfilter
from acceptfilter import registry


def test_builtins_are_registered_by_entry_point() -> None:
    infos = {i.name: i for i in acceptfilter.available_filters()}
    assert {"dataready", "httpready"} <= set(infos)
    assert infos["httpready"].distribution.startswith("acceptfilter ")
    assert infos["httpready"].target == "acceptfilter.filters.httpready:HttpReady"
    assert "request head" in infos["httpready"].description
    assert all(i.error is None for i in infos.values())


@pytest.mark.parametrize(
    ("spec", "name", "args"),
    [
        ("httpready", "httpready", {}),
        (" dataready:min_bytes=4 ", "dataready", {"min_bytes": "4"}),
        ("httpready:timeout=5,max_bytes=8192", "httpready", {"timeout": "5", "max_bytes": "8192"}),
        ("x:flag", "x", {"flag": "true"}),
        ("tlsready:sni=a.example|*.b.example", "tlsready", {"sni": "a.example|*.b.example"}),
    ],
)
def test_parse_spec(spec: str, name: str, args: dict[str, str]) -> None:
    assert registry.parse_spec(spec) == (name, args)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("", "empty filter name"),
        (":x=1", "empty filter name"),
        ("http ready", "invalid filter name"),
        ("httpready:", "no arguments after it"),
        ("httpready:a=1,,b=2", "empty argument"),
        ("httpready:9x=1", "invalid argument name"),
        ("httpready:timeout=1,timeout=2", "given twice"),
    ],
)
def test_malformed_specs(spec: str, message: str) -> None:
    with pytest.raises(acceptfilter.FilterSpecError, match=message):
        acceptfilter.load_filter(spec)


def test_load_filter_converts_types_and_reports_bad_values() -> None:
    flt = acceptfilter.load_filter("httpready:timeout=2.5,max_bytes=0x2000,non_http=reject")
    assert isinstance(flt, HttpReady)
    assert (flt.timeout, flt.max_bytes, flt.non_http) == (2.5, 8192, "reject")
    with pytest.raises(acceptfilter.FilterSpecError, match=r"max_bytes='lots'.*expected a whole number \(like 5") as bad:
        acceptfilter.load_filter("httpready:max_bytes=lots")
    assert "int()" not in str(bad.value)  # never Python's own wording
    with pytest.raises(acceptfilter.FilterSpecError, match=r"timeout='soon'.*expected a number"):
        acceptfilter.load_filter("httpready:timeout=soon")
    with pytest.raises(acceptfilter.FilterSpecError, match="has no argument 'colour'.*it takes: body, max_bytes"):
        acceptfilter.load_filter("httpready:colour=blue")
    with pytest.raises(acceptfilter.FilterSpecError, match="non_http must be"):
        acceptfilter.load_filter("httpready:non_http=maybe")
    assert acceptfilter.load_filter("httpready", max_bytes=100).max_bytes == 100
    same = HttpReady()
    assert acceptfilter.load_filter(same) is same
    with pytest.raises(acceptfilter.FilterSpecError, match="not the class"):
        acceptfilter.load_filter(HttpReady)  # type: ignore[arg-type]


def test_typos_get_the_closest_name() -> None:
    with pytest.raises(acceptfilter.FilterSpecError, match=r"no argument 'timout'.*\(did you mean 'timeout'\?\)"):
        acceptfilter.load_filter("httpready:timout=5")
    with pytest.raises(acceptfilter.UnknownFilterError, match=r"unknown filter 'htpready' \(did you mean 'httpready'\?\)"):
        acceptfilter.load_filter("htpready")
    with pytest.raises(acceptfilter.FilterSpecError) as far:
        acceptfilter.load_filter("httpready:colour=blue")
    assert "did you mean" not in str(far.value)  # nothing close: no guess


def test_unknown_filter_names_the_registered_ones() -> None:
    with pytest.raises(acceptfilter.UnknownFilterError, match="unknown filter 'htpready'.*dataready, dnsready, httpready, proxy, silent, sshready, tlsready"):
        acceptfilter.load_filter("htpready")


def test_broken_plugin_names_its_distribution(monkeypatch: pytest.MonkeyPatch) -> None:
    broken = EntryPoint("brokenfilter", "acceptfilter_no_such_module:Thing", registry.ENTRY_POINT_GROUP)
    not_a_filter = EntryPoint("notafilter", "os:getcwd", registry.ENTRY_POINT_GROUP)
    real = dict(registry._entry_points())
    monkeypatch.setattr(registry, "_entry_points", lambda: {**real, "brokenfilter": [broken], "notafilter": [not_a_filter]})
    with pytest.raises(acceptfilter.FilterLoadError, match="'brokenfilter' from .* failed to load.*ModuleNotFoundError"):
        acceptfilter.load_filter("brokenfilter")
    with pytest.raises(acceptfilter.FilterLoadError, match="not an acceptfilter.Filter subclass"):
        acceptfilter.load_filter("notafilter")
    listed = {i.name: i for i in acceptfilter.available_filters()}
    assert listed["brokenfilter"].error and "failed to load" in listed["brokenfilter"].error
    assert listed["httpready"].error is None


def test_duplicate_names_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    one = EntryPoint("dup", "acceptfilter.filters.httpready:HttpReady", registry.ENTRY_POINT_GROUP)
    two = EntryPoint("dup", "acceptfilter.filters.dataready:DataReady", registry.ENTRY_POINT_GROUP)
    monkeypatch.setattr(registry, "_entry_points", lambda: {"dup": [one, two]})
    with pytest.raises(acceptfilter.FilterLoadError, match="registered twice"):
        acceptfilter.load_filter("dup")


def test_register_filter_at_run_time(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry, "_runtime", {})

    @acceptfilter.register_filter
    class Hello(acceptfilter.Filter):
        """Waits for the word hello."""

        name = "hello"

        def __init__(self, *, word: str = "hello", max_bytes: int = 64, timeout: float | None = None) -> None:
            super().__init__(max_bytes=max_bytes, timeout=timeout)
            self.word = word.encode()

        def check(self, data: bytes, final: bool) -> acceptfilter.Decision:
            if data.startswith(self.word):
                return acceptfilter.ACCEPT
            return acceptfilter.REJECT if final or not self.word.startswith(data) else acceptfilter.WAIT

    flt = acceptfilter.load_filter("hello:word=hi")
    assert isinstance(flt, Hello) and flt.word == b"hi"
    with pytest.raises(acceptfilter.FilterSpecError, match="already registered"):
        acceptfilter.register_filter(Hello)
    with pytest.raises(acceptfilter.FilterSpecError, match="already registered"):
        acceptfilter.register_filter(Hello, "httpready")
    assert "hello" in {i.name for i in acceptfilter.available_filters()}
    assert sys.modules[__name__]  # defined in a test file, found like a plugin
