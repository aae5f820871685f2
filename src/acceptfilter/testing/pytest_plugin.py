"""pytest plugin (entry point ``pytest11``): a ``filter_checker`` fixture for filter authors.

Imported by every pytest run of every project that installs acceptfilter, so it imports
nothing heavy at module level: hypothesis is loaded only when the fixture is used.

    def test_my_filter(filter_checker):
        filter_checker(MyFilter())          # or "myfilter:arg=1"

It runs :func:`acceptfilter.testing.check_filter` with the budget ``acceptfilter fuzz`` uses
(1000 examples and the coverage-guided phase), or under the hypothesis profile the user
configured (``--hypothesis-profile``, ``settings.load_profile``); ``--filter-examples N``
overrides the example count for the whole run.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("acceptfilter")
    group.addoption(
        "--filter-examples",
        type=int,
        default=None,
        metavar="N",
        help="examples per filter_checker() call (default: acceptfilter fuzz's 1000, or your hypothesis profile's)",
    )


@pytest.fixture
def filter_checker(request: pytest.FixtureRequest) -> Callable[..., None]:
    """A callable ``check(filter_or_spec, payloads=None, **kwargs)`` that fuzzes a filter's contract."""
    examples: int | None = request.config.getoption("--filter-examples")

    def check(filter_or_spec: Any, payloads: Any = None, **kwargs: Any) -> None:
        from .check import check_filter

        if examples is not None:
            kwargs.setdefault("max_examples", examples)
        check_filter(filter_or_spec, payloads, **kwargs)

    return check
