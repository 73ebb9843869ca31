#!/usr/bin/env bash
# The README's walk-through, run as written against a live sftd: every `sh` block of its
# "Walk-through with curl" section, in order, in one shell with `set -euo pipefail`, with only the
# server address (`S=`) pointed at a server this script starts on a fresh data directory. It fails
# when a command fails (the `ls` of the downloaded adapter, say), and when a `jq` filter printed a
# bare `null` or an error object came back: what a reader following the README would see go wrong.
#   bash scripts/readme-check.sh   (needs curl and jq; SFTD_BIN defaults to
#                                   ${CARGO_TARGET_DIR:-target}/debug/sftd; KEEP=1 keeps the
#                                   work directory, with the walk-through's output in out.txt)
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=$(realpath "${SFTD_BIN:-${CARGO_TARGET_DIR:-target}/debug/sftd}")
for tool in curl jq; do
  command -v $tool >/dev/null || { echo "readme-check: $tool is not installed" >&2; exit 1; }
done

walkthrough=$(awk '/^## Walk-through with curl/ { inside = 1; next }
  inside && /^## / { exit }
  inside && /^```sh/ { block = 1; next }
  inside && /^```/ { block = 0 }
  block' README.md)
grep -q '^S=http://127.0.0.1:8080$' <<<"$walkthrough" || {
  echo "readme-check: the walk-through no longer starts with S=http://127.0.0.1:8080" >&2
  exit 1
}

# shellcheck source=scripts/live-server.sh
. scripts/live-server.sh
work=$(mktemp -d)
trap 'kill "${pid:-}" 2>/dev/null; wait "${pid:-}" 2>/dev/null; [ -n "${KEEP:-}" ] || rm -rf "$work"' EXIT
start_sftd "$BIN" "$work"

# The reader's directory: the repository's examples at hand, the downloads landing here.
ln -s "$PWD/examples" "$work/examples"
script=${walkthrough/S=http:\/\/127.0.0.1:8080/S=http://127.0.0.1:$port}
echo "readme-check: work directory $work" >&2
start=$(date +%s)
if ! (cd "$work" && bash -euo pipefail -c "$script") >"$work/out.txt" 2>&1; then
  tail -40 "$work/out.txt"
  echo "readme-check: the walk-through failed; the server's log ends:" >&2
  tail -20 "$work/server.log" >&2
  exit 1
fi
if grep -nE '^null$|"error": ?\{' "$work/out.txt"; then
  echo "readme-check: the walk-through ran, but a step answered with an error or nothing" >&2
  exit 1
fi
steps=$(grep -c '"type":"metrics"' "$work/out.txt" || true)
[ "$steps" -gt 0 ] || { echo "readme-check: the event stream carried no training step" >&2; exit 1; }
grep -q '^data: \[DONE\]' "$work/out.txt" || { echo "readme-check: the streamed chat did not end" >&2; exit 1; }
echo "readme-check: OK, the walk-through ran as written in $(($(date +%s) - start)) s" \
  "($steps training steps streamed, adapter downloaded, chat answered)"
