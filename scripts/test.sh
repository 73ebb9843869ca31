#!/usr/bin/env bash
# The whole test suite: Rust unit + integration tests (real HTTP on ephemeral ports, the real binary),
# then the dashboard in a real headless Chromium against the real server.
# Needs: Rust with cargo-nextest; Node.js 20+ and Debian's `chromium` for the browser tests.
# Installs the S3-compatible server the storage tests run (s3s-fs, cached in /var/cache/sftd).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-s3-server.sh >/dev/null
profile=${NEXTEST_PROFILE:-default}
cargo nextest run --profile "$profile"
# The browser suite drives the binary nextest just built.
SFTD_BIN="${CARGO_TARGET_DIR:-target}/debug/sftd" bash tests/browser/run.sh
