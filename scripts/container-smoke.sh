#!/usr/bin/env bash
# Container smoke test: build the sftd image with compose, run a short LoRA job on the demo model
# through the API inside the container, download the adapter, then replace the container while a
# second job runs: the first job and its events must survive on the named volume, the second must
# resume from its checkpoint. Everything is torn down on exit, pass or fail.
#
# Needs podman, runc, debootstrap, podman-compose, docker-compose, curl, jq
# (scripts/ci-setup-containers.sh installs them) and a Rust toolchain on the host (it becomes the
# local stand-in for rust:1-bookworm). No container registry is needed: the two base images are
# made locally and tagged with their docker.io names, so the Dockerfile stays the ordinary one.
#
# Usage: scripts/container-smoke.sh          full smoke test
#        scripts/container-smoke.sh base     only make the local base images
#        scripts/container-smoke.sh mirror   print the Debian mirror debootstrap would use
# Env:   SMOKE_PORT (default: a free port from 18080), SMOKE_JOB_TIMEOUT (seconds, default 600),
#        SMOKE_REBUILD_BASE=1 rebuilds the base images even when present,
#        SMOKE_DEBIAN_MIRROR overrides the mirror read from the host's apt sources,
#        SMOKE_APT_SOURCES (space-separated files) replaces the host's apt source files.
set -euo pipefail

cd "$(dirname "$0")/.."
PROJECT=sftd-smoke
IMAGE=localhost/sftd:smoke
JOB_TIMEOUT=${SMOKE_JOB_TIMEOUT:-600}

say() { printf '[container-smoke] %s\n' "$*" >&2; }
fail() {
  say "FAIL: $*"
  # Also from a $(…) subshell: the summary line repeats the first reason.
  [ -z "${WORK:-}" ] || [ -s "$WORK/reason" ] || printf '%s' "$*" >"$WORK/reason" 2>/dev/null || true
  exit 1
}

# --- the Debian mirror: whatever the host's apt already uses ---------------------------------------
SUITE=bookworm
# Release names and aliases of the Debian archive itself (a third-party repository such as
# `nodistro` or `cloud-sdk-bookworm` must not be taken for it).
DEBIAN_SUITES=" buster bullseye bookworm trixie forky duke sid oldoldstable oldstable stable testing unstable "

# The host's apt source files, in apt's own order: sources.list, then sources.list.d/*.list and
# *.sources (other names, e.g. `*.disabled`, apt ignores too).
apt_source_files() {
  local f
  [ -f /etc/apt/sources.list ] && echo /etc/apt/sources.list
  for f in /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
    [ -f "$f" ] && echo "$f"
  done
  return 0
}

# One line `URI SUITE…` per enabled binary (`deb`) source in FILE, one-line or deb822 format.
apt_entries() {
  case "$1" in
    *.sources)
      awk '
        function flush(  i, n, u) {
          if (types ~ /(^| )deb( |$)/ && enabled != "no" && uris != "") {
            n = split(uris, u, " ")
            for (i = 1; i <= n; i++) print u[i], suites
          }
          types = ""; uris = ""; suites = ""; enabled = ""
        }
        /^[ \t]*#/ { next }
        /^[ \t]*$/ { flush(); next }
        {
          key = tolower($1); sub(/:$/, "", key)
          val = $0; sub(/^[^:]*:[ \t]*/, "", val); gsub(/[ \t]+/, " ", val); sub(/ $/, "", val)
          if (key == "types") types = val
          else if (key == "uris") uris = val
          else if (key == "suites") suites = val
          else if (key == "enabled") enabled = tolower(val)
        }
        END { flush() }' "$1"
      ;;
    *)
      # deb [options] URI SUITE [COMPONENT…]
      sed -e 's/#.*//' -e 's/\[[^]]*\]//' "$1" | awk '$1 == "deb" && NF >= 3 { print $2, $3 }'
      ;;
  esac
}

# The mirror for debootstrap: the host's source serving $SUITE itself, else its source for any
# Debian release (the same archive root serves them all), else deb.debian.org.
debian_mirror() {
  local files entries uri suites s
  if [ -n "${SMOKE_DEBIAN_MIRROR:-}" ]; then echo "$SMOKE_DEBIAN_MIRROR"; return; fi
  files=${SMOKE_APT_SOURCES:-$(apt_source_files)}
  entries=$(for f in $files; do apt_entries "$f" 2>/dev/null || true; done)
  while read -r uri suites; do
    for s in $suites; do [ "$s" = "$SUITE" ] && { echo "${uri%/}"; return; }; done
  done <<<"$entries"
  while read -r uri suites; do
    case "$uri" in *security*) continue ;; esac
    for s in $suites; do
      case "$DEBIAN_SUITES" in *" $s "*) echo "${uri%/}"; return ;; esac
    done
  done <<<"$entries"
  echo http://deb.debian.org/debian
}

if [ "${1:-}" = mirror ]; then
  debian_mirror
  exit 0
fi

for tool in podman runc debootstrap podman-compose docker-compose curl jq rustc; do
  command -v "$tool" >/dev/null || fail "$tool is not installed (run scripts/ci-setup-containers.sh)"
done

# --- podman configuration for these VMs (see docs/container.md) -----------------------------------
# runc: crun fails here with "cgroups in hybrid mode not supported"; explicit ulimits: the default
# fails with "setrlimit RLIMIT_NOFILE: Operation not permitted".
WORK=$(mktemp -d /tmp/sftd-container-smoke.XXXXXX)
cat >"$WORK/containers.conf" <<'CONF'
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
CONF
export CONTAINERS_CONF=$WORK/containers.conf
# HEALTHCHECK is only kept in the docker image format (OCI drops it).
export BUILDAH_FORMAT=docker

# --- local base images ----------------------------------------------------------------------------
have_image() { podman image exists "$1"; }

make_debian_base() {
  local mirror rootfs
  mirror=$(debian_mirror)
  rootfs=$WORK/rootfs
  say "debootstrap minbase $SUITE from $mirror"
  nice -n 15 debootstrap --variant=minbase "$SUITE" "$rootfs" "$mirror" >"$WORK/debootstrap.log" 2>&1 ||
    { tail -20 "$WORK/debootstrap.log" >&2; fail "debootstrap"; }
  # Same apt sources as the host (and as the real image: bookworm, -updates, -security).
  if [ -f /etc/apt/sources.list.d/debian.sources ]; then
    cp /etc/apt/sources.list.d/debian.sources "$rootfs/etc/apt/sources.list.d/debian.sources"
    rm -f "$rootfs/etc/apt/sources.list"
  fi
  # Trust what the host trusts: an intercepting proxy's CA must reach cargo inside the build.
  # (ca-certificates installed later in an image regenerates the bundle from these.)
  mkdir -p "$rootfs/usr/local/share/ca-certificates" "$rootfs/etc/ssl/certs"
  cp -a /usr/local/share/ca-certificates/. "$rootfs/usr/local/share/ca-certificates/" 2>/dev/null || true
  [ -f /etc/ssl/certs/ca-certificates.crt ] && cp /etc/ssl/certs/ca-certificates.crt "$rootfs/etc/ssl/certs/"
  rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/archives/*.deb
  tar -C "$rootfs" -c . | podman import -q \
    --change 'CMD ["bash"]' --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    - docker.io/library/debian:bookworm-slim >/dev/null
  rm -rf "$rootfs"
}

make_rust_base() {
  local sysroot
  sysroot=$(rustc --print sysroot)
  say "rust:1-bookworm stand-in from the host toolchain ($(rustc --version))"
  cat >"$WORK/Containerfile.rust" <<'CF'
FROM docker.io/library/debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev ca-certificates pkg-config \
 && rm -rf /var/lib/apt/lists/*
ENV RUSTUP_HOME=/usr/local/rustup CARGO_HOME=/usr/local/cargo PATH=/usr/local/cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
RUN mkdir -p /usr/local/rustup/toolchains /usr/local/cargo/bin \
 && cp -a /hosttc /usr/local/rustup/toolchains/stable \
 && rm -rf /usr/local/rustup/toolchains/stable/share/doc \
 && ln -s /usr/local/rustup/toolchains/stable/bin/* /usr/local/cargo/bin/ \
 && cargo --version && rustc --version
CF
  nice -n 15 podman build --pull=never -v "$sysroot:/hosttc:ro" -f "$WORK/Containerfile.rust" \
    -t docker.io/library/rust:1-bookworm "$WORK" >"$WORK/rust-base.log" 2>&1 ||
    { tail -20 "$WORK/rust-base.log" >&2; fail "rust base image"; }
}

ensure_base_images() {
  if [ "${SMOKE_REBUILD_BASE:-0}" = 1 ] || ! have_image docker.io/library/debian:bookworm-slim; then
    make_debian_base
  fi
  if [ "${SMOKE_REBUILD_BASE:-0}" = 1 ] || ! have_image docker.io/library/rust:1-bookworm; then
    make_rust_base
  fi
  say "base images: $(podman images --format '{{.Repository}}:{{.Tag}} {{.Size}}' |
    grep -E 'library/(debian:bookworm-slim|rust:1-bookworm)' | tr '\n' ';')"
}

if [ "${1:-}" = base ]; then
  trap 'rm -rf "$WORK"' EXIT
  ensure_base_images
  exit 0
fi

# --- compose --------------------------------------------------------------------------------------
free_port() {
  local p=${SMOKE_PORT:-18080}
  while (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; do p=$((p + 1)); done
  echo "$p"
}
export SFTD_PORT
SFTD_PORT=$(free_port)
export SFTD_IMAGE=$IMAGE
SFTD_API_KEY="smoke-$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')"
export SFTD_API_KEY
export SFTD_LOG_FORMAT=json
BASE=http://127.0.0.1:$SFTD_PORT
compose() { podman-compose -p "$PROJECT" -f docker-compose.yml "$@"; }

status=FAIL
cleanup() {
  local rc=$?
  trap - EXIT
  if [ "$status" != PASS ]; then
    say "container logs (tail):"
    podman logs --tail 40 "${PROJECT}_sftd_1" >&2 2>/dev/null || true
  fi
  compose down -v >/dev/null 2>&1 || true
  podman volume rm -f "${PROJECT}_sftd-data" >/dev/null 2>&1 || true
  podman network rm -f "${PROJECT}_default" >/dev/null 2>&1 || true
  local reason=""
  [ "$status" = PASS ] || reason=$(cat "$WORK/reason" 2>/dev/null || true)
  rm -rf "$WORK"
  echo "container-smoke: $status${reason:+: $reason}${SUMMARY:+ ($SUMMARY)}"
  [ "$status" = PASS ] || exit $((rc == 0 ? 1 : rc))
}
trap cleanup EXIT
trap 'exit 130' INT TERM

ensure_base_images
compose down -v >/dev/null 2>&1 || true # leftovers of a run that was killed

say "validate docker-compose.yml (and the GPU override)"
docker-compose -f docker-compose.yml config -q || fail "docker-compose.yml does not validate"
docker-compose -f docker-compose.yml -f docker-compose.gpu.yml config -q ||
  fail "docker-compose.gpu.yml does not validate"

say "build the image: podman-compose -p $PROJECT build"
t0=$(date +%s)
nice -n 15 podman-compose -p "$PROJECT" -f docker-compose.yml build >"$WORK/build.log" 2>&1 ||
  { tail -40 "$WORK/build.log" >&2; fail "image build"; }
build_s=$(($(date +%s) - t0))
podman image exists "$IMAGE" || fail "compose build did not produce $IMAGE"
image_bytes=$(podman image inspect "$IMAGE" --format '{{.Size}}')
image_mb=$((image_bytes / 1000 / 1000))
SUMMARY="image $IMAGE ${image_mb} MB, build ${build_s} s"
say "$SUMMARY"
[ "$(podman image inspect "$IMAGE" --format '{{.Config.User}}')" = sftd ] || fail "image does not run as the sftd user"
podman image inspect "$IMAGE" --format '{{json .Config.Healthcheck}}' | grep -q healthcheck ||
  fail "image has no HEALTHCHECK"

start() {
  compose up -d >"$WORK/up.log" 2>&1 || { cat "$WORK/up.log" >&2; fail "compose up"; }
  for _ in $(seq 1 60); do
    if curl -fsS "$BASE/healthz" >/dev/null 2>&1; then
      podman exec "${PROJECT}_sftd_1" sftd healthcheck || fail "sftd healthcheck inside the container"
      return 0
    fi
    sleep 1
  done
  fail "no 200 from $BASE/healthz after 60 s"
}

# curl with the API key; prints the body, fails (saying why) on a non-2xx answer.
api() {
  local out code
  out=$(curl -sS -w '\n%{http_code}' -H "Authorization: Bearer $SFTD_API_KEY" "$@") || return 1
  code=${out##*$'\n'}
  out=${out%$'\n'*}
  if [[ "$code" != 2* ]]; then
    say "HTTP $code for ${*: -1}: $out"
    return 1
  fi
  printf '%s\n' "$out"
}

say "compose up on 127.0.0.1:$SFTD_PORT"
start
code=$(curl -s -o /dev/null -w '%{http_code}' "$BASE/v1/fine_tuning/jobs")
[ "$code" = 401 ] || fail "GET /v1/fine_tuning/jobs without the API key answered $code, want 401"

say "upload examples/tool_calls.jsonl"
file_id=$(api -F purpose=fine-tune -F file=@examples/tool_calls.jsonl "$BASE/v1/files" | jq -r .id) ||
  fail "upload"
[[ "$file_id" == file-* ]] || fail "upload returned id '$file_id'"

create_job() { # create_job FILE_ID MAX_STEPS -> job id
  local body
  body=$(jq -cn --arg f "$1" --argjson n "$2" '{model: "sftd-demo", training_file: $f,
    method: {type: "supervised", supervised: {hyperparameters:
      {n_epochs: 1, max_steps: $n, batch_size: 2, max_seq_len: 128}}}}')
  api -H 'Content-Type: application/json' -d "$body" "$BASE/v1/fine_tuning/jobs" | jq -r .id
}

wait_job() { # wait_job ID -> the job object once it succeeded
  local deadline job st
  deadline=$(($(date +%s) + JOB_TIMEOUT))
  while :; do
    job=$(api "$BASE/v1/fine_tuning/jobs/$1") || fail "GET job $1"
    st=$(jq -r .status <<<"$job")
    case "$st" in
      succeeded) break ;;
      failed | cancelled) fail "job $1 ended $st: $(jq -c .error <<<"$job")" ;;
    esac
    [ "$(date +%s)" -lt "$deadline" ] || fail "job $1 still $st after ${JOB_TIMEOUT}s"
    sleep 1
  done
  printf '%s\n' "$job"
}

metric_steps() { # metric_steps ID -> the steps of its metrics events, in order, one line
  api "$BASE/v1/fine_tuning/jobs/$1/events?limit=10000" |
    jq -c '[.data[] | select(.type == "metrics") | .data.step]'
}

say "create a job on sftd-demo"
job_id=$(create_job "$file_id" 4) || fail "job creation"
[[ "$job_id" == ftjob-* ]] || fail "job creation returned id '$job_id'"
job=$(wait_job "$job_id")
say "job $job_id succeeded"

adapter_id=""
for fid in $(jq -r '.result_files[]' <<<"$job"); do
  name=$(api "$BASE/v1/files/$fid" | jq -r .filename) || fail "GET file $fid"
  if [ "$name" = adapter_model.safetensors ]; then adapter_id=$fid; fi
done
[ -n "$adapter_id" ] || fail "no adapter_model.safetensors among result_files $(jq -c .result_files <<<"$job")"
api -o "$WORK/adapter_model.safetensors" "$BASE/v1/files/$adapter_id/content" >/dev/null ||
  fail "adapter download"
adapter_bytes=$(stat -c %s "$WORK/adapter_model.safetensors")
[ "$adapter_bytes" -gt 0 ] || fail "downloaded adapter is empty"
say "adapter downloaded: $adapter_bytes bytes"

api "$BASE/v1/fine_tuning/jobs/$job_id/events?limit=10000" >"$WORK/events.json" || fail "GET events"
n_events=$(jq '.data | length' "$WORK/events.json")
[ "$n_events" -gt 0 ] || fail "job has no events"

# SFTD_LOG_FORMAT=json: stdout is one JSON object per line.
podman logs "${PROJECT}_sftd_1" >"$WORK/server.log" 2>&1
n_log=$(wc -l <"$WORK/server.log")
[ "$n_log" -gt 0 ] || fail "the server logged nothing"
while IFS= read -r line; do
  jq -e 'type == "object"' <<<"$line" >/dev/null 2>&1 || fail "log line is not a JSON object: $line"
done <"$WORK/server.log"

# A second, longer job is running when the container stops: SIGTERM must checkpoint and requeue it,
# and the next container must resume it rather than start over.
say "start a longer job and replace the container while it runs (down, up)"
job2_id=$(create_job "$file_id" 40) || fail "second job creation"
deadline=$(($(date +%s) + JOB_TIMEOUT))
until [ "$(metric_steps "$job2_id" | jq 'length')" -ge 2 ]; do
  [ "$(date +%s)" -lt "$deadline" ] || fail "job $job2_id made no progress in ${JOB_TIMEOUT}s"
  sleep 1
done
t0=$(date +%s)
compose down >/dev/null 2>&1 || fail "compose down"
stop_s=$(($(date +%s) - t0))
[ "$stop_s" -lt 30 ] || fail "compose down took ${stop_s}s: SIGTERM not handled?"
start

job_after=$(api "$BASE/v1/fine_tuning/jobs/$job_id") || fail "GET job after restart"
[ "$(jq -r .status <<<"$job_after")" = succeeded ] || fail "after restart job is $(jq -r .status <<<"$job_after")"
api "$BASE/v1/fine_tuning/jobs/$job_id/events?limit=10000" >"$WORK/events2.json" ||
  fail "GET events after restart"
[ "$(jq -c '[.data[].id]' "$WORK/events2.json")" = "$(jq -c '[.data[].id]' "$WORK/events.json")" ] ||
  fail "after restart the events differ: $(jq '.data | length' "$WORK/events2.json") now, $n_events before"
api -o /dev/null "$BASE/v1/files/$adapter_id/content" >/dev/null || fail "adapter gone after restart"

wait_job "$job2_id" >/dev/null
steps=$(metric_steps "$job2_id")
[ "$(jq '[.[] | select(. == 1)] | length' <<<"$steps")" = 1 ] ||
  fail "job $job2_id started over after the restart: steps $steps"
[ "$(jq 'max' <<<"$steps")" = 40 ] || fail "job $job2_id did not reach step 40: steps $steps"
say "job $job2_id resumed after the restart and succeeded"

SUMMARY="$SUMMARY, job ok with $n_events events, adapter $adapter_bytes bytes, $n_log JSON log lines"
SUMMARY="$SUMMARY, down mid-job in ${stop_s} s, resumed"
status=PASS
