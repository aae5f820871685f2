"""Prometheus exposition of a listener's counters (optional extra ``acceptfilter[prometheus]``).

The collector reads ``stats()`` at scrape time, so the engine's hot path pays
nothing for it: no metric objects are updated per connection.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, Protocol

from .errors import AcceptFilterError

__all__ = ["PortCollector", "PrometheusCollector", "PrometheusMissingError", "exposition", "metric_names"]


class PrometheusMissingError(AcceptFilterError, ImportError):
    """prometheus_client is not installed."""


class _HasStats(Protocol):
    def stats(self) -> dict[str, Any]: ...


#: stats() key -> (metric name, help). Monotonic counters; prometheus_client adds ``_total``.
#: Names follow Prometheus' conventions: base units (bytes, seconds), no label name inside a name.
_COUNTERS = {
    "accepted": ("accepted", "connections the core accepted from the kernel"),
    "surfaced": ("surfaced", "connections handed to the application"),
    "surfaced_by_core": ("surfaced_by_core", "of those, certified by the filter's compiled matcher in C, no Python run"),
    "surfaced_at_accept": ("surfaced_at_accept", "of those, certified at accept and handed straight to accept()"),
    "rejected": ("rejected", "connections the filters rejected"),
    "timed_out": ("timed_out", "connections whose deadline passed while held"),
    "evicted": ("evicted", "held connections evicted because max_held was reached"),
    "evicted_idle": ("evicted_idle", "of those, idle ones (nothing sent)"),
    "evicted_partial": ("evicted_partial", "of those, partial ones (a request begun)"),
    "timed_out_idle": ("timed_out_idle", "timed-out connections that were idle (the idle limit)"),
    "aborted": ("aborted", "connections the peer reset, or closed mid-request, before a decision (health checks)"),
    "closed_empty": ("closed_empty", "connections closed by the client before sending anything"),
    "failed": ("failed", "connections that failed while held: a filter error or a fault on this side"),
    "dropped": ("dropped", "connections closed by a timeout/eviction/error policy"),
    "detached": ("detached", "held connections given up undecided for another holder (detach_held)"),
    "filter_errors": ("filter_errors", "filter exceptions and contract violations"),
    "unclaimed": ("unclaimed", "surfaced connections the application never accepted"),
    "fd_exhaustion": ("fd_exhaustion", "EMFILE/ENFILE events while accepting"),
    "accept_errors": ("accept_errors", "accept() errors"),
    "peeks": ("peeks", "MSG_PEEK calls"),
    "bytes_peeked": ("peeked_bytes", "bytes peeked"),
}
#: Gauges: what is true right now.
_GAUGES = {
    "held": ("held_connections", "connections held by the accept filter now"),
    "held_idle": ("held_idle_connections", "held connections that have sent nothing"),
    "held_partial": ("held_partial_connections", "held connections that sent a part of something"),
    "waiting_with_data": ("waiting_with_data_connections", "held connections that sent bytes but are undecided"),
    "queued": ("queued_connections", "surfaced connections waiting for accept()"),
    "oldest_held_age": ("oldest_held_age_seconds", "seconds the oldest held connection has waited"),
    "buffered_bytes": ("buffered_bytes", "peek buffer bytes allocated now"),
    "engines": ("engines", "engines (processes) publishing on this port"),
}
#: stats() mapping key -> (metric name, label, help): counters split by one label.
_SPLITS = (
    ("surfaced_by_route", "routed", "route", "connections surfaced into each route"),
    ("surfaced_by_reason", "surface_decisions", "reason", "connections surfaced, by why (ready, timeout, evicted ...)"),
    ("filter_errors_by_filter", "filter_exceptions", "name", "filter errors, by filter"),
    ("evicted_by_reason", "evictions", "reason", "held connections evicted, by why"),
)
#: The metric names the exporters serve (the Grafana dashboard's test checks its queries against them).
KERNEL_GAUGES = {
    "accept_queue": ("kernel_accept_queue_connections", "connections in the kernel's accept queue now"),
    "backlog": ("kernel_backlog_connections", "the listen backlog the kernel uses (after somaxconn)"),
    "syn_recv": ("kernel_syn_recv_connections", "request sockets in SYN_RECV (TCP_DEFER_ACCEPT holds them there)"),
    "drops": ("kernel_drops", "the listeners' sk_drops: handshakes dropped before the accept queue "
                              "(with TCP_DEFER_ACCEPT also each deferred handshake)"),
}


def metric_names(prefix: str = "acceptfilter") -> dict[str, str]:
    """Every sample name the exporters can serve, with the stats() key it comes from (``kernel:KEY`` for the kernel's).

    A counter or gauge is served when the engine's stats() has its key: one added by
    a later engine appears without a change here, one not there yet is left out.
    """
    names = {f"{prefix}_{n}_total": key for key, (n, _) in _COUNTERS.items()}
    names |= {f"{prefix}_{n}": key for key, (n, _) in _GAUGES.items()}
    names |= {f"{prefix}_{n}_total": key for key, n, _, _ in _SPLITS}
    names |= {f"{prefix}_{n}": f"kernel:{key}" for key, (n, _) in KERNEL_GAUGES.items()}
    names |= {f"{prefix}_time_to_surface_seconds{s}": "time_to_surface" for s in ("_bucket", "_sum", "_count")}
    return names


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
        yield from families(self._core, self._source.stats(), self._prefix, self._labels)


def families(core: Any, stats: dict[str, Any], prefix: str, labels: dict[str, str],
             kernel: dict[str, int | None] | None = None) -> Iterator[Any]:
    """Metric families for one stats() mapping (one engine, or several summed), and the kernel's gauges."""
    p, names, values = prefix, list(labels), list(labels.values())
    for key, (name, doc) in _COUNTERS.items():
        if key in stats:
            m = core.CounterMetricFamily(f"{p}_{name}", doc, labels=names)
            m.add_metric(values, float(stats[key]))
            yield m
    for key, (name, doc) in _GAUGES.items():
        if key in stats:
            g = core.GaugeMetricFamily(f"{p}_{name}", doc, labels=names)
            g.add_metric(values, float(stats[key]))
            yield g
    for key, name, label, doc in _SPLITS:  # an empty split (no filter error yet) is still a family to query
        m = core.CounterMetricFamily(f"{p}_{name}", doc, labels=[*names, label])
        for sub, count in sorted(stats.get(key, {}).items()):
            m.add_metric([*values, str(sub)], float(count))
        yield m
    for key, (name, doc) in KERNEL_GAUGES.items():
        value = (kernel or {}).get(key)
        if value is not None:
            g = core.GaugeMetricFamily(f"{p}_{name}", doc, labels=names)
            g.add_metric(values, float(value))
            yield g
    hist = stats.get("time_to_surface")
    if not hist:
        return
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


class PortCollector:
    """Every engine on a port (or on each of several), summed from their stats files, with the kernel's view.

    What ``--metrics-port`` serves for ``serve`` (one worker or many), ``run`` and
    gunicorn's filter process. Each port is a ``port`` label on every sample.
    """

    def __init__(self, ports: int | Sequence[int], *, prefix: str = "acceptfilter", labels: dict[str, str] | None = None) -> None:
        self._core = _client()
        self.ports = [ports] if isinstance(ports, int) else list(ports)
        self._prefix = prefix
        self._labels = dict(labels or {})

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Iterator[Any]:
        merged: dict[str, Any] = {}
        for port in self.ports:
            for family in self._port(port):
                if family.name in merged:
                    merged[family.name].samples.extend(family.samples)
                else:
                    merged[family.name] = family
        yield from merged.values()

    def _port(self, port: int) -> Iterator[Any]:
        from .portview import PortView, port_views

        try:
            views = port_views(port)
        except AcceptFilterError:  # no kernel view (sock_diag refused): the engines alone
            from .statsfile import read_port

            views = [PortView(port, engines=read_port(port))]
        view = views[0] if views else PortView(port)
        kernel: dict[str, int | None] = {}
        if view.listeners:
            kernel = {"accept_queue": view.accept_queue, "backlog": view.backlog, "drops": view.drops,
                      "syn_recv": sum(v.syn_recv for v in view.listeners)}
        stats = view.total
        stats.setdefault("engines", 0)
        yield from families(self._core, stats, self._prefix, {"port": str(port), **self._labels}, kernel)


def exposition(source: _HasStats | int | Sequence[int], **kwargs: Any) -> bytes:
    """The Prometheus text format for one listener, or every engine on a port (an int) or on several."""
    _client()
    from prometheus_client import CollectorRegistry, generate_latest

    registry = CollectorRegistry(auto_describe=False)
    registry.register(PrometheusCollector(source, **kwargs) if hasattr(source, "stats") else PortCollector(source, **kwargs))
    return bytes(generate_latest(registry))
