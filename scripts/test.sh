#!/usr/bin/env bash
# Sets up everything the tests need on a fresh machine, then runs ruff and the test suite.
# Usage: bash scripts/test.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# A real Prometheus server for the observability tests (Debian's package; starts nothing).
if ! command -v prometheus >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -qq --no-install-recommends prometheus >/dev/null) \
        || echo "warning: could not install prometheus; its tests will fail" >&2
fi
export DS_ACCELERATOR=cpu
.venv/bin/ruff check .
.venv/bin/python -m pytest -q -ra "$@"
