# shellcheck shell=bash
# Sourced by the checks that run against a live sftd (openai-sdk-check.sh, readme-check.sh).
# start_sftd BIN DIR: starts `BIN serve` on the CPU, on a free loopback port, with its data dir in
# DIR/data and its log in DIR/server.log; sets `port` and `pid`, and returns once /healthz answers
# (non-zero, with the log printed, if the server exits or stays silent for 60 s). The caller's
# EXIT trap stops it: `kill "${pid:-}"`.
start_sftd() {
  local bin=$1 dir=$2
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  SFTD_DATA_DIR=$dir/data SFTD_ADDR=127.0.0.1:$port SFTD_DEVICE=cpu RUST_LOG=warn \
    "$bin" serve >"$dir/server.log" 2>&1 &
  pid=$!
  for _ in $(seq 1 300); do
    curl -fs "http://127.0.0.1:$port/healthz" >/dev/null && return 0
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.2
  done
  cat "$dir/server.log" >&2
  echo "sftd did not come up on port $port" >&2
  return 1
}
