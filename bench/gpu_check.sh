#!/usr/bin/env bash
# GPU check, the one command for a lent GPU (docs/gpu-check.md): builds blockops for this GPU only, then runs the CUDA
# tests, a compute-sanitizer memcheck pass and the goal benchmarks, each stage within its budget, the whole run
# within 9 minutes, streaming every result to OUT_DIR (results.jsonl, summary.txt and four logs). The logic is in
# bench/gpu_check.py; this wrapper only installs optional wheels and starts it.
#   bash bench/gpu_check.sh OUT_DIR [WHEEL_DIR] [gpu_check.py options, e.g. --only tests:lowbit,bench:attention]
# WHEEL_DIR may hold wheels missing on that machine (e.g. nvidia-cutlass: the build finds its headers, no kernel uses
# them yet); they are installed with --no-deps into a private folder put on PYTHONPATH.
set -uo pipefail
t0=$(date +%s.%N)
out=${1:?usage: bench/gpu_check.sh OUT_DIR [WHEEL_DIR] [gpu_check.py options]}
shift
wheels=""
if [ $# -gt 0 ] && [ "${1#-}" = "$1" ]; then wheels=$1; shift; fi
cd "$(dirname "$0")/.." || exit 2
mkdir -p "$out"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
if [ -n "$wheels" ]; then
  if ls "$wheels"/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/blockops-site "$wheels"/*.whl \
      && export PYTHONPATH=/tmp/blockops-site${PYTHONPATH:+:$PYTHONPATH} \
      || echo "gpu_check: installing the wheels of $wheels failed; going on without them" >&2
  else
    echo "gpu_check: no wheels in $wheels; going on without them" >&2
  fi
fi
exec $PY bench/gpu_check.py --out "$out" --t0 "$t0" "$@"
