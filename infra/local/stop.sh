#!/usr/bin/env bash
# Stop the Ray head and the S3 server that infra/local/start.sh started, and only those:
# each by the pid in its pid file (SIGTERM; Ray's `ray start --block` then ends all of
# its processes), never `ray stop`, which would end every Ray instance on the machine.
# Same setting as start.sh: SEMPART_LOCAL_DIR.
set -euo pipefail

state=${SEMPART_LOCAL_DIR:-/tmp/sempart-local}

stop() {  # NAME MARK: end the process in NAME.pid if its command line contains MARK
  local pid_file=$state/$1.pid pid ours=no
  [[ -f $pid_file ]] || return 0
  pid=$(<"$pid_file")
  if kill -0 "$pid" 2>/dev/null && [[ $(ps -o args= -p "$pid") == *"$2"* ]]; then
    ours=yes
    kill -TERM "$pid"
    for _ in $(seq 120); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.5
    done
    kill -KILL "$pid" 2>/dev/null || true
    echo "stop.sh: stopped $1 (pid $pid)" >&2
  fi
  # start.sh runs each under setsid, so the pid is also its process group: whatever of
  # ours is left there (the same mark on the command line) goes too.
  if [[ $ours == yes ]] || pgrep -g "$pid" -f "$2" >/dev/null 2>&1; then
    kill -KILL -- "-$pid" 2>/dev/null || true
  fi
  rm -f "$pid_file"
}

stop ray "$state/ray"
stop moto moto.server
