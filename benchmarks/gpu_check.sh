#!/usr/bin/env bash
# Measure a GPU for sempart in one short run (under 8 minutes on one GPU, no network).
#   bash benchmarks/gpu_check.sh          # on the GPU machine; prints one JSON line last
#   bash benchmarks/gpu_check.sh --cpu    # every step, tiny, on the CPU (the test suite runs this)
# Needs python3 with torch, torchvision, timm, pyarrow, pillow, typer, fsspec; ray is
# optional (with it, `sempart label` runs end to end too). Installs this checkout
# without dependencies or an index when `sempart_core` does not import yet.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if ! "$PYTHON" -c "import sempart_core, pipeline" 2>/dev/null; then
    # Without an index, the install can fail (no setuptools, another Python version than
    # pyproject allows): the checkout then runs from its folder.
    "$PYTHON" -m pip install --quiet --no-deps --no-build-isolation --no-index -e . \
        || { echo "pip install failed: running from $PWD via PYTHONPATH" >&2; export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"; }
fi
exec "$PYTHON" benchmarks/gpu_check.py "$@"
