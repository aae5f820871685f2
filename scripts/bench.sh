#!/usr/bin/env bash
# Install what the benchmarks need (Debian packages, a venv with the project and its
# bench extra), run them and render the docs block (docs/benchmarks.md) and the plot from the results.
#   ./scripts/bench.sh                  # the full run (about half an hour on 2 cores)
#   ./scripts/bench.sh --quick          # about 5 minutes on 2 cores
#   ./scripts/bench.sh --only overhead,surface
set -euo pipefail
cd "$(dirname "$0")/.."

source scripts/setup-lib.sh

install_debian_packages requirements/apt-bench.txt
project_venv bench
.venv/bin/python bench/run.py "$@"
exec .venv/bin/python bench/report.py
