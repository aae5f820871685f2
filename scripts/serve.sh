#!/usr/bin/env bash
# Install acceptfilter into .venv and serve the current directory (or the
# arguments' --directory) over HTTP through httpready. Args go to `acceptfilter serve`.
set -euo pipefail
here="$(pwd)"
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[[ -x .venv/bin/python ]] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q .
cd "$here"
exec "$(dirname "$0")/../.venv/bin/acceptfilter" serve "$@"
