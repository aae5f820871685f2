#!/usr/bin/env bash
# Install what the benchmarks need (Debian packages, a venv with the project and its
# bench extra), run them and render the README block and the plot from the results.
#   ./scripts/bench.sh                  # the full run (~15 minutes)
#   ./scripts/bench.sh --quick          # under 3 minutes
#   ./scripts/bench.sh --only overhead,surface
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
while read -r pkg; do
  [[ -z "$pkg" || "$pkg" == \#* ]] && continue
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done < requirements/apt-bench.txt
if ((${#missing[@]})); then
  echo "installing Debian packages: ${missing[*]}"
  SUDO=""; [[ $(id -u) -ne 0 ]] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

PY=${PYTHON:-python3}
[[ -x .venv/bin/python ]] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q -e '.[bench]'
.venv/bin/python bench/run.py "$@"
exec .venv/bin/python bench/report.py
