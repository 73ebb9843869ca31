#!/usr/bin/env bash
# The official OpenAI Python SDK against a live sftd: starts the built binary on a fresh data
# directory and runs tools/openai_sdk_check.py (files, fine-tuning jobs, events, checkpoints, then
# chat.completions.create plain, streamed and with tools on the fine-tuned model and a checkpoint).
# The SDK is installed once, pinned, into a venv under the cache directory (outside the clone).
#   bash scripts/openai-sdk-check.sh   (SFTD_BIN defaults to ${CARGO_TARGET_DIR:-target}/debug/sftd)
set -euo pipefail
cd "$(dirname "$0")/.."
OPENAI_VERSION=3.57.0   # the version this check last passed with
CACHE=${SFTD_CACHE:-/var/cache/sftd}
VENV=$CACHE/venv-openai-$OPENAI_VERSION
BIN=${SFTD_BIN:-${CARGO_TARGET_DIR:-target}/debug/sftd}
if [ -n "${SFTD_OPENAI_PYTHON:-}" ]; then
  PY=$SFTD_OPENAI_PYTHON   # a Python that already has the SDK
else
  if [ ! -x "$VENV/bin/python" ]; then
    mkdir -p "$CACHE"
    tmp=$(mktemp -d "$VENV.tmp.XXXXXX")
    python3 -m venv "$tmp"
    "$tmp/bin/pip" install --quiet --disable-pip-version-check "openai==$OPENAI_VERSION"
    rm -rf "$VENV" && mv "$tmp" "$VENV"
    # A moved venv keeps its old path in its scripts; `python -m` does not need them.
  fi
  PY=$VENV/bin/python
fi
# shellcheck source=scripts/live-server.sh
. scripts/live-server.sh
data=$(mktemp -d)
trap 'kill "${pid:-}" 2>/dev/null; wait "${pid:-}" 2>/dev/null; rm -rf "$data"' EXIT
start_sftd "$BIN" "$data"
"$PY" tools/openai_sdk_check.py --base-url "http://127.0.0.1:$port" || { tail -40 "$data/server.log"; exit 1; }
