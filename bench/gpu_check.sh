#!/usr/bin/env bash
# The GPU checks in one call (device machine: torch with CUDA, no Ray/DeepSpeed needed).
# Run from the repository root:  bash bench/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total --format=csv || true
timeout 480 python -m bench.gpu_check --device cuda --steps 10
