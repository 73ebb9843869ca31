#!/usr/bin/env bash
# Cluster smoke test: starts docker-compose.cluster.yml for real with podman-compose (PostgreSQL,
# the S3-compatible store, two API nodes, two workers), runs a tiny job created through api-1,
# follows its event stream through api-2 and downloads its adapter through api-2, then takes
# everything down (volumes included), pass or fail.
#
# Offline: no registry is contacted. The images are local:
#   - sftd: $CLUSTER_SMOKE_IMAGE (default localhost/sftd:smoke, which scripts/container-smoke.sh
#     builds from this checkout; built here the same way when missing);
#   - the S3 store: s3s-fs from /var/cache/sftd/bin (scripts/install-s3-server.sh) copied onto
#     debian:bookworm-slim, instead of compiling it in the compose file's build stage;
#   - PostgreSQL: a stand-in for docker.io/library/postgres:17 built from debian:bookworm-slim
#     and Debian's postgresql package (15), honouring the same POSTGRES_* variables.
# The base images come from scripts/container-smoke.sh (`base`). The compose file itself is used
# unchanged; only its image variables (SFTD_IMAGE, SFTD_S3_IMAGE, SFTD_POSTGRES_IMAGE) are set.
#
# Usage: scripts/cluster-smoke.sh
# Env:   CLUSTER_SMOKE_IMAGE, CLUSTER_SMOKE_JOB_TIMEOUT (seconds, default 600),
#        CLUSTER_SMOKE_REBUILD=1 rebuilds the S3 and PostgreSQL images even when present.
set -euo pipefail

cd "$(dirname "$0")/.."
PROJECT=sftd-cluster-smoke
SFTD_IMAGE=${CLUSTER_SMOKE_IMAGE:-localhost/sftd:smoke}
S3_IMAGE=localhost/sftd-s3s-fs:0.14.0
PG_IMAGE=localhost/sftd-postgres-debian:15
JOB_TIMEOUT=${CLUSTER_SMOKE_JOB_TIMEOUT:-600}
CACHE=${SFTD_CACHE:-/var/cache/sftd}

say() { printf '[cluster-smoke] %s\n' "$*" >&2; }
fail() {
  say "FAIL: $*"
  [ -z "${WORK:-}" ] || [ -s "$WORK/reason" ] || printf '%s' "$*" >"$WORK/reason" 2>/dev/null || true
  exit 1
}

for tool in podman podman-compose curl jq; do
  command -v "$tool" >/dev/null || fail "$tool is not installed (run scripts/ci-setup-containers.sh)"
done

# The same podman settings as scripts/container-smoke.sh (runc, cgroupfs, explicit ulimits).
WORK=$(mktemp -d /tmp/sftd-cluster-smoke.XXXXXX)
cat >"$WORK/containers.conf" <<'CONF'
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
CONF
export CONTAINERS_CONF=$WORK/containers.conf
export BUILDAH_FORMAT=docker
T0=$(date +%s)

# --- images ---------------------------------------------------------------------------------------
need_build() { [ "${CLUSTER_SMOKE_REBUILD:-0}" = 1 ] || ! podman image exists "$1"; }

if ! podman image exists docker.io/library/debian:bookworm-slim; then
  say "base images"
  bash scripts/container-smoke.sh base || fail "base images"
fi

if ! podman image exists "$SFTD_IMAGE"; then
  say "build $SFTD_IMAGE from this checkout"
  SFTD_IMAGE=$SFTD_IMAGE nice -n 15 podman-compose -p "$PROJECT" -f docker-compose.yml build \
    >"$WORK/build.log" 2>&1 || { tail -40 "$WORK/build.log" >&2; fail "sftd image build"; }
fi

if need_build "$S3_IMAGE"; then
  [ -x "$CACHE/bin/s3s-fs" ] || bash scripts/install-s3-server.sh >&2 || fail "install s3s-fs"
  say "build $S3_IMAGE from $CACHE/bin/s3s-fs"
  mkdir -p "$WORK/s3"
  cp "$CACHE/bin/s3s-fs" "$WORK/s3/s3s-fs"
  cat >"$WORK/s3/Containerfile" <<'CF'
FROM docker.io/library/debian:bookworm-slim
COPY s3s-fs /usr/local/bin/s3s-fs
CF
  podman build -q --pull=never -t "$S3_IMAGE" "$WORK/s3" >/dev/null || fail "s3 image build"
fi

if need_build "$PG_IMAGE"; then
  say "build $PG_IMAGE (Debian's postgresql, the official image's variables)"
  mkdir -p "$WORK/pg"
  # What the official image does on first start, in short: initdb with POSTGRES_USER as the
  # superuser and POSTGRES_PASSWORD, password logins from anywhere, the POSTGRES_DB database.
  cat >"$WORK/pg/entrypoint.sh" <<'SH'
#!/bin/sh
set -eu
PGDATA=/var/lib/postgresql/data
export PATH="/usr/lib/postgresql/15/bin:$PATH"
user=${POSTGRES_USER:-postgres}
mkdir -p "$PGDATA" /var/run/postgresql
chown postgres:postgres "$PGDATA" /var/run/postgresql
chmod 700 "$PGDATA"
if [ ! -s "$PGDATA/PG_VERSION" ]; then
  pw=$(mktemp)
  printf '%s\n' "${POSTGRES_PASSWORD:?POSTGRES_PASSWORD is required}" >"$pw"
  chown postgres "$pw"
  runuser -u postgres -- initdb -D "$PGDATA" -U "$user" --pwfile="$pw" -A scram-sha-256 \
    -E UTF8 --locale=C.UTF-8 >/dev/null
  rm -f "$pw"
  echo "host all all all scram-sha-256" >>"$PGDATA/pg_hba.conf"
  db=${POSTGRES_DB:-$user}
  if [ "$db" != postgres ]; then
    echo "CREATE DATABASE \"$db\" OWNER \"$user\";" |
      runuser -u postgres -- postgres --single -D "$PGDATA" postgres >/dev/null
  fi
fi
exec runuser -u postgres -- postgres -D "$PGDATA" -c listen_addresses='*'
SH
  cat >"$WORK/pg/Containerfile" <<'CF'
FROM docker.io/library/debian:bookworm-slim
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends postgresql-15 \
 && rm -rf /var/lib/apt/lists/*
COPY entrypoint.sh /usr/local/bin/postgres-entrypoint
RUN chmod 0755 /usr/local/bin/postgres-entrypoint
ENTRYPOINT ["/usr/local/bin/postgres-entrypoint"]
CF
  nice -n 15 podman build --pull=never -t "$PG_IMAGE" "$WORK/pg" >"$WORK/pg.log" 2>&1 ||
    { tail -20 "$WORK/pg.log" >&2; fail "postgres image build"; }
fi
IMAGES_S=$(($(date +%s) - T0))

# --- the cluster ----------------------------------------------------------------------------------
free_port() {
  local p=$1
  while (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; do p=$((p + 1)); done
  echo "$p"
}
export SFTD_IMAGE SFTD_S3_IMAGE=$S3_IMAGE SFTD_POSTGRES_IMAGE=$PG_IMAGE
export SFTD_API1_PORT SFTD_API2_PORT
SFTD_API1_PORT=$(free_port 18181)
SFTD_API2_PORT=$(free_port $((SFTD_API1_PORT + 1)))
SFTD_API_KEY="cluster-$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')"
export SFTD_API_KEY
export SFTD_LOG_FORMAT=json
API1=http://127.0.0.1:$SFTD_API1_PORT
API2=http://127.0.0.1:$SFTD_API2_PORT
compose() { podman-compose -p "$PROJECT" -f docker-compose.cluster.yml "$@"; }

status=FAIL
cleanup() {
  local rc=$?
  trap - EXIT
  if [ "$status" != PASS ]; then
    for c in postgres s3 api-1 api-2 worker-1 worker-2; do
      say "logs of $c (tail):"
      podman logs --tail 15 "${PROJECT}_${c}_1" >&2 2>/dev/null || true
    done
  fi
  compose down -v >/dev/null 2>&1 || true
  local reason=""
  [ "$status" = PASS ] || reason=$(cat "$WORK/reason" 2>/dev/null || true)
  rm -rf "$WORK"
  echo "cluster-smoke: $status${reason:+: $reason}${SUMMARY:+ ($SUMMARY)}"
  [ "$status" = PASS ] || exit $((rc == 0 ? 1 : rc))
}
trap cleanup EXIT
trap 'exit 130' INT TERM

compose down -v >/dev/null 2>&1 || true # leftovers of a run that was killed
if command -v docker-compose >/dev/null; then
  docker-compose -f docker-compose.cluster.yml config -q || fail "docker-compose.cluster.yml does not validate"
fi
say "compose up: api-1 on $API1, api-2 on $API2"
T1=$(date +%s)
compose up -d >"$WORK/up.log" 2>&1 || { cat "$WORK/up.log" >&2; fail "compose up"; }

api() { # api CURL_ARGS... -> the body; fails (saying why) on a non-2xx answer
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

# Until both API nodes answer and both workers have registered (the nodes retry until
# PostgreSQL accepts connections; podman restarts one that gave up).
deadline=$(($(date +%s) + 180))
until curl -fsS "$API1/readyz" >/dev/null 2>&1 && curl -fsS "$API2/readyz" >/dev/null 2>&1 &&
  [ "$(api "$API1/v1/workers" 2>/dev/null | jq '[.data[] | select(.state == "active")] | length')" = 2 ]; do
  [ "$(date +%s)" -lt "$deadline" ] || fail "the cluster was not up after 180 s"
  sleep 1
done
UP_S=$(($(date +%s) - T1))
say "up in ${UP_S} s: 2 API nodes ready, 2 workers registered"

file_id=$(api -F purpose=fine-tune -F file=@examples/text.jsonl "$API1/v1/files" | jq -r .id) ||
  fail "upload through api-1"
body=$(jq -cn --arg f "$file_id" '{model: "sftd-demo", training_file: $f,
  method: {type: "supervised", supervised: {hyperparameters:
    {n_epochs: 1, max_steps: 4, save_steps: 2, batch_size: 2, max_seq_len: 128}}}}')
job_id=$(api -H 'Content-Type: application/json' -d "$body" "$API1/v1/fine_tuning/jobs" | jq -r .id) ||
  fail "job creation through api-1"
[[ "$job_id" == ftjob-* ]] || fail "job creation returned '$job_id'"
say "job $job_id created through api-1; following its events through api-2"

# The stream ends after the job's terminal event.
curl -sS -N --max-time "$JOB_TIMEOUT" -H "Authorization: Bearer $SFTD_API_KEY" \
  -H 'Accept: text/event-stream' "$API2/v1/fine_tuning/jobs/$job_id/events" >"$WORK/stream.txt" ||
  fail "event stream through api-2"
sed -n 's/^data: //p' "$WORK/stream.txt" | jq -s . >"$WORK/stream.json" || fail "stream is not JSON events"
ids=$(sed -n 's/^id: //p' "$WORK/stream.txt" | jq -sc .)
n=$(jq length "$WORK/stream.json")
[ "$ids" = "$(jq -c '[range(1; length + 1)]' "$WORK/stream.json")" ] ||
  fail "stream ids are not 1..$n: $ids"
statuses=$(jq -c '[.[] | .data.status? // empty]' "$WORK/stream.json")
[ "$statuses" = '["validating_files","queued","running","succeeded"]' ] ||
  fail "statuses in the stream: $statuses"
steps=$(jq -c '[.[] | select(.type == "metrics") | .data.step]' "$WORK/stream.json")
[ "$steps" = '[1,2,3,4]' ] || fail "metrics steps in the stream: $steps"

job=$(api "$API2/v1/fine_tuning/jobs/$job_id") || fail "GET job through api-2"
adapter_id=""
for fid in $(jq -r '.result_files[]' <<<"$job"); do
  [ "$(api "$API2/v1/files/$fid" | jq -r .filename)" = adapter_model.safetensors ] && adapter_id=$fid
done
[ -n "$adapter_id" ] || fail "no adapter among $(jq -c .result_files <<<"$job")"
api -o "$WORK/adapter.safetensors" "$API2/v1/files/$adapter_id/content" >/dev/null ||
  fail "adapter download through api-2"
adapter_bytes=$(stat -c %s "$WORK/adapter.safetensors")
[ "$adapter_bytes" -gt 0 ] || fail "empty adapter"
JOB_S=$(($(date +%s) - T1 - UP_S))
say "job succeeded: $n events streamed through api-2, adapter $adapter_bytes bytes"

T2=$(date +%s)
compose down -v >/dev/null 2>&1 || fail "compose down"
DOWN_S=$(($(date +%s) - T2))
SUMMARY="images ${IMAGES_S} s, up ${UP_S} s, job ${JOB_S} s, down ${DOWN_S} s, total $(($(date +%s) - T0)) s"
status=PASS
