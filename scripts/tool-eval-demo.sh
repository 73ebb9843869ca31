#!/usr/bin/env bash
# Runs the bundled demo job (examples/job.json: sftd-demo, examples/tool_calls.jsonl, validation
# examples/tool_calls_val.jsonl) through a real server and prints its tool-call evaluations.
#   scripts/tool-eval-demo.sh [SFTD_BIN] [OUT_DIR]     (defaults: target/debug/sftd, a temp dir)
# Extra hyperparameters can be merged in with HP='{"n_epochs": 3}'.
# Needs curl and jq. Writes OUT_DIR/events.json, OUT_DIR/job.json and OUT_DIR/metrics.csv.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${1:-target/debug/sftd}
OUT=${2:-$(mktemp -d)}
HP=${HP:-'{}'}
mkdir -p "$OUT"
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
S=http://127.0.0.1:$PORT
SFTD_ADDR=127.0.0.1:$PORT SFTD_DATA_DIR="$OUT/data" SFTD_DEVICE=cpu "$BIN" serve >"$OUT/server.log" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 1 100); do curl -sf "$S/healthz" >/dev/null && break; sleep 0.2; done

upload() { curl -sf "$S/v1/files" -F purpose=fine-tune -F "file=@$1" | jq -r .id; }
TRAIN=$(upload examples/tool_calls.jsonl)
VAL=$(upload examples/tool_calls_val.jsonl)
BODY=$(jq --arg t "$TRAIN" --arg v "$VAL" --argjson hp "$HP" \
  '.training_file = $t | .validation_file = $v
   | .method.supervised.hyperparameters += $hp' examples/job.json)
JOB=$(curl -sf "$S/v1/fine_tuning/jobs" -H 'Content-Type: application/json' -d "$BODY" | jq -r .id)
echo "job $JOB (server log: $OUT/server.log)"
START=$(date +%s)
while :; do
  STATUS=$(curl -sf "$S/v1/fine_tuning/jobs/$JOB" | jq -r .status)
  case $STATUS in succeeded|failed|cancelled) break ;; esac
  sleep 5
done
echo "status $STATUS after $(( $(date +%s) - START )) s"
curl -sf "$S/v1/fine_tuning/jobs/$JOB" >"$OUT/job.json"
curl -sf "$S/v1/fine_tuning/jobs/$JOB/events?limit=10000" | jq .data >"$OUT/events.json"
CSV=$(jq -r '.result_files[]' "$OUT/job.json" | while read -r f; do
  [ "$(curl -sf "$S/v1/files/$f" | jq -r .filename)" = metrics.csv ] && echo "$f"; done)
[ -n "$CSV" ] && curl -sf "$S/v1/files/$CSV/content" >"$OUT/metrics.csv"
jq -r '.[] | select(.type == "metrics" and .data.valid_loss != null) | .message' "$OUT/events.json"
echo "tool-call evaluations:"
jq -r '.[] | select(.type == "metrics" and .data.tool_eval_examples != null) | .message' "$OUT/events.json"
