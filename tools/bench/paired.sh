#!/usr/bin/env bash
# A change's speed-up on one benchmark cell, measured in pairs: two sftd binaries (or one binary
# under two environments) run back to back, in alternating order (A B, B A, A B, …), so that
# each pair sees the same machine; prints each pair's tokens/s and ratio B / A, then the best and
# median of each side and the median and geometric mean of the ratios. On a shared machine
# whose speed drifts by ±30 % within minutes, the per-pair ratio resolves effects that separate
# runs of whole sets cannot.
#
#   tools/bench/paired.sh ROUNDS A B [sftd bench flags…]
#
# A and B: a path to an sftd binary, or `ENV=VALUE` (then BIN is the binary for both sides).
# Env (defaults in brackets): MODEL [/tmp/sftd-bench/qwen3-0.6b-layers-8l-v4096]  BIN
# [target/release/sftd]  BATCH [1]  SEQ [512]  STEPS [4]  THREADS [2]; THREADS= (empty) leaves
# RAYON_NUM_THREADS and CANDLE_NUM_THREADS unset, as a plain `sftd serve` runs
# Example (the layer shape at batch 1, no checkpointing, main's build against this one):
#   tools/bench/paired.sh 6 /tmp/sftd-main target/release/sftd --loss-on all --no-checkpointing
set -euo pipefail
cd "$(dirname "$0")/../.."
[ $# -ge 3 ] || { sed -n 2,17p "$0"; exit 2; }
ROUNDS=$1 A=$2 B=$3
shift 3
MODEL=${MODEL:-/tmp/sftd-bench/qwen3-0.6b-layers-8l-v4096}
BIN=${BIN:-target/release/sftd}
THREADS=${THREADS-2}
if [ -n "$THREADS" ]; then
  export RAYON_NUM_THREADS=$THREADS CANDLE_NUM_THREADS=$THREADS
else
  unset RAYON_NUM_THREADS CANDLE_NUM_THREADS
fi

# One run of side $1; prints its tokens/s.
run() {
  local side=$1 bin=$BIN env=()
  shift
  if [[ $side == *=* ]]; then env=("$side"); else bin=$side; fi
  env "${env[@]}" "$bin" bench --model "$MODEL" --data examples/tool_calls.jsonl \
    --batch-size "${BATCH:-1}" --seq-len "${SEQ:-512}" --steps "${STEPS:-4}" "$@" --json |
    python3 -c 'import json, sys; print(round(json.load(sys.stdin)["tokens_per_second"], 1))'
}

for i in $(seq 1 "$ROUNDS"); do
  if (( i % 2 )); then a=$(run "$A" "$@"); b=$(run "$B" "$@"); else b=$(run "$B" "$@"); a=$(run "$A" "$@"); fi
  echo "$a $b"
done | python3 -c '
import statistics as st, sys
pairs = [tuple(map(float, line.split())) for line in sys.stdin]
for a, b in pairs:
    print(f"A {a:7.1f}  B {b:7.1f}  B/A {b / a:.3f}")
a, b = [p[0] for p in pairs], [p[1] for p in pairs]
r = [y / x for x, y in pairs]
print(f"A best / median {max(a):.1f} / {st.median(a):.1f} tokens/s; "
      f"B best / median {max(b):.1f} / {st.median(b):.1f}; "
      f"B/A median {st.median(r):.3f}, geometric mean {st.geometric_mean(r):.3f} ({len(r)} pairs)")
'
