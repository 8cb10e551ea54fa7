#!/usr/bin/env bash
# Sets up everything the tests need on a fresh machine, then runs ruff and the test suite.
# Usage: bash scripts/test.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# Debian packages the tests use: a real Prometheus server (observability tests; the
# package starts nothing) and two CJK fonts (the glyph experiment's tiny run needs two
# renders of each character).
need=()
command -v prometheus >/dev/null 2>&1 || need+=(prometheus)
[ -e /usr/share/fonts/truetype/wqy/wqy-zenhei.ttc ] || need+=(fonts-wqy-zenhei)
[ -e /usr/share/fonts/truetype/droid/DroidSansFallbackFull.ttf ] || need+=(fonts-droid-fallback)
if [ ${#need[@]} -gt 0 ] && command -v apt-get >/dev/null 2>&1; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null) \
        || echo "warning: could not install ${need[*]}; the tests that need them fail" >&2
fi
export DS_ACCELERATOR=cpu
.venv/bin/ruff check .
.venv/bin/python -m pytest -q -ra "$@"
