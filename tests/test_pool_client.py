"""A balancer's pool against every server model with DEFAULT settings: every request answered.

Issue 23: with the old defaults a connection pre-opened by a balancer and used
after 8 s got an empty reply (0 of 500). Each server runs as a user would start
it (gunicorn ``-c python:acceptfilter.gunicorn`` with only
``ACCEPTFILTER_FILTER=httpready``, waitress through its integration, ``serve``
and ``run -- uvicorn`` with no options); the pool (tests' and users' helper:
:mod:`acceptfilter.testing.pool`) leaves each connection idle longer than the
old 5 s deadline, then uses it twice. Light traffic alone, then while 1,000 idle
+ 200 slowloris connections attack from another address (127.0.0.2), with the
server at ``ulimit -n 1024``, the common default, so its fd-derived max_held is
smaller than the attack and holding it takes evictions, by source.
"""

from __future__ import annotations

import tempfile
from contextlib import ExitStack

import pytest

from acceptfilter.testing.pool import BalancerPool, PoolReport

pytest.importorskip("gunicorn", reason="gunicorn is not installed (the test extra)")
pytest.importorskip("waitress", reason="waitress is not installed (the test extra)")
pytest.importorskip("uvicorn", reason="uvicorn is not installed (the test extra)")

from bench.defaults import start_server
from bench.slowclient import start_attack

MODELS = ["gunicorn-sync", "gunicorn-gthread", "waitress", "serve", "uvicorn"]
#: Longer than the old 5 s deadline, spread so the connections are used one after another.
IDLE = [5.5 + i * 0.1 for i in range(10)]


def _pool(port: int) -> PoolReport:
    return BalancerPool(("127.0.0.1", port), size=len(IDLE), idle=IDLE, uses=2, timeout=60).run()


def _check(report: PoolReport) -> None:
    assert report.all_answered and report.unanswered == 0, report
    assert set(report.statuses) == {200}, report


@pytest.mark.parametrize("model", MODELS)
def test_pool_is_answered_with_default_settings(model: str) -> None:
    with tempfile.TemporaryDirectory(prefix="af-pool-") as tmp, ExitStack() as stack:
        port, error = start_server(stack, model, tmp)
        assert not error, error
        _check(_pool(port))


@pytest.mark.parametrize("model", MODELS)
def test_pool_is_answered_under_attack_from_one_address(model: str) -> None:
    with tempfile.TemporaryDirectory(prefix="af-pool-") as tmp, ExitStack() as stack:
        port, error = start_server(stack, model, tmp, nofile=1024)
        assert not error, error
        attack, said = start_attack(stack, port, idle=1000, slowloris=200, seconds=300)
        assert said.get("opened", 0) >= 1000, said
        _check(_pool(port))
        assert attack.poll() is None  # the attack went on for the whole time
