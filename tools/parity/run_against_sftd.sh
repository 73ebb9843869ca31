#!/usr/bin/env bash
# End-to-end parity of `sftd train` against the PyTorch reference, on the tiny random Qwen3.
#
#   tools/parity/run_against_sftd.sh [WORKDIR]
#
# Env: SFTD (default target/release/sftd), PY (default /work/venv-ref/bin/python), STEPS (20),
#      LR (2e-3), MAX_GRAD_NORM (0.2: below the tiny model's early grad norms, so clipping is
#      exercised), DATA (examples/tool_calls.jsonl).
# Exit status: that of parity.py (then of logits_check.py when `sftd logits` exists).
set -euo pipefail
cd "$(dirname "$0")/../.."
W=${1:-/tmp/sftd-parity}
SFTD=${SFTD:-target/release/sftd}
PY=${PY:-/work/venv-ref/bin/python}
STEPS=${STEPS:-20}
LR=${LR:-2e-3}
MAX_GRAD_NORM=${MAX_GRAD_NORM:-0.2}
DATA=${DATA:-examples/tool_calls.jsonl}
mkdir -p "$W"
[ -f "$W/model/model.safetensors" ] || "$PY" tools/parity/make_tiny_model.py --out "$W"

cat > "$W/job.json" <<JSON
{
  "model": "$W/model",
  "training_file": "$DATA",
  "seed": 42,
  "init_adapter": "$W/adapter",
  "method": {"type": "supervised", "supervised": {"hyperparameters": {
    "n_epochs": 1, "max_steps": $STEPS, "batch_size": 4, "gradient_accumulation_steps": 4,
    "learning_rate": $LR, "warmup_ratio": 0.1, "lr_scheduler": "cosine", "max_seq_len": 512,
    "weight_decay": 0.0, "max_grad_norm": $MAX_GRAD_NORM, "loss_on": "assistant", "shuffle": false,
    "gradient_checkpointing": true,
    "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": "all-linear"}}}}
}
JSON

rm -rf "$W/out"
"$SFTD" train "$W/job.json" --output "$W/out"

"$PY" tools/parity/parity.py --model "$W/model" --data "$DATA" --init-adapter "$W/adapter" \
  --batch-size 4 --grad-accum 4 --steps "$STEPS" --lr "$LR" --warmup-ratio 0.1 --max-seq-len 512 \
  --max-grad-norm "$MAX_GRAD_NORM" --sftd-metrics "$W/out/metrics.jsonl" --sftd-adapter "$W/out/adapter"

if "$SFTD" logits --help >/dev/null 2>&1; then
  printf 'Hello Zürich! <tool_call>\n{"name": "get_weather", "arguments": {"city": "東京"}}\n</tool_call> & <b>ok</b>' > "$W/text.txt"
  "$SFTD" logits --model "$W/model" --adapter "$W/out/adapter" --text-file "$W/text.txt" --out "$W/logits.safetensors"
  "$PY" tools/parity/logits_check.py --model "$W/model" --adapter "$W/out/adapter" \
    --text-file "$W/text.txt" --logits "$W/logits.safetensors"
fi
