"""The README's examples run as written."""

from __future__ import annotations

import re
from pathlib import Path

from acceptfilter import Verdict

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def test_own_filter_example_works() -> None:
    block = re.search(r"```python\n(from acceptfilter import ACCEPT.*?)```", README, re.S)
    assert block, "the README lost its 'Writing your own filter' example"
    namespace: dict[str, object] = {}
    exec(block.group(1), namespace)
    flt = namespace["RedisReady"]()  # type: ignore[operator]
    assert flt.check(b"PING\r\n", False).info["command"] == "PING"
    assert flt.check(b"PI", False).verdict is Verdict.WAIT
    assert flt.check(b"", True).verdict is Verdict.REJECT


def test_the_two_commands_are_documented() -> None:
    assert "./scripts/serve.sh" in README and "./scripts/test.sh" in README
    ci = (Path(__file__).resolve().parents[1] / ".ci" / "run").read_text()
    assert "./scripts/test.sh" in ci
