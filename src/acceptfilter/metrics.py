"""Prometheus exposition of a listener's counters (optional extra ``acceptfilter[prometheus]``).

The collector reads ``stats()`` at scrape time, so the engine's hot path pays
nothing for it: no metric objects are updated per connection.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol

from .errors import AcceptFilterError

__all__ = ["PrometheusCollector", "PrometheusMissingError", "exposition"]


class PrometheusMissingError(AcceptFilterError, ImportError):
    """prometheus_client is not installed."""


class _HasStats(Protocol):
    def stats(self) -> dict[str, Any]: ...


#: stats() key -> (metric name suffix, help). Monotonic counters.
_COUNTERS = {
    "accepted": "connections the core accepted from the kernel",
    "surfaced": "connections handed to the application",
    "rejected": "connections the filters rejected",
    "timed_out": "connections whose deadline passed while held",
    "evicted": "held connections evicted because max_held was reached",
    "closed_empty": "connections closed by the client before sending anything",
    "aborted": "connections the peer reset, or closed mid-request, before a decision (health checks)",
    "failed": "connections that failed while held: a filter error or a fault on this side",
    "dropped": "connections closed by a timeout/eviction/error policy",
    "detached": "held connections given up undecided for another holder (detach_held)",
    "filter_errors": "filter exceptions and contract violations",
    "unclaimed": "surfaced connections the application never accepted",
    "fd_exhaustion": "EMFILE/ENFILE events while accepting",
    "accept_errors": "accept() errors",
    "peeks": "MSG_PEEK calls",
    "bytes_peeked": "bytes peeked",
}
#: Gauges: what is true right now.
_GAUGES = {
    "held": "connections held by the accept filter now",
    "queued": "surfaced connections waiting for accept()",
    "waiting_with_data": "held connections that sent bytes but are undecided",
}


def _client() -> Any:
    try:
        import prometheus_client.core as core
    except ImportError:
        raise PrometheusMissingError(
            "Prometheus exposition needs prometheus_client: pip install 'acceptfilter[prometheus]'"
        ) from None
    return core


class PrometheusCollector:
    """A prometheus_client collector over ``source.stats()`` (a FilteredListener or Router).

    Register it with ``prometheus_client.REGISTRY.register(PrometheusCollector(listener))``.
    ``labels`` (e.g. ``{"listener": "web"}``) tell several listeners apart.
    """

    def __init__(self, source: _HasStats, *, prefix: str = "acceptfilter", labels: dict[str, str] | None = None) -> None:
        self._core = _client()
        self._source = source
        self._prefix = prefix
        self._labels = dict(labels or {})

    def describe(self) -> list[Any]:
        return []  # metrics are produced at scrape time; nothing to pre-register

    def collect(self) -> Iterator[Any]:
        core, p, names = self._core, self._prefix, list(self._labels)
        values = list(self._labels.values())
        stats = self._source.stats()
        for key, doc in _COUNTERS.items():
            if key in stats:
                m = core.CounterMetricFamily(f"{p}_{key}", doc, labels=names)
                m.add_metric(values, float(stats[key]))
                yield m
        for key, doc in _GAUGES.items():
            if key in stats:
                g = core.GaugeMetricFamily(f"{p}_{key}", doc, labels=names)
                g.add_metric(values, float(stats[key]))
                yield g
        for key, label, doc in (
            ("surfaced_by_route", "route", "connections surfaced, by route"),
            ("surfaced_by_reason", "reason", "connections surfaced, by why (ready, timeout, evicted ...)"),
            ("filter_errors_by_filter", "filter", "filter errors, by filter"),
        ):
            m = core.CounterMetricFamily(f"{p}_{key}", doc, labels=[*names, label])
            for name, count in sorted(stats.get(key, {}).items()):
                m.add_metric([*values, str(name)], float(count))
            yield m
        hist = stats["time_to_surface"]
        buckets: list[tuple[str, float]] = []
        running = 0
        for bound, count in zip(hist["buckets"], hist["counts"], strict=False):
            running += count
            buckets.append((repr(float(bound)), float(running)))
        buckets.append(("+Inf", float(hist["count"])))
        h = core.HistogramMetricFamily(
            f"{p}_time_to_surface_seconds", "seconds from the core's accept to surfacing (what clients wait)",
            labels=names,
        )
        h.add_metric(values, buckets, float(hist["sum"]))
        yield h


def exposition(source: _HasStats, **kwargs: Any) -> bytes:
    """The Prometheus text format for one listener (for a /metrics handler or a file)."""
    _client()
    from prometheus_client import CollectorRegistry, generate_latest

    registry = CollectorRegistry(auto_describe=False)
    registry.register(PrometheusCollector(source, **kwargs))
    return bytes(generate_latest(registry))
