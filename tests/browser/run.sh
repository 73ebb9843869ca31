#!/usr/bin/env bash
# The dashboard's tests: node unit tests, then real headless Chromium against the real sftd binary.
#   tests/browser/run.sh            (SFTD_BIN defaults to target/debug/sftd, relative to the repo root)
set -euo pipefail
cd "$(dirname "$0")"
if [ ! -x "${CHROMIUM:-/usr/bin/chromium}" ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi
npm ci --no-audit --no-fund --loglevel=error
node --test unit.test.mjs contract.test.mjs
node --test --test-concurrency=1 dashboard.test.mjs playground.test.mjs
