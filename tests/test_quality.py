"""The code stays warning-free: the C core with -Wall -Wextra, Python with ruff and mypy --strict."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler (cc) on PATH")
@pytest.mark.parametrize("flags", [["-O2"], ["-O1", "-DAF_DEBUG"]], ids=["release", "assertions"])
@pytest.mark.parametrize("source", ["afcore.c", "afqueue.c", "aflook.c", "afsrc.c"])
def test_c_core_compiles_without_warnings(tmp_path: Path, flags: list[str], source: str) -> None:
    out = subprocess.run(
        ["cc", "-std=c11", *flags, "-Wall", "-Wextra", "-Werror", "-c", str(ROOT / "csrc" / source), "-o", str(tmp_path / "core.o")],
        capture_output=True, text=True,
    )
    assert out.returncode == 0, out.stderr


@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler (cc) on PATH")
def test_look_extension_compiles_without_warnings(tmp_path: Path) -> None:
    """csrc/pylook.c (acceptfilter._look) against this Python's headers, with the limited API it declares."""
    import sysconfig

    out = subprocess.run(
        ["cc", "-std=c11", "-O2", "-Wall", "-Wextra", "-Werror", f"-I{sysconfig.get_paths()['include']}",
         f"-I{ROOT / 'csrc'}", "-c", str(ROOT / "csrc/pylook.c"), "-o", str(tmp_path / "pylook.o")],
        capture_output=True, text=True,
    )
    assert out.returncode == 0, out.stderr


def test_cffi_declarations_come_from_the_header() -> None:
    """The cdef is generated from csrc/afcore.h: every function the header declares is callable."""
    import re

    from acceptfilter import _core

    header = "".join((ROOT / "csrc" / name).read_text() for name in ("afcore.h", "afqueue.h", "aflook.h"))
    declared = set(re.findall(r"^\w[\w\s\*]*?\b(afq?_\w+)\(", header, re.MULTILINE))
    assert {"af_new", "af_poll", "af_peer", "af_set_clock", "af_set_queue", "afq_new", "afq_take", "af_look"} <= declared
    missing = [name for name in declared if not hasattr(_core.lib, name)]
    assert not missing, f"declared in afcore.h but not built: {missing}"


def test_c_core_has_no_protocol_knowledge() -> None:
    source = "".join((ROOT / "csrc" / name).read_text().lower()
                     for name in ("afcore.c", "afqueue.c", "afqueue.h", "aflook.c", "aflook.h", "afsrc.c", "afsrc.h", "pylook.c"))
    for word in ("http", "tls", "proxy", "get ", "dns"):
        assert word not in source, f"the C core mentions {word!r}: protocol logic belongs in filters"


def _tool(module: str) -> None:
    try:
        __import__(module)
    except ImportError:
        pytest.fail(f"{module} is not installed: it is part of the test extra (pip install -e '.[test]')")


def test_ruff_clean() -> None:
    _tool("ruff")
    out = subprocess.run([sys.executable, "-m", "ruff", "check", "src", "filters", "tests", "bench", "scripts"],
                         cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_mypy_strict_clean() -> None:
    _tool("mypy")
    out = subprocess.run([sys.executable, "-m", "mypy"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler (cc) on PATH")
def test_c_matcher_compiles_without_warnings(tmp_path: Path) -> None:
    out = subprocess.run(
        ["cc", "-std=c11", "-O2", "-Wall", "-Wextra", "-Werror", "-c", str(ROOT / "csrc/afmatch.c"), "-o", str(tmp_path / "afmatch.o")],
        capture_output=True, text=True,
    )
    assert out.returncode == 0, out.stderr


def test_c_matcher_has_no_protocol_knowledge() -> None:
    """Matchers are declared by filters; the interpreter knows bytes, lengths and frames only."""
    source = ((ROOT / "csrc/afmatch.c").read_text() + (ROOT / "csrc/afmatch.h").read_text()).lower()
    for word in ("http", "tls", "proxy", "get ", "dns", "clienthello"):
        assert not re.search(rf"\b{word}", source), f"the C matcher mentions {word!r}: protocol logic belongs in filters"
