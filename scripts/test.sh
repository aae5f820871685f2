#!/usr/bin/env bash
# Install everything the test suite needs (Debian packages, a venv with the
# project and its test extra) and run the whole suite. Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup-lib.sh

install_debian_packages requirements/apt-test.txt
project_venv test
exec .venv/bin/python -m pytest "$@"
