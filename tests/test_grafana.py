"""The shipped Grafana dashboard only queries metrics the exporter serves."""

from __future__ import annotations

import json
import re
import socket
from pathlib import Path
from typing import Any

import pytest

import acceptfilter
from acceptfilter.metrics import exposition, metric_names

from .conftest import wait_for

DASHBOARD = Path(__file__).resolve().parent.parent / "contrib" / "grafana" / "acceptfilter.json"
METRIC = re.compile(r"\b(acceptfilter_[a-z_]+)\b")


def _queries(node: Any) -> list[str]:
    """Every PromQL text in the dashboard: panel targets' expr and template variables' query."""
    found: list[str] = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("expr", "query") and isinstance(value, str):
                found.append(value)
            else:
                found += _queries(value)
    elif isinstance(node, list):
        for item in node:
            found += _queries(item)
    return found


def test_every_dashboard_query_names_a_metric_the_exporter_serves() -> None:
    pytest.importorskip("prometheus_client")
    from prometheus_client.parser import text_string_to_metric_families

    dashboard = json.loads(DASHBOARD.read_text())
    used = {name for query in _queries(dashboard) for name in METRIC.findall(query)}
    assert len(used) >= 10, used  # the dashboard was read
    catalogue = metric_names()
    assert used <= set(catalogue), sorted(used - set(catalogue))

    # The catalogue is what a live exporter really serves, for every key the engine has today.
    with socket.create_server(("127.0.0.1", 0)) as sock:
        port = sock.getsockname()[1]
        with acceptfilter.wrap(sock, "httpready", timeout=30) as listener:
            with socket.create_connection(("127.0.0.1", port)) as client:
                client.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                conn, _ = listener.accept()
                conn.close()
            wait_for(lambda: b"acceptfilter_surfaced_total" in exposition(port)
                     and b'acceptfilter_surfaced_total{port="%d"} 1.0' % port in exposition(port), 30)
            stats = listener.stats()
            served: set[str] = set()
            for family in text_string_to_metric_families(exposition(port).decode()):
                served |= {family.name, f"{family.name}_total"} | {s.name for s in family.samples}
    for name in used:
        key = catalogue[name]
        if key.startswith("kernel:") or key in stats or key in ("engines", "queued", "oldest_held_age"):
            assert name in served, f"{name} (from {key}) is in the dashboard but not served"
