#!/usr/bin/env bash
# GPU check: on a CUDA machine with torch already installed and no network, build blockops for this GPU,
# run the test suite (CUDA cases included) and the full benchmark suite, and leave logs and JSON in the
# folder given as the first argument. Takes well under 8 minutes on an H100/H200.
#   bash bench/gpu_check.sh OUT_DIR [WHEEL_DIR]
# WHEEL_DIR may hold wheels missing on that machine (nvidia-cutlass); they are installed with --no-deps into
# a private folder put on PYTHONPATH.
set -uo pipefail
out=${1:?usage: bench/gpu_check.sh OUT_DIR [WHEEL_DIR]}
wheels=${2:-}
cd "$(dirname "$0")/.."
mkdir -p "$out"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
if [ -n "$wheels" ] && ls "$wheels"/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/blockops-site "$wheels"/*.whl
  export PYTHONPATH=/tmp/blockops-site${PYTHONPATH:+:$PYTHONPATH}
fi
if ! $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check: no CUDA device visible to torch; run this on a GPU machine" >&2
  exit 2
fi
arch=$($PY -c "import torch; m, n = torch.cuda.get_device_capability(); print(f'{m}.{n}' + ('a' if m >= 9 else ''))")
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$arch}
export MAX_JOBS=${MAX_JOBS:-16}
{ nvidia-smi; $PY -c "import torch; print(torch.__version__, torch.cuda.get_device_name())"; } > "$out/machine.txt" 2>&1
echo "== build for $TORCH_CUDA_ARCH_LIST"
start=$(date +%s)
$PY -m pip install --no-build-isolation --no-deps -e . > "$out/build.log" 2>&1 || { tail -50 "$out/build.log"; exit 1; }
echo "build: $(( $(date +%s) - start )) s"
$PY -m blockops info | tee "$out/build_info.json"
echo "== tests"
timeout 300 $PY -m pytest -q -x --junitxml="$out/tests.xml" tests > "$out/tests.log" 2>&1
test_rc=$?
tail -15 "$out/tests.log"
echo "== benchmarks"
# Full grids for the GEMM families; the attention family's quick GPU set (T=16384, D=128, bf16: the TFLOP/s
# goal's shape) -- its full grid (T up to 65536) does not fit a 15-minute device budget.
timeout 240 $PY -m blockops bench --full --family bitpack --family lowbit --json "$out/bench.json" \
  > "$out/bench.log" 2>&1
bench_rc=$?
timeout 180 $PY -m blockops bench --family attention --json "$out/bench_attention.json" >> "$out/bench.log" 2>&1
bench_rc=$(( bench_rc || $? ))
# Vector-quantized GEMM: LLM shapes at batch 1..16 and DiT-XL/2 shapes at 256..4096 tokens (its full grid).
timeout 180 $PY -m blockops bench --full --family vq --json "$out/bench_vq.json" >> "$out/bench.log" 2>&1
# PaTH: the CUDA kernels against the CPU kernels (tests skipped without a GPU elsewhere), then the quick bench.
timeout 240 $PY -m pytest -q -k cuda --junitxml="$out/tests_path_cuda.xml" tests/test_path_attention.py \
  > "$out/tests_path_cuda.log" 2>&1
test_rc=$(( test_rc || $? ))
tail -5 "$out/tests_path_cuda.log"
timeout 120 $PY -m blockops bench --family path_attention --json "$out/bench_path.json" >> "$out/bench.log" 2>&1
bench_rc=$(( bench_rc || $? ))
cat "$out/bench.log"
echo "tests rc=$test_rc bench rc=$bench_rc"
exit $(( test_rc != 0 || bench_rc != 0 ))
