#!/usr/bin/env bash
# Installs what testing needs (system packages too) and runs the whole test suite.
# Needs root for loop devices and mounts; under CI=true a skipped test fails the run.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/install-system-deps.sh
bash scripts/install-python.sh test

.venv/bin/ruff check python tests benchmarks

# Two workers (pytest-xdist): most tests wait on a guest, a daemon or a timeout rather than compute.
# The libvirt guests' tests share one worker (conftest.py): one libvirtd per host.
.venv/bin/python -m pytest -rs -n 2 --dist loadgroup "$@"
