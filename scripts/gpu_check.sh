#!/usr/bin/env bash
# GPU acceptance on a node, in one call:  bash scripts/gpu_check.sh [OUT_DIR] [gpu_check.py options]
# Runs scripts/gpu_check.py under an outer 8-minute guard (on SIGTERM it writes what it has and exits), keeps the
# console in OUT_DIR/console.log next to gpu_check.json, gpu_check.md and the profiles. Python: $PYTHON, else
# .venv/bin/python, else python. The inductor cache defaults to runs/gpu_check_cache, so a rerun compiles less.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/gpu_check}
shift || true
py=${PYTHON:-.venv/bin/python}
[ -x "$py" ] || py=python
mkdir -p "$out"
export PYTHONUNBUFFERED=1 TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-$PWD/runs/gpu_check_cache/inductor}
timeout --signal=TERM --kill-after=15 480 "$py" scripts/gpu_check.py --out "$out" "$@" 2>&1 | tee "$out/console.log"
exit "${PIPESTATUS[0]}"
