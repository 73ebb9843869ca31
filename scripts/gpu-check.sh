#!/usr/bin/env bash
# One command for a GPU host: builds sftd with `cuda`, runs the CUDA tests (CUDA against the CPU:
# forward and LoRA gradients of a fixture model in f32, f16 and, from compute capability 8.0,
# bf16; each of sftd's CUDA kernels against its CPU kernel; dropout masks drawn on the device;
# the cached causal mask; a 20-step training run on the
# GPU against the same run on the CPU; greedy generation with an adapter against transformers +
# PEFT), one job through `sftd serve` on the GPU (tools/serve_e2e.py: train, chat, a forced tool
# call), 4 Qwen3-1.7B layers' step with sftd's CUDA kernels on and off, then `sftd bench --device cuda:0` on a random model shaped like Qwen3-1.7B at batch 4 × 2048 tokens with checkpointing on, next to transformers + PEFT on
# the same model and batch where python3 has them. Everything goes to one results file. See
# docs/gpu.md.
#
# Usage: scripts/gpu-check.sh [RESULTS_FILE]     (default: gpu-check-<gpu>-<date>.txt)
# Env:
#   SFTD_BIN           a `cuda` sftd binary built elsewhere (`scripts/cuda-build.sh build CAP` works
#                      on a machine without a GPU): no build here, so the host needs no Rust
#   SFTD_CUDA_TESTS    with SFTD_BIN: the CUDA test binary built with it (cuda-build.sh prints it)
#   CUDA_COMPUTE_CAP   compute capability to compile for (default: read from nvidia-smi)
#   SFTD_GPU_CHECK_DIR scratch directory for the 1.7B-shaped model (~7 GB) and data
#                      (default: target/gpu-check)
#   BENCH_STEPS        timed bench steps (default 5)
#   GPU_CHECK_PARTS    which parts to run (default all: "tests serve layers bench peft f16"); a lease too
#                      short for all of them can take them in two calls. `cpu` (never by default):
#                      the CPU engine's deciding cell against transformers + PEFT on this host's CPU
#                      (CPU_CHECK_CORES [0,1], CPU_CHECK_RUNS [7])
# Needs: an NVIDIA driver, python3 (to write the long-sequence bench data), and either Rust and a
# CUDA toolkit with nvcc on PATH (or CUDA_HOME) matching what cudarc supports, or the prebuilt
# binaries above. CUDA libraries the binary cannot find (cuBLAS, cuRAND, NVRTC, cudart) are looked
# for under /usr/local and /opt, where CUDA toolkits and Python's nvidia-* wheels put them.
# docs/cuda-build.md covers the toolchain.
set -euo pipefail
cd "$(dirname "$0")/.."

command -v nvidia-smi >/dev/null || { echo "gpu-check: no nvidia-smi: not a GPU host" >&2; exit 1; }
gpu_name=$(nvidia-smi --query-gpu=name --format=csv,noheader -i 0 | head -1)
cap=${CUDA_COMPUTE_CAP:-$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader -i 0 | head -1 | tr -d .)}
export CUDA_COMPUTE_CAP=$cap
slug=$(echo "$gpu_name" | tr -c 'A-Za-z0-9\n' '-' | tr -s '-')
results=${1:-gpu-check-${slug}-$(date -u +%Y%m%dT%H%M%SZ).txt}
scratch=${SFTD_GPU_CHECK_DIR:-target/gpu-check}
mkdir -p "$scratch"
: >"$results"
log() { printf '%s\n' "$*" | tee -a "$results"; }
step() { log ""; log "== $* ($(date -u +%H:%M:%S))"; }
status=0
parts=" ${GPU_CHECK_PARTS:-tests serve layers bench peft f16} "
part() { [[ $parts == *" $1 "* ]]; }

step "host"
log "gpu: $gpu_name, compute capability $cap"
nvidia-smi --query-gpu=driver_version,memory.total --format=csv -i 0 | tee -a "$results"
log "sftd: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' (modified)')"

if [ -n "${SFTD_BIN:-}" ]; then
  step "prebuilt binaries"
  bin=$SFTD_BIN
  tests=${SFTD_CUDA_TESTS:?SFTD_CUDA_TESTS must name the CUDA test binary built with SFTD_BIN}
  log "sftd: $bin; CUDA tests: $tests"
else
  step "build (--release --features cuda, CUDA_COMPUTE_CAP=$cap)"
  start=$(date +%s)
  cargo build --release --features cuda 2>&1 | tail -3 | tee -a "$results"
  tests=$(cargo test --release --features cuda --test cuda --no-run --message-format=json 2>/dev/null |
    grep '"kind":\["test"\]' | sed -n 's/.*"executable":"\([^"]*\)".*/\1/p' | tail -1)
  log "build: $(( $(date +%s) - start )) s"
  bin=target/release/sftd
fi

# The dynamic loader must find every CUDA library the binary was linked against. One walk of
# /usr/local and /opt lists the candidates for all of them (PyTorch's site-packages are large).
missing=$(ldd "$bin" | awk '/not found/ {print $1}' | sort -u)
if [ -n "$missing" ]; then
  names=()
  for lib in $missing; do names+=(-o -name "$lib"); done
  candidates=$(find /usr/local /opt -not -path '*/stubs/*' \( "${names[@]:1}" \) 2>/dev/null)
  for lib in $missing; do
    # A CUDA forward-compatibility driver only when nothing else is there.
    found=$(printf '%s\n' "$candidates" | awk -v lib="$lib" -F/ '$NF == lib' |
      awk '{ print (/\/compat\//) ? 1 : 0, $0 }' | sort -n -k1,1 -s | cut -d' ' -f2- | head -1)
    [ -n "$found" ] || { log "gpu-check: $lib not found on this host"; exit 1; }
    LD_LIBRARY_PATH=$(dirname "$found")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
    export LD_LIBRARY_PATH
    log "$lib: $found"
  done
fi
"$bin" --version | tee -a "$results"

# The CPU engine's deciding cell (docs/benchmarks.md): the layer shape at batch 1, no
# checkpointing, loss on every token, sftd and transformers + PEFT interleaved, 2 threads pinned to
# two cores, on this host's CPU (GPU hosts are Intel Xeons, which the build machines often are
# not). Only when asked for (`cpu` is not a default part) and python3 has torch, transformers, peft.
if part cpu; then
  step "CPU: the layer shape at batch 1, no checkpointing (2 threads on cores ${CPU_CHECK_CORES:-0,1})"
  log "cpu:$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2-), $(nproc) cores"
  log "isa: $(grep -ow 'avx2\|fma\|avx512f\|avx512bw\|avx512vl\|avx512_vnni\|avx512_bf16\|amx_tile' /proc/cpuinfo | sort -u | tr '\n' ' ')"
  if ! python3 -c 'import torch, transformers, peft' 2>/dev/null; then
    log "CPU cell: python3 has no torch/transformers/peft here"
    status=1
  elif ! PY=python3 SFTD="$bin" RUNS="${CPU_CHECK_RUNS:-7}" STEPS=5 SHAPES=layers BATCHES=1 \
    CKPT=off LOSS_ON=all taskset -c "${CPU_CHECK_CORES:-0,1}" \
    tools/bench/side_by_side.sh "$scratch/cpu-cell" 2>&1 | tee -a "$results"; then
    log "CPU cell: FAILED"
    status=1
  fi
fi

if part tests; then
  step "CUDA tests (tests/cuda.rs)"
  if ! SFTD_REQUIRE_GPU=1 "$tests" --nocapture --test-threads=1 2>&1 | tee -a "$results"; then
    log "CUDA tests: FAILED"
    status=1
  fi
fi

if part serve; then
  step "serve end to end on cuda:0 (upload, 20 training steps of the demo job, chat, a forced tool call)"
  if ! python3 tools/serve_e2e.py --bin "$bin" --device cuda:0 --dir "$scratch/e2e" --max-steps 20 \
    2>&1 | tee -a "$results"; then
    log "serve end to end: FAILED"
    tail -20 "$scratch/e2e/server.log" | tee -a "$results"
    status=1
  fi
fi

part layers || part bench || part peft || part f16 || { step "done: $( [ $status -eq 0 ] && echo OK || echo FAILURES ) — results in $results"; exit $status; }

# Rows long enough that every sequence is cut at 2048 tokens.
data=$scratch/long.jsonl
python3 - "$data" <<'PY'
import json, sys
words = "the model calls a tool and reads its answer before it replies to the user".split()
with open(sys.argv[1], "w") as f:
    for i in range(64):
        text = " ".join(words[(i + j) % len(words)] for j in range(6000))
        f.write(json.dumps({"messages": [
            {"role": "user", "content": f"Request {i}: summarise."},
            {"role": "assistant", "content": text}]}) + "\n")
PY

# 4 layers of Qwen3-1.7B with a 4096-token vocabulary (`--shape layers-1.7b`, generated into the
# scratch directory): the step with sftd's CUDA kernels and without (SFTD_CUDA_KERNELS=off, the
# composed graph), run by run, so the pair is measured back to back.
if part layers; then
  runs=${LAYERS_RUNS:-3}
  step "4 layers of Qwen3-1.7B (vocab 4096), bf16: sftd's CUDA kernels on and off, $runs runs each"
  for args in "--batch-size 1 --steps 5" "--batch-size 4 --steps 3" "--batch-size 4 --steps 3 --no-checkpointing"; do
    for run in $(seq "$runs"); do
      for kernels in on off; do
        log "-- kernels $kernels, run $run: --seq-len 2048 $args"
        # shellcheck disable=SC2086 # $args is a list of options
        if ! SFTD_CUDA_KERNELS=$kernels "$bin" bench --device cuda:0 --shape layers-1.7b \
          --data "$data" --data-dir "$scratch" --seq-len 2048 $args --json 2>&1 | tail -1 | tee -a "$results"; then
          log "layers bench (kernels $kernels): FAILED"
          status=1
        fi
      done
    done
  done
fi

part bench || part peft || part f16 || { step "done: $( [ $status -eq 0 ] && echo OK || echo FAILURES ) — results in $results"; exit $status; }

step "random Qwen3-1.7B-shaped model (28 layers, hidden 2048, intermediate 6144, 16/8 heads of 128, vocab 151936, tied)"
model=$scratch/qwen3-1.7b-shape
if [ ! -f "$model/config.json" ]; then
  "$bin" demo-model "$model" --hidden 2048 --intermediate 6144 --layers 28 --heads 16 \
    --kv-heads 8 --head-dim 128 --vocab 151936 2>&1 | tee -a "$results"
fi
sftd_bench() { # sftd_bench PRECISION
  step "sftd bench --device cuda:0 --precision $1, batch 4 × 2048, checkpointing on"
  if ! "$bin" bench --device cuda:0 --precision "$1" --model "$model" --data "$data" \
    --batch-size 4 --seq-len 2048 --steps "${BENCH_STEPS:-5}" --json 2>&1 | tee -a "$results"; then
    log "bench ($1): FAILED"
    status=1
  fi
}

# auto: bf16 from compute capability 8.0, f16 with loss scaling below.
part bench && sftd_bench auto

# transformers + PEFT on the same model, data and batch, where python3 has them (bf16 needs 8.0+).
if part peft && [ "$cap" -ge 80 ] && python3 -c 'import torch, transformers, peft' 2>/dev/null; then
  step "transformers + PEFT, bf16 base weights, batch 4 × 2048, checkpointing on"
  if ! python3 tools/bench/compare.py --device cuda:0 --dtype bfloat16 --gc on --model "$model" \
    --data "$data" --batch-size 4 --seq-len 2048 --steps "${BENCH_STEPS:-5}" --warmup 1 \
    2>&1 | tee -a "$results"; then
    log "transformers + PEFT: FAILED"
    status=1
  fi
fi

# f16 with loss scaling (the T4's policy) on a GPU that also has bf16.
if part f16 && [ "$cap" -ge 80 ]; then sftd_bench f16; fi

step "done: $( [ $status -eq 0 ] && echo OK || echo FAILURES ) — results in $results"
exit $status
