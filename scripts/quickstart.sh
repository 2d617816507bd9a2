#!/usr/bin/env bash
# The main job on a fresh Debian machine (as root): install everything, generate a sparse volume
# image, copy it with progress and verification, and print the summary.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/install-system-deps.sh
bash scripts/install-python.sh

mkdir -p demo
.venv/bin/python benchmarks/workloads.py sparse demo/volume.img --size 4G --allocated 0.05
rm -f demo/copy.img
.venv/bin/volcopy copy demo/volume.img demo/copy.img --verify
