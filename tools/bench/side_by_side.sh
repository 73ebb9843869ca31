#!/usr/bin/env bash
# sftd bench and transformers + PEFT (compare.py) on the same models, data and batches,
# interleaved run by run (sftd, transformers, sftd, transformers, …) so that both engines see the
# same machine conditions; then a table of best and median tokens/s and peak RSS for each.
#
#   tools/bench/side_by_side.sh [WORKDIR]
#
# Env (defaults in brackets):
#   SFTD [target/release/sftd]   PY [/work/venv-ref/bin/python]   RUNS [3] runs per engine
#   SFTD_BEFORE [unset]: a second sftd binary (e.g. main's) run right after SFTD in every round,
#          so that a change's before and after figures come from the same machine conditions
#   SHAPES ["layers head"]: layers = Qwen3-0.6B's layer shape (hidden 1024, intermediate 3072,
#          16/8 heads of 128), 8 layers, vocabulary 4096, tied (the layers dominate, as in real
#          Qwen3 models); head = the same layers, 4 of them, with Qwen3's full 151936-token tied
#          vocabulary (the LM head is 70 % of the weights); layers-1.7b (not in the default set)
#          = Qwen3-1.7B's layer shape (hidden 2048, intermediate 6144, 16/8 heads of 128), 4 layers,
#          vocabulary 4096
#   BATCHES ["1 4"]   CKPT ["on off"] gradient checkpointing
#   LOSS_ON ["assistant all"]: sftd runs once per setting; transformers computes every
#          position's logits either way, so it runs once and both sftd settings compare to it
#   SEQ [512]  STEPS [5] timed steps (after one warm-up)  THREADS [2]
#   DROPOUT [0]: LoRA dropout for both engines (training's default is 0.05)
#   HF [1]: 0 skips transformers (an sftd before/after comparison only)
# Results: one JSON file per run in WORKDIR/runs, the summary table in WORKDIR/summary.md; each
# run's line on stdout ends with the load average (1, 5, 15 min) when it finished.
set -euo pipefail
cd "$(dirname "$0")/../.."
W=${1:-/tmp/sftd-bench}
SFTD=${SFTD:-target/release/sftd}
PY=${PY:-/work/venv-ref/bin/python}
RUNS=${RUNS:-3}; SHAPES=${SHAPES:-layers head}; BATCHES=${BATCHES:-1 4}; CKPT=${CKPT:-on off}
LOSS_ON=${LOSS_ON:-assistant all}; SEQ=${SEQ:-512}; STEPS=${STEPS:-5}; THREADS=${THREADS:-2}
DATA=examples/tool_calls.jsonl
DROPOUT=${DROPOUT:-0}
# Passed only when set, so that a SFTD_BEFORE binary without the flag still runs.
drop=(); [ "$DROPOUT" != 0 ] && drop=(--lora-dropout "$DROPOUT")
mkdir -p "$W/runs"
export RAYON_NUM_THREADS=$THREADS CANDLE_NUM_THREADS=$THREADS OMP_NUM_THREADS=$THREADS OPENBLAS_NUM_THREADS=$THREADS
# This machine sets OPENBLAS_CORETYPE for old OpenBLAS builds; it slows current ones.
unset OPENBLAS_CORETYPE OPENBLAS_L2_SIZE

model_dir() {
  case "$1" in
    layers) echo "$W/qwen3-0.6b-layers-8l-v4096" ;;
    head) echo "$W/qwen3-0.6b-4l-v151936" ;;
    layers-1.7b) echo "$W/qwen3-1.7b-layers-4l-v4096" ;;
    *) echo "unknown shape $1" >&2; exit 2 ;;
  esac
}
for s in $SHAPES; do
  M=$(model_dir "$s")
  [ -f "$M/model.safetensors" ] && continue
  case "$s" in
    layers) "$SFTD" demo-model "$M" --hidden 1024 --intermediate 3072 --layers 8 --heads 16 \
              --kv-heads 8 --head-dim 128 --vocab 4096 ;;
    head) "$SFTD" demo-model "$M" --hidden 1024 --intermediate 3072 --layers 4 --heads 16 \
              --kv-heads 8 --head-dim 128 --vocab 151936 ;;
    layers-1.7b) "$SFTD" demo-model "$M" --hidden 2048 --intermediate 6144 --layers 4 --heads 16 \
              --kv-heads 8 --head-dim 128 --vocab 4096 ;;
  esac
done

for s in $SHAPES; do
  M=$(model_dir "$s")
  for b in $BATCHES; do
    for c in $CKPT; do
      flag=""; [ "$c" = off ] && flag="--no-checkpointing"
      for r in $(seq 1 "$RUNS"); do
        for l in $LOSS_ON; do
          out="$W/runs/${s}_b${b}_ckpt${c}_${l}_sftd_r$r.json"
          "$SFTD" bench --model "$M" --data "$DATA" --batch-size "$b" --seq-len "$SEQ" \
            --steps "$STEPS" --loss-on "$l" $flag "${drop[@]}" --json > "$out"
          echo "sftd $s b$b ckpt $c loss $l run $r (load $(cut -d' ' -f1-3 /proc/loadavg)): $(cat "$out")"
          if [ -n "${SFTD_BEFORE:-}" ]; then
            out="$W/runs/${s}_b${b}_ckpt${c}_${l}_before_r$r.json"
            "$SFTD_BEFORE" bench --model "$M" --data "$DATA" --batch-size "$b" --seq-len "$SEQ" \
              --steps "$STEPS" --loss-on "$l" $flag "${drop[@]}" --json > "$out"
            echo "sftd (before) $s b$b ckpt $c loss $l run $r (load $(cut -d' ' -f1-3 /proc/loadavg)): $(cat "$out")"
          fi
        done
        [ "${HF:-1}" = 0 ] && continue
        out="$W/runs/${s}_b${b}_ckpt${c}_hf_r$r.json"
        "$PY" tools/bench/compare.py --model "$M" --data "$DATA" --batch-size "$b" --seq-len "$SEQ" \
          --steps "$STEPS" --warmup 1 --threads "$THREADS" --gc "$c" "${drop[@]}" --json-out "$out" > /dev/null
        echo "transformers $s b$b ckpt $c run $r (load $(cut -d' ' -f1-3 /proc/loadavg)): $(grep -o '"tokens_per_second": [0-9.]*' "$out")"
      done
    done
  done
done
"$PY" tools/bench/summarize.py "$W/runs" | tee "$W/summary.md"
