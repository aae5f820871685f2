"""Packaging as PyPI and a user see it: manylinux2014 (glibc 2.17) abi3 wheels for x86_64 and aarch64, made
by scripts/build-wheels.sh (zig cross-compiles against glibc 2.17), checked symbol by symbol and by
`auditwheel show`, installed into fresh venvs that serve a real request; an sdist that can build the core
and run the README's first two commands."""

from __future__ import annotations

import io
import re
import shutil
import subprocess
import sys
import tarfile
import textwrap
import urllib.request
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


#: The oldest glibc the wheels promise: manylinux2014 (CentOS 7); Debian 11, Ubuntu 20.04 and RHEL 8 are newer.
GLIBC_FLOOR = (2, 17)
#: The CPUs a wheel is built for, and the ELF machine its shared objects must be.
ARCHS = {"x86_64": "EM_X86_64", "aarch64": "EM_AARCH64"}


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Path], Path]:
    """The wheels by CPU and the sdist, made by the script a release uses (about 30 s with a warm zig cache,
    2-3 min cold on two loaded cores)."""
    pytest.importorskip("build", reason="the 'build' package is part of the test extra")
    pytest.importorskip("auditwheel", reason="auditwheel is part of the test extra")
    pytest.importorskip("ziglang", reason="ziglang (the cross-compiler) is part of the test extra")
    out = tmp_path_factory.mktemp("dist")
    proc = subprocess.run([str(ROOT / "scripts" / "build-wheels.sh"), str(out)], capture_output=True, text=True,
                          timeout=600, env={"PYTHON": sys.executable, "PATH": "/usr/bin:/bin",
                                            "HOME": str(Path.home())})  # zig caches its glibc stubs there
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    wheels = {arch: wheel for arch in ARCHS for wheel in out.glob(f"acceptfilter-*_{arch}.whl")}
    assert len(wheels) == len(ARCHS) == len(list(out.glob("*.whl"))), sorted(p.name for p in out.iterdir())
    (sdist,) = out.glob("acceptfilter-*.tar.gz")
    return wheels, sdist


def glibc_needs(data: bytes) -> tuple[str, set[tuple[int, ...]]]:
    """The ELF machine of a shared object and every GLIBC_x.y version its symbols need (.gnu.version_r)."""
    from elftools.elf.elffile import ELFFile  # pyelftools: auditwheel's own ELF reader
    from elftools.elf.gnuversions import GNUVerNeedSection

    elf = ELFFile(io.BytesIO(data))
    versions: set[tuple[int, ...]] = set()
    for section in elf.iter_sections():
        if isinstance(section, GNUVerNeedSection):
            for _, auxiliaries in section.iter_versions():
                for aux in auxiliaries:
                    if (found := re.fullmatch(r"GLIBC_([\d.]+)", aux.name)) is not None:
                        versions.add(tuple(int(part) for part in found.group(1).split(".")))
    return str(elf["e_machine"]), versions


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHS)
def test_every_shared_object_needs_glibc_2_17_at_most(built: tuple[dict[str, Path], Path], arch: str) -> None:
    wheel = built[0][arch]
    with zipfile.ZipFile(wheel) as archive:
        objects = {name: archive.read(name) for name in archive.namelist() if name.endswith(".so")}
    assert len(objects) == 3, sorted(objects)  # _core, _relay, _look
    for name, data in objects.items():
        machine, versions = glibc_needs(data)
        assert machine == ARCHS[arch], (name, machine)
        assert versions, f"{name} names no glibc version at all: not a glibc build?"
        assert max(versions) <= GLIBC_FLOOR, f"{name} needs GLIBC_{'.'.join(map(str, max(versions)))}"


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHS)
def test_auditwheel_show_agrees_on_manylinux2014(built: tuple[dict[str, Path], Path], arch: str) -> None:
    wheel = built[0][arch]
    assert wheel.name.endswith(f"-cp311-abi3-manylinux2014_{arch}.manylinux_2_17_{arch}.whl"), wheel.name
    shown = subprocess.run([sys.executable, "-m", "auditwheel", "show", str(wheel)], capture_output=True, text=True,
                           timeout=120)
    assert shown.returncode == 0, shown.stdout + shown.stderr
    text = " ".join(shown.stdout.split())  # auditwheel wraps its lines
    assert f'consistent with the following platform tag: "manylinux_2_17_{arch}"' in text, text
    assert "following external shared libraries are required" not in text, text  # nothing to vendor
    assert "manylinux_2_1" not in text.replace("manylinux_2_17", ""), text  # no other policy named


@pytest.mark.slow
def test_wheel_is_manylinux_abi3_with_every_package(built: tuple[dict[str, Path], Path]) -> None:
    wheel = built[0]["x86_64"]
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
def test_sdist_can_build_the_core_and_run_the_readme_commands(built: tuple[dict[str, Path], Path]) -> None:
    _, sdist = built
    with tarfile.open(sdist) as archive:
        names = {n.split("/", 1)[1] for n in archive.getnames() if "/" in n}
    assert {"scripts/serve.sh", "scripts/test.sh", "scripts/setup-lib.sh", "requirements/apt-test.txt",
            "src/acceptfilter/_core_build.py", "src/acceptfilter/_relay_build.py", "src/acceptfilter/_look_build.py",
            "csrc/afcore.c", "csrc/afmatch.c", "csrc/afqueue.c", "csrc/aflook.c", "csrc/pylook.c",
            "csrc/afrelay.c", "tests/conftest.py"} <= names
    assert not any("__pycache__" in n or n.endswith(".so") for n in names)


def interpreters() -> list[str]:
    """The running CPython and the newest other one >= 3.12 on PATH or in pyenv: the abi3 wheel serves them all."""
    found = [sys.executable]
    pyenv = sorted((Path.home() / ".pyenv" / "versions").glob("3.1[2-9]*/bin/python3"), reverse=True)
    for path in [shutil.which(f"python3.{minor}") for minor in (14, 13, 12)] + [str(p) for p in pyenv]:
        if path is not None:
            version = subprocess.run([path, "-c", "import sys; print(sys.version_info[:2] > (3, 11))"],
                                     capture_output=True, text=True, timeout=60)
            if version.stdout.strip() == "True" and version.returncode == 0:
                found.append(path)
                break
    return found


def serve_one_request(venv: Path, where: Path) -> str:
    """Start the installed `acceptfilter serve` and fetch a file through its filtered listener."""
    (where / "hello.txt").write_text("hello from the wheel\n")
    proc = subprocess.Popen([str(venv / "bin" / "acceptfilter"), "serve", "--port", "0", "--directory", str(where),
                             "--no-status"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=where)
    try:
        assert proc.stdout is not None
        banner = proc.stdout.readline()  # "Serving DIR on http://127.0.0.1:PORT/ through httpready ..."
        found = re.search(r" on http://127\.0\.0\.1:(\d+)/ through", banner)
        assert found, banner + (proc.stderr.read() if proc.stderr and proc.poll() is not None else "")
        url = f"http://127.0.0.1:{found.group(1)}/hello.txt"
        with urllib.request.urlopen(url, timeout=60) as response:
            return str(response.read().decode())
    finally:
        proc.terminate()
        proc.wait(60)


@pytest.mark.slow
@pytest.mark.parametrize("python", interpreters(), ids=lambda p: "running" if p == sys.executable else "newest")
def test_repaired_wheel_works_in_a_fresh_venv(built: tuple[dict[str, Path], Path], tmp_path: Path,
                                               python: str) -> None:
    wheel = built[0]["x86_64"]
    venv = tmp_path / "fresh"
    subprocess.run([python, "-m", "venv", str(venv)], check=True, timeout=120)
    pip = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", str(wheel)],
                         capture_output=True, text=True, timeout=300)
    assert pip.returncode == 0, pip.stdout[-2000:] + pip.stderr[-2000:]
    listed = subprocess.run([str(venv / "bin" / "acceptfilter"), "list"], capture_output=True, text=True, timeout=60,
                            cwd=tmp_path)
    assert listed.returncode == 0 and "httpready" in listed.stdout, listed.stdout + listed.stderr
    smoke = subprocess.run([str(venv / "bin" / "python"), "-c", SMOKE], capture_output=True, text=True, timeout=120,
                           cwd=tmp_path)
    assert smoke.stdout.strip() == "ok", smoke.stdout + smoke.stderr
    assert serve_one_request(venv, tmp_path) == "hello from the wheel\n"
