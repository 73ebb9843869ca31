#!/usr/bin/env bash
# sftd bench and transformers + PEFT (compare.py) on the same model, data and batch, one after the
# other on an otherwise idle machine. Prints both tables; paste them into docs/benchmarks.md.
#
#   tools/bench/side_by_side.sh [WORKDIR]
#
# Env: SFTD (default target/release/sftd), SFTD_BLAS (an `--features openblas` build, optional),
#      PY (default /work/venv-ref/bin/python), LAYERS (4), SEQ (512), STEPS (3), THREADS (2),
#      LOSS_ON (assistant | all; transformers computes every position's logits either way, sftd
#      only the labelled ones), BATCHES ("1 4").
set -euo pipefail
cd "$(dirname "$0")/../.."
W=${1:-/tmp/sftd-bench}
SFTD=${SFTD:-target/release/sftd}
PY=${PY:-/work/venv-ref/bin/python}
LAYERS=${LAYERS:-4}; SEQ=${SEQ:-512}; STEPS=${STEPS:-3}; THREADS=${THREADS:-2}
LOSS_ON=${LOSS_ON:-assistant}; BATCHES=${BATCHES:-1 4}
DATA=examples/tool_calls.jsonl
mkdir -p "$W"
# Qwen3-0.6B's layer shapes and vocabulary (tied 151936 × 1024 embedding), LAYERS of its 28 layers.
M="$W/qwen3-0.6b-${LAYERS}l"
[ -f "$M/model.safetensors" ] || "$SFTD" demo-model "$M" --hidden 1024 --intermediate 3072 \
  --layers "$LAYERS" --heads 16 --kv-heads 8 --head-dim 128 --vocab 151936
export RAYON_NUM_THREADS=$THREADS CANDLE_NUM_THREADS=$THREADS OMP_NUM_THREADS=$THREADS OPENBLAS_NUM_THREADS=$THREADS
# This machine sets OPENBLAS_CORETYPE for old OpenBLAS builds; it slows current ones.
unset OPENBLAS_CORETYPE OPENBLAS_L2_SIZE
for b in $BATCHES; do
  "$SFTD" bench --model "$M" --data "$DATA" --batch-size $b --seq-len "$SEQ" --steps "$STEPS" --loss-on "$LOSS_ON" --json | tee -a "$W/sftd.jsonl"
  [ -n "${SFTD_BLAS:-}" ] && "$SFTD_BLAS" bench --model "$M" --data "$DATA" --batch-size $b --seq-len "$SEQ" --steps "$STEPS" --loss-on "$LOSS_ON" --json \
    | sed 's/"engine":"sftd (candle)"/"engine":"sftd (candle + OpenBLAS sgemm)"/' | tee -a "$W/sftd.jsonl"
  "$PY" tools/bench/compare.py --model "$M" --data "$DATA" --batch-size $b --seq-len "$SEQ" \
    --steps "$STEPS" --warmup 1 --threads "$THREADS" --gc on --loss-on "$LOSS_ON" \
    --json-out "$W/hf_b${b}_$LOSS_ON.json"
done
