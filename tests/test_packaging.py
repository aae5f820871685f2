"""Packaging as PyPI and a user see it: a manylinux abi3 wheel, repaired by scripts/build-wheels.sh,
installed into a fresh venv; an sdist that can build the core and run the README's first two commands."""

from __future__ import annotations

import re
import subprocess
import sys
import tarfile
import textwrap
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = sorted(
    ".".join(p.parent.relative_to(ROOT / "src").parts) for p in (ROOT / "src" / "acceptfilter").rglob("__init__.py")
)

SMOKE = textwrap.dedent('''
    import socket, sys, acceptfilter, acceptfilter._core, acceptfilter._look
    assert "site-packages" in acceptfilter.__file__, acceptfilter.__file__    # the installed wheel, not src/
    sock = socket.create_server(("127.0.0.1", 0))
    with acceptfilter.wrap(sock, "httpready", core="c", timeout=10) as listener:
        client = socket.create_connection(sock.getsockname())
        client.sendall(b"GET /x HTTP/1.1\\r\\nHost: h\\r\\n\\r\\n")
        listener.settimeout(30)
        conn, _, info = listener.accept_with_info()
        assert info["target"] == "/x" and conn.recv(100).startswith(b"GET /x"), info
        conn.close(); client.close()
    try:
        import acceptfilter._core_build
    except ImportError:
        print("ok")
    else:
        sys.exit("the cffi builder was shipped")
''')


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    pytest.importorskip("build", reason="the 'build' package is part of the test extra")
    pytest.importorskip("auditwheel", reason="auditwheel is part of the test extra")
    out = tmp_path_factory.mktemp("dist")
    proc = subprocess.run([str(ROOT / "scripts" / "build-wheels.sh"), str(out)], capture_output=True, text=True,
                          timeout=300, env={"PYTHON": sys.executable, "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (wheel,) = out.glob("acceptfilter-*.whl")
    (sdist,) = out.glob("acceptfilter-*.tar.gz")
    return wheel, sdist


@pytest.mark.slow
def test_wheel_is_manylinux_abi3_with_every_package(built: tuple[Path, Path]) -> None:
    wheel, _ = built
    assert re.search(r"-cp311-abi3-(manylinux\d+_x86_64\.)?manylinux_2_\d+_x86_64\.whl$", wheel.name), wheel.name
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        text = archive.read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    for module in ("_core", "_relay", "_look"):  # the cffi core and relay, the worker's look (csrc/pylook.c)
        assert any(n.startswith(f"acceptfilter/{module}.") and n.endswith(".abi3.so") for n in names), module
    assert "acceptfilter/_look.pyi" in names
    assert not {"acceptfilter/_core_build.py", "acceptfilter/_relay_build.py", "acceptfilter/_look_build.py"} & names  # build-time files
    assert {f"{pkg.replace('.', '/')}/__init__.py" for pkg in PACKAGES} <= names, "a package is missing from the wheel"
    assert {"acceptfilter/filters/httpready.py", "acceptfilter/py.typed"} <= names
    assert "httpready = acceptfilter.filters.httpready:HttpReady" in text and "acceptfilter = acceptfilter.cli:main" in text


@pytest.mark.slow
def test_sdist_can_build_the_core_and_run_the_readme_commands(built: tuple[Path, Path]) -> None:
    _, sdist = built
    with tarfile.open(sdist) as archive:
        names = {n.split("/", 1)[1] for n in archive.getnames() if "/" in n}
    assert {"scripts/serve.sh", "scripts/test.sh", "scripts/setup-lib.sh", "requirements/apt-test.txt",
            "src/acceptfilter/_core_build.py", "src/acceptfilter/_relay_build.py", "src/acceptfilter/_look_build.py",
            "csrc/afcore.c", "csrc/afmatch.c", "csrc/afqueue.c", "csrc/aflook.c", "csrc/pylook.c",
            "csrc/afrelay.c", "tests/conftest.py"} <= names
    assert not any("__pycache__" in n or n.endswith(".so") for n in names)


@pytest.mark.slow
def test_repaired_wheel_works_in_a_fresh_venv(built: tuple[Path, Path], tmp_path: Path) -> None:
    wheel, _ = built
    venv = tmp_path / "fresh"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    pip = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", str(wheel)],
                         capture_output=True, text=True, timeout=300)
    assert pip.returncode == 0, pip.stdout[-2000:] + pip.stderr[-2000:]
    listed = subprocess.run([str(venv / "bin" / "acceptfilter"), "list"], capture_output=True, text=True, timeout=60,
                            cwd=tmp_path)
    assert listed.returncode == 0 and "httpready" in listed.stdout, listed.stdout + listed.stderr
    smoke = subprocess.run([str(venv / "bin" / "python"), "-c", SMOKE], capture_output=True, text=True, timeout=120,
                           cwd=tmp_path)
    assert smoke.stdout.strip() == "ok", smoke.stdout + smoke.stderr
