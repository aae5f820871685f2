"""The sdist carries the C sources, and a wheel built from it has the compiled core and the filters."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_built_from_sdist_has_the_core(tmp_path: Path) -> None:
    pytest.importorskip("build", reason="the 'build' package is part of the test extra")
    sdist_dir, wheel_dir = tmp_path / "sdist", tmp_path / "wheel"
    out = subprocess.run([sys.executable, "-m", "build", "--sdist", "-o", str(sdist_dir), str(ROOT)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    (sdist,) = sdist_dir.glob("acceptfilter-*.tar.gz")
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(wheel_dir), str(sdist)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    (wheel,) = wheel_dir.glob("acceptfilter-*.whl")
    assert "-cp311-abi3-" in wheel.name
    names = zipfile.ZipFile(wheel).namelist()
    assert any(n.startswith("acceptfilter/_core") and n.endswith(".so") for n in names)
    assert {"acceptfilter/filters/httpready.py", "acceptfilter/filters/dataready.py", "acceptfilter/py.typed"} <= set(names)
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "[acceptfilter.filters]" in text and "httpready = acceptfilter.filters.httpready:HttpReady" in text
