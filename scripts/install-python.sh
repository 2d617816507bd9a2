#!/usr/bin/env bash
# Installs volcopy (and the given extras, e.g. "test") into the project's virtual environment .venv.
# The native core is compiled by pip through scikit-build-core and CMake.
set -euo pipefail
cd "$(dirname "$0")/.."

extras=${1:-}
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet ".${extras:+[$extras]}"
