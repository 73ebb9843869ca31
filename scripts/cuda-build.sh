#!/usr/bin/env bash
# Compiles sftd's `cuda` feature on any Linux x86_64 machine, GPU or not (CI has none): NVIDIA's
# CUDA 13.0 compiler comes from PyPI wheels into a cache directory outside the clone, then candle's
# CUDA kernels and sftd's CUDA code are compiled for each compute capability asked for, each in its
# own target directory in that cache so a second run only recompiles what changed.
#
# Usage: scripts/cuda-build.sh [check|build] [CAP...]
#   check (default)  `cargo clippy --locked --features cuda --all-targets -- -D warnings` for the
#                    first CAP: compiles every CUDA kernel (nvcc) and all Rust code, links nothing.
#                    Each further CAP compiles candle's kernels alone (candle-kernels at the version
#                    Cargo.lock pins, PTX and objects), the only part that depends on the capability:
#                    sftd's Rust code is the same for every one. Needs only the toolchain wheels, no
#                    GPU, no driver.
#   build            `cargo build --release --locked --features cuda` and the CUDA tests
#                    (tests/cuda.rs, `--no-run`): a linked binary and its tests for a GPU
#                    host (NVIDIA driver R580+ for CUDA 13.0 PTX). Links against the driver's
#                    libcuda.so.1, or on a machine without a driver against a stub of it (the
#                    binary then runs only where the real one is); cuBLAS and cuRAND come as
#                    wheels too (697 MB installed), unless SFTD_CUDA_HOME names a CUDA 13 toolkit.
#   CAP...           compute capabilities, default "75 80": 75 T4, 80 A100, 86 A10G, 89 L4/L40S,
#                    90 H100/H200.
# Env:
#   SFTD_CACHE       cache root (default /var/cache/sftd, or ~/.cache/sftd where that cannot be
#                    created): toolchain in $SFTD_CACHE/cuda-13.0, target directories in
#                    $SFTD_CACHE/target-cuda-CAP.
#   SFTD_CUDA_HOME   use this CUDA toolkit (its bin/nvcc) instead of the wheels.
#   CUDA_BUILD_NICE  niceness of the compiles (default 10; 0 to not renice).
#   CUDAFORGE_THREADS  parallel nvcc jobs inside candle-kernels' build (default: all cores; the
#                    build's own default is half of them, which leaves one of CI's two idle).
# Prints one timing line per step and "cuda-build: OK ..." at the end; exits non-zero on any error
# or warning in sftd's code. docs/cuda-build.md has the details and measured times.
set -euo pipefail
cd "$(dirname "$0")/.."

mode=check
case "${1:-}" in
  check | build) mode=$1; shift ;;
  -h | --help) sed -n '2,/^set /{/^#/p}' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
esac
caps=("$@")
[ "${#caps[@]}" -gt 0 ] || caps=(75 80)
for cap in "${caps[@]}"; do
  [[ "$cap" =~ ^[0-9]{2,3}[af]?$ ]] || { echo "cuda-build: bad compute capability '$cap' (e.g. 75, 80, 90)" >&2; exit 2; }
done

CACHE=${SFTD_CACHE:-/var/cache/sftd}
if [ -z "${SFTD_CACHE:-}" ] && ! mkdir -p "$CACHE" 2>/dev/null; then
  CACHE=${XDG_CACHE_HOME:-$HOME/.cache}/sftd # not root: a per-user cache
fi
mkdir -p "$CACHE"
NICE=${CUDA_BUILD_NICE:-10}
export CUDAFORGE_THREADS=${CUDAFORGE_THREADS:-$(nproc)}
say() { printf '[cuda-build] %s\n' "$*" >&2; }
fail() { say "FAIL: $*"; exit 1; }
now() { date +%s; }

# --- the toolchain ----------------------------------------------------------------------------------
# CUDA 13.0: the newest the CUDA 12/13 wheels give a complete nvcc for (the -cu12 nvcc wheels hold
# no nvcc), and within what cudarc 0.19.10 (Cargo.lock) supports (up to 13.4). These versions were
# installed and used together; bump them together.
WHEELS=(
  nvidia-cuda-nvcc==13.0.88    # nvcc, cudafe++, fatbinary, nvlink, ptxas
  nvidia-nvvm==13.0.88         # cicc, libnvvm, libdevice
  nvidia-cuda-crt==13.0.88     # crt/ headers nvcc includes
  nvidia-cuda-runtime==13.0.96 # cuda_runtime.h, libcudart
  nvidia-cuda-cccl==13.0.85    # cub/thrust/libcu++ headers
  nvidia-cuda-nvrtc==13.0.88   # nvrtc headers and library
)
# Only for `build` without SFTD_CUDA_HOME: what `-lcublas -lcublasLt -lcurand` link against.
LINK_WHEELS=(
  nvidia-cublas==13.0.2.14
  nvidia-curand==10.4.0.35
)

install_wheels() { # install_wheels DIR WHEEL... : pip --target into DIR, atomically, once
  local dir=$1 stamp
  shift
  stamp=$(printf '%s\n' "$@")
  if [ -f "$dir/.installed" ] && [ "$(cat "$dir/.installed")" = "$stamp" ]; then
    return 0
  fi
  command -v python3 >/dev/null || fail "python3 is needed to install the CUDA wheels"
  local t0 tmp
  t0=$(now)
  mkdir -p "$(dirname "$dir")"
  tmp=$(mktemp -d "$dir.tmp.XXXXXX")
  say "installing $* into $dir"
  python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore \
    --no-deps --no-cache-dir \
    --target "$tmp" "$@" || { rm -rf "$tmp"; fail "pip install of the CUDA wheels"; }
  printf '%s\n' "$stamp" >"$tmp/.installed"
  rm -rf "$dir"
  mv "$tmp" "$dir"
  say "wheels installed in $(($(now) - t0)) s"
}

if [ -n "${SFTD_CUDA_HOME:-}" ]; then
  CUDA_ROOT=$SFTD_CUDA_HOME
else
  TOOLCHAIN=$CACHE/cuda-13.0
  install_wheels "$TOOLCHAIN" "${WHEELS[@]}"
  # The CUDA 13 wheels share one CUDA root: nvidia/cu13/{bin,include,lib,nvvm}.
  CUDA_ROOT=$TOOLCHAIN/nvidia/cu13
  if [ "$mode" = build ]; then
    install_wheels "$CACHE/cuda-13.0-link" "${LINK_WHEELS[@]}"
    # The wheels ship only libX.so.13; the linker wants libX.so.
    for lib in "$CACHE"/cuda-13.0-link/nvidia/cu13/lib/lib*.so.*; do
      base=${lib##*/}
      ln -sfn "$lib" "$CUDA_ROOT/lib/${base%%.so.*}.so"
    done
    ln -sfn libcudart.so.13 "$CUDA_ROOT/lib/libcudart.so"
    ln -sfn libnvrtc.so.13 "$CUDA_ROOT/lib/libnvrtc.so"
  fi
fi
[ -x "$CUDA_ROOT/bin/nvcc" ] || fail "no nvcc in $CUDA_ROOT/bin"
export CUDA_HOME=$CUDA_ROOT PATH=$CUDA_ROOT/bin:$PATH
libs=$CUDA_ROOT/lib
[ "$mode" = check ] || [ -n "${SFTD_CUDA_HOME:-}" ] || libs=$libs:$CACHE/cuda-13.0-link/nvidia/cu13/lib
export LD_LIBRARY_PATH=$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
nvcc_version=$(nvcc --version | sed -n 's/.*release \([0-9.]*\).*/\1/p')
say "nvcc $nvcc_version from $CUDA_ROOT, host compiler $(c++ -dumpfullversion 2>/dev/null || echo '?')"

# A link-time stand-in for the driver library on a machine without one: a shared library named
# libcuda.so.1 that defines every driver entry point cudarc declares (each returns
# CUDA_ERROR_STUB_LIBRARY, 34, as NVIDIA's own stub does). The binary records only the name
# libcuda.so.1; the GPU host's real driver library is what the loader finds at run time.
driver_stub() { # driver_stub OUT.so
  local decls src
  decls=$(cargo metadata --locked --features cuda --format-version 1 2>/dev/null |
    python3 -c 'import json,sys; print(next(p["manifest_path"] for p in json.load(sys.stdin)["packages"] if p["name"] == "cudarc"))')
  decls=$(dirname "$decls")/src/driver/sys/mod.rs
  [ -f "$decls" ] || fail "cudarc's driver declarations not found ($decls)"
  src=$(mktemp --suffix=.c)
  sed -n 's/^pub unsafe fn \(cu[A-Za-z0-9_]*\)(.*/int \1(void) { return 34; }/p' "$decls" | sort -u >"$src"
  [ -s "$src" ] || fail "no driver entry points in $decls"
  cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$1" "$src" || fail "compiling the libcuda stub"
  say "no NVIDIA driver here: linking against a stub libcuda.so.1 ($(wc -l <"$src") entry points)"
  rm -f "$src"
}

if [ "$mode" = build ] && [ -z "${SFTD_CUDA_HOME:-}" ]; then
  # Linking needs the driver library by its unversioned name; a GPU host has libcuda.so.1.
  mkdir -p "$CUDA_ROOT/lib/stubs"
  driver=$(ldconfig -p 2>/dev/null | awk '/libcuda\.so\.1 .*x86-64/ {print $NF; exit}')
  if [ -n "$driver" ]; then
    ln -sfn "$driver" "$CUDA_ROOT/lib/stubs/libcuda.so"
  else
    rm -f "$CUDA_ROOT/lib/stubs/libcuda.so"
    driver_stub "$CUDA_ROOT/lib/stubs/libcuda.so"
  fi
fi

# --- compile, once per compute capability -------------------------------------------------------------
renice=()
[ "$NICE" = 0 ] || renice=(nice -n "$NICE")
# A crate that depends on candle-kernels alone, pinned to Cargo.lock's version and resolved from a
# copy of Cargo.lock: `cargo check` on it runs candle-kernels' build (nvcc) for one capability
# without re-checking sftd's Rust code.
kernels_crate() {
  local dir=$CACHE/kernels-check version
  version=$(awk '$0 == "name = \"candle-kernels\"" { getline; gsub(/[^0-9.]/, ""); print; exit }' Cargo.lock)
  [ -n "$version" ] || fail "candle-kernels is not in Cargo.lock"
  mkdir -p "$dir/src"
  printf '%s\n' '[package]' 'name = "sftd-kernels-check"' 'version = "0.0.0"' 'edition = "2021"' \
    'publish = false' '' '[dependencies]' "candle-kernels = \"=$version\"" >"$dir/Cargo.toml"
  : >"$dir/src/lib.rs"
  cp Cargo.lock "$dir/Cargo.lock"
  echo "$dir"
}

summary=()
for i in "${!caps[@]}"; do
  cap=${caps[$i]}
  target=$CACHE/target-cuda-$cap
  t0=$(now)
  dir=.
  if [ "$mode" = build ]; then
    what="build"
    cmd=(cargo build --release --locked --features cuda)
  elif [ "$i" = 0 ]; then
    what="check (candle's kernels and all of sftd)"
    cmd=(cargo clippy --locked --features cuda --all-targets -- -D warnings)
  else
    what="check (candle's kernels alone; sftd's Rust code was checked for sm_${caps[0]})"
    dir=$(kernels_crate)
    cmd=(cargo check --quiet)
  fi
  say "$what for compute capability $cap (CARGO_TARGET_DIR=$target)"
  (cd "$dir" && CUDA_COMPUTE_CAP=$cap CARGO_TARGET_DIR=$target "${renice[@]}" "${cmd[@]}") ||
    fail "$mode --features cuda for compute capability $cap"
  if [ "$mode" = build ]; then
    # The CUDA tests too, so a GPU host without Rust can run scripts/gpu-check.sh on both.
    tests=$(CUDA_COMPUTE_CAP=$cap CARGO_TARGET_DIR=$target "${renice[@]}" \
      cargo test --release --locked --features cuda --test cuda --no-run --message-format=json |
      grep '"kind":\["test"\]' | sed -n 's/.*"executable":"\([^"]*\)".*/\1/p' | tail -1)
    [ -n "$tests" ] || fail "building the CUDA tests for compute capability $cap"
    say "binary: $target/release/sftd, CUDA tests: $tests"
    say "run them with LD_LIBRARY_PATH=$LD_LIBRARY_PATH, or on a GPU host:"
    say "  SFTD_BIN=$target/release/sftd SFTD_CUDA_TESTS=$tests scripts/gpu-check.sh"
  fi
  secs=$(($(now) - t0))
  say "compute capability $cap: $mode passed in $secs s"
  summary+=("sm_$cap ${secs}s")
done
echo "cuda-build: OK ($mode, nvcc $nvcc_version: ${summary[*]})"
