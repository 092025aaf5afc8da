#!/usr/bin/env bash
# Start a local Ray head and a local S3 (moto server) to try `ray job submit` on one
# machine, and print the environment to use them:
#
#   eval "$(infra/local/start.sh)"
#   ray job submit --working-dir . -- python jobs/label_job.py --no-gpu \
#     --model s3://sempart/model --input s3://sempart/images/ --out s3://sempart/labels
#   infra/local/stop.sh
#
# Ray runs with the interpreter of PYTHON (default: .venv/bin/python, else python3) and
# that interpreter's bin/ first on PATH, so a job's `python` is the same one. Ray and its
# jobs see the local S3 (AWS_* below), so a job needs no credentials of its own. The
# dashboard listens on 127.0.0.1 only and requires a token (RAY_AUTH_MODE=token with a
# fresh token in the state dir); job clients read it through the printed variables.
# Settings (environment): SEMPART_LOCAL_DIR (state: pids, logs, token, Ray's temp dir;
# keep it short, Ray puts unix sockets under it), RAY_PORT, RAY_DASHBOARD_PORT,
# RAY_NUM_CPUS, S3_PORT, SEMPART_LOCAL_BUCKET (created empty; "" for none), PYTHON.
# Extra arguments go to `ray start` (e.g. --dashboard-agent-listen-port N).
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
state=${SEMPART_LOCAL_DIR:-/tmp/sempart-local}
ray_port=${RAY_PORT:-6380}
dashboard_port=${RAY_DASHBOARD_PORT:-8265}
num_cpus=${RAY_NUM_CPUS:-2}
s3_port=${S3_PORT:-5000}
bucket=${SEMPART_LOCAL_BUCKET-sempart}
if [[ -z ${PYTHON:-} ]]; then
  if [[ -x $root/.venv/bin/python ]]; then PYTHON=$root/.venv/bin/python; else PYTHON=python3; fi
fi
python=$(command -v "$PYTHON")
setsid=$(command -v setsid || true)  # own process group, so stop.sh can end stragglers

log() { echo "start.sh: $*" >&2; }

running() {  # NAME: true when NAME.pid names a live process
  [[ -f $state/$1.pid ]] && kill -0 "$(<"$state/$1.pid")" 2>/dev/null
}

wait_ready() {  # NAME URL [TOKEN_FILE]: poll URL until HTTP 200, or fail with NAME's log
  if ! "$python" - "$2" "${3:-}" "$state/$1.pid" <<'PY'
import os, sys, time, urllib.request
url, token_file, pid_file = sys.argv[1:]
pid = int(open(pid_file).read())
headers = {"Authorization": "Bearer " + open(token_file).read().strip()} if token_file else {}
deadline = time.monotonic() + 180
while time.monotonic() < deadline:
    try:
        os.kill(pid, 0)
    except OSError:
        sys.exit(f"process {pid} exited")
    try:
        if urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=5).status == 200:
            sys.exit(0)
    except OSError:
        pass
    time.sleep(0.5)
sys.exit(f"no answer from {url} within 180 s")
PY
  then
    log "$1 did not start; last lines of $state/$1.log:"
    tail -n 20 "$state/$1.log" >&2 || true
    exit 1
  fi
}

mkdir -p "$state"
for name in ray moto; do
  if running "$name"; then
    log "$name is already running (pid $(<"$state/$name.pid")); run infra/local/stop.sh first"
    exit 1
  fi
done

if ! "$python" -c 'import ray.dashboard.optional_deps' 2>/dev/null; then
  log "job submission needs Ray's dashboard, which needs ray[default]: $python -m pip install 'ray[default]'"
  exit 1
fi

for port in "$ray_port" "$dashboard_port" "$s3_port"; do
  if ! "$python" -c 'import socket, sys; socket.create_server(("127.0.0.1", int(sys.argv[1]))).close()' "$port" 2>/dev/null; then
    log "port $port is in use; choose others with RAY_PORT, RAY_DASHBOARD_PORT, S3_PORT"
    exit 1
  fi
done

export PATH="$(dirname "$python"):$PATH"
export AWS_ENDPOINT_URL="http://127.0.0.1:$s3_port"
export AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing  # moto accepts any key
export AWS_REGION=us-east-1 AWS_DEFAULT_REGION=us-east-1
export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH="$state/auth_token"
unset RAY_ADDRESS  # start a new head, never join another cluster
# Nothing to drain on a local head: on SIGTERM (stop.sh) end at once, not after 30 s.
export RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=${RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S:-0}
(umask 077 && "$python" -c 'import secrets; print(secrets.token_hex(32))' >"$RAY_AUTH_TOKEN_PATH")

# From here on, any failure stops whatever was started.
up=no
trap '[[ $up == yes ]] || SEMPART_LOCAL_DIR=$state "$root/infra/local/stop.sh" >&2 || true' EXIT

$setsid "$python" -m moto.server -H 127.0.0.1 -p "$s3_port" >"$state/moto.log" 2>&1 </dev/null &
echo $! >"$state/moto.pid"
$setsid "$python" -m ray.scripts.scripts start --head --block --disable-usage-stats \
  --port "$ray_port" --dashboard-host 127.0.0.1 --dashboard-port "$dashboard_port" \
  --num-cpus "$num_cpus" --temp-dir "$state/ray" "$@" >"$state/ray.log" 2>&1 </dev/null &
echo $! >"$state/ray.pid"

wait_ready moto "$AWS_ENDPOINT_URL/"
if [[ -n $bucket ]]; then
  "$python" -c 'import sys, urllib.request; urllib.request.urlopen(urllib.request.Request(sys.argv[1], method="PUT"))' \
    "$AWS_ENDPOINT_URL/$bucket"
  log "created bucket s3://$bucket"
fi
wait_ready ray "http://127.0.0.1:$dashboard_port/api/jobs/" "$RAY_AUTH_TOKEN_PATH"
up=yes
log "Ray head (pid $(<"$state/ray.pid"), dashboard http://127.0.0.1:$dashboard_port) and S3 (pid $(<"$state/moto.pid"), $AWS_ENDPOINT_URL) are up; state in $state"

# RAY_API_SERVER_ADDRESS, not RAY_ADDRESS: `ray job` reads either, but sempart commands
# run in this shell treat RAY_ADDRESS as a cluster to join with ray.init().
cat <<ENV
export RAY_API_SERVER_ADDRESS=http://127.0.0.1:$dashboard_port
export RAY_AUTH_MODE=token
export RAY_AUTH_TOKEN_PATH=$RAY_AUTH_TOKEN_PATH
export AWS_ENDPOINT_URL=$AWS_ENDPOINT_URL
export AWS_ACCESS_KEY_ID=testing
export AWS_SECRET_ACCESS_KEY=testing
export AWS_REGION=us-east-1
export AWS_DEFAULT_REGION=us-east-1
ENV
