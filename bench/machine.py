"""Machine facts recorded in every result file (numbers mean nothing without them)."""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
import sys
from typing import Any


def _cmd_version(argv: list[str], pattern: str) -> str | None:
    if shutil.which(argv[0]) is None:
        return None
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    m = re.search(pattern, out.stdout + out.stderr)
    return m.group(1) if m else None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _pkg_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def _loadavg() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def facts() -> dict[str, Any]:
    """Cores, kernel, Python, CPU model and the versions of every tool a benchmark may drive."""
    return {
        "cores": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "python_implementation": sys.implementation.name,
        "cpu_model": _cpu_model(),
        "acceptfilter": _pkg_version("acceptfilter"),
        "gunicorn": _pkg_version("gunicorn"),
        "wrk": _cmd_version(["wrk", "-v"], r"wrk (\S+)"),
        "nginx": _cmd_version(["nginx", "-v"], r"nginx/(\S+)"),
        "loadavg_at_start": _loadavg(),
    }


if __name__ == "__main__":
    import json

    print(json.dumps(facts(), indent=2))
