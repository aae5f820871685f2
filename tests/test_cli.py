"""The acceptfilter command, run as a user would run it."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

# The console script installed beside this interpreter (the venv's bin/), else PATH.
_BESIDE = Path(sys.executable).parent / "acceptfilter"
EXE = str(_BESIDE) if _BESIDE.exists() else (shutil.which("acceptfilter") or "")
needs_exe = pytest.mark.skipif(not EXE, reason="the acceptfilter console script is not installed (pip install the project)")


def run(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "acceptfilter.cli", *args], capture_output=True, text=True, timeout=timeout)


def test_list_shows_builtins_with_distribution() -> None:
    out = run("list")
    assert out.returncode == 0, out.stderr
    lines = {line.split()[0]: line for line in out.stdout.splitlines()}
    assert "acceptfilter" in lines["httpready"] and "request head" in lines["httpready"]
    assert "dataready" in lines
    data = json.loads(run("list", "--json").stdout)
    assert {d["name"] for d in data} >= {"dataready", "httpready"}


@needs_exe
def test_serve_serves_files_through_httpready(tmp_path: Path) -> None:
    (tmp_path / "hello.txt").write_text("hello from acceptfilter\n")
    proc = subprocess.Popen([EXE, "serve", "--port", "0", "--directory", str(tmp_path), "--timeout", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        banner = proc.stdout.readline()
        assert "through httpready" in banner and "deadline 2 s" in banner
        url = banner.split(" on ", 1)[1].split()[0]
        idle = socket.create_connection((url.split("//")[1].split(":")[0], int(url.rsplit(":", 1)[1].strip("/"))))
        start = time.monotonic()
        curl = shutil.which("curl")
        assert curl, "curl is needed (scripts/test.sh installs it)"
        got = subprocess.run([curl, "-sS", "--max-time", "5", url + "hello.txt"], capture_output=True, text=True)
        assert got.stdout == "hello from acceptfilter\n", got.stderr
        assert time.monotonic() - start < 2
        idle.close()
    finally:
        proc.terminate()
        proc.wait(5)
