#!/usr/bin/env bash
# Every GPU figure sempart reports, in one bounded run on a GPU machine (about 8 minutes on
# one GPU, no network): each step has its own time limit and its own log, and a step that
# fails or runs out of time does not stop the next one.
#   bash benchmarks/gpu_figures.sh LOGDIR [STEP ...]
# Steps (all by default): check ceiling-gpu instances finish ceiling-cpu label-instances.
# LOGDIR gets STEP.log for each step and summary.jsonl (each step's last JSON line).
# Needs what gpu_check.sh needs, and ray for the ceiling and label steps.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
logs="${1:?usage: gpu_figures.sh LOGDIR [STEP ...]}"; shift
steps=("$@"); [ ${#steps[@]} -gt 0 ] || steps=(check ceiling-gpu instances finish ceiling-cpu label-instances)
mkdir -p "$logs"
work="${TMPDIR:-/tmp}/sempart-gpu-figures"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

run() {  # run STEP LIMIT_S COMMAND...
    local name=$1 limit=$2; shift 2
    local start=$SECONDS
    echo "== $name (limit ${limit} s): $*"
    timeout -k 10 "$limit" "$@" > "$logs/$name.log" 2>&1
    local rc=$?
    echo "== $name: exit $rc after $((SECONDS - start)) s"
    tail -n 3 "$logs/$name.log"
    local last; last=$(grep '^{' "$logs/$name.log" | tail -n 1)
    printf '{"step": "%s", "exit": %d, "seconds": %d, "result": %s}\n' \
        "$name" "$rc" "$((SECONDS - start))" "${last:-null}" >> "$logs/summary.jsonl"
}

for step in "${steps[@]}"; do
    case $step in
        check) run check 170 bash benchmarks/gpu_check.sh --work "$work/check" ;;
        ceiling-gpu) run ceiling-gpu 110 "$PYTHON" benchmarks/pipeline_ceiling.py --gpu --decode gpu --n 5000 \
            --sample 0 --idle-s 10 --work "$work/ceiling" ;;
        ceiling-gpu-20k) run ceiling-gpu-20k 200 "$PYTHON" benchmarks/pipeline_ceiling.py --gpu --decode gpu \
            --n 20000 --sample 0 --idle-s 10 --work "$work/ceiling" ;;
        instances) run instances 60 "$PYTHON" benchmarks/instances.py --device cuda --n 16 --threads 8 ;;
        finish) run finish 40 "$PYTHON" benchmarks/device_finish.py --device cuda --n 30 ;;
        ceiling-cpu) run ceiling-cpu 90 "$PYTHON" benchmarks/pipeline_ceiling.py --gpu --decode cpu --n 5000 \
            --sample 0 --idle-s 10 --work "$work/ceiling" ;;
        label-instances) run label-instances 60 "$PYTHON" -m pipeline.cli label --gpu --instances 3 \
            --model "$work/check/model" --input tests/data/duts-te/images --out "$work/label-instances" ;;
        *) echo "unknown step: $step" >&2; exit 2 ;;
    esac
done
echo "== summary"; cat "$logs/summary.jsonl"
