#!/usr/bin/env bash
# The CPU kernels under AddressSanitizer + UndefinedBehaviorSanitizer (docs/reliability.md).
#
#   bash tools/sanitize.sh                 # build (incremental) + the fast subset below
#   bash tools/sanitize.sh build           # build only
#   bash tools/sanitize.sh --durations=10  # the subset with extra pytest options
#   bash tools/sanitize.sh tests/test_x.py -k y   # build + these pytest arguments instead of the subset
#
# Builds a CPU-only blockops._C with -DBLOCKOPS_SANITIZE=ON (CMakeLists.txt) in build/sanitize/, apart from the
# normal build, and lays out build/sanitize/python/blockops: the package's Python files (symlinks into
# python/blockops) next to the sanitized library, so the normal build in python/blockops is left alone. Python and
# torch are not instrumented, so libasan is preloaded; leak detection is off (the interpreter's own allocations
# would drown the report), and the first ASan or UBSan finding aborts the process with a stack trace, which fails
# the test run. tests/test_sanitizers.py runs this script as part of the normal test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
case "$PY" in */*) PY="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")" ;; *) PY=$(command -v "$PY") ;; esac
BUILD=$ROOT/build/sanitize
PKG=$BUILD/python/blockops
CXX=${CXX:-g++}

# The fast subset: every op family's property-based fuzz tests and bad-input probes (each probe runs in a child
# process, which inherits the sanitizers), plus the bitpack, block_cache and dllm tests, which run their kernels on
# many awkward sizes cheaply. Left out: torch.compile and opcheck tests (slow under ASan, they test tracing, not
# the kernels' memory accesses), the per-ISA child-process tests and block_cache's policy / schedule tests (model
# level). About 2-3 minutes on 2 cores after the build (tests/test_sanitizers.py has the measured times).
SUBSET=(tests/test_fuzz.py tests/test_bitpack.py tests/test_block_cache.py tests/test_dllm_ops.py
        -k "not compile and not opcheck and not isa and not policy and not schedule")

"$PY" - <<'EOF' >/dev/null || { echo "sanitize.sh: $PY cannot import torch (run tools/setup.sh first)" >&2; exit 1; }
import torch
EOF
CMAKE=$("$PY" -c 'import cmake, os; print(os.path.join(cmake.CMAKE_BIN_DIR, "cmake"))' 2>/dev/null || command -v cmake)
NINJA=$("$PY" -c 'import ninja, os; print(os.path.join(ninja.BIN_DIR, "ninja"))' 2>/dev/null || command -v ninja)
LIBASAN=$("$CXX" -print-file-name=libasan.so)
if [ ! -e "$LIBASAN" ] || [ "$LIBASAN" = libasan.so ]; then
  echo "sanitize.sh: $CXX has no libasan.so (install the compiler's sanitizer runtime)" >&2
  exit 1
fi

mkdir -p "$PKG"
"$CMAKE" -S "$ROOT" -B "$BUILD" -G Ninja -DCMAKE_MAKE_PROGRAM="$NINJA" -DPython_EXECUTABLE="$PY" \
  -DCMAKE_CXX_COMPILER="$CXX" -DCMAKE_BUILD_TYPE=Release -DBLOCKOPS_CUDA=OFF -DBLOCKOPS_SANITIZE=ON \
  -DCMAKE_LIBRARY_OUTPUT_DIRECTORY="$PKG" >"$BUILD/configure.log" 2>&1 \
  || { cat "$BUILD/configure.log" >&2; exit 1; }
"$CMAKE" --build "$BUILD" --parallel "${MAX_JOBS:-$(nproc)}"

# The overlay package: every entry of python/blockops but the compiled library (a stale link is replaced).
for entry in "$ROOT"/python/blockops/*; do
  name=$(basename "$entry")
  case "$name" in _C*.so|_C*.pyd|__pycache__) continue ;; esac
  ln -sfn "$entry" "$PKG/$name"
done
find "$PKG" -maxdepth 1 -xtype l -delete  # links to files removed from python/blockops

[ "${1:-}" = build ] && exit 0
# No arguments, or only options (e.g. --durations=10): the subset (plus those options).
ARGS=("$@")
if [ ${#ARGS[@]} -eq 0 ] || [[ "${1:-}" == -* ]]; then ARGS=("${SUBSET[@]}" "$@"); fi

# libstdc++ right after libasan: ASan's __cxa_throw interceptor binds to the real one when it starts, and the
# Python executable does not link libstdc++ (without it the first C++ exception, e.g. one thrown while torch
# imports triton, aborts with "CHECK failed: real___cxa_throw != 0").
LIBSTDCXX=$("$CXX" -print-file-name=libstdc++.so)
export LD_PRELOAD="$LIBASAN:$LIBSTDCXX${LD_PRELOAD:+:$LD_PRELOAD}"
# Options given in the environment come last, so they override these.
export ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:abort_on_error=1${ASAN_OPTIONS:+:$ASAN_OPTIONS}"
export UBSAN_OPTIONS="halt_on_error=1:abort_on_error=1:print_stacktrace=1${UBSAN_OPTIONS:+:$UBSAN_OPTIONS}"
export PYTHONPATH="$BUILD/python${PYTHONPATH:+:$PYTHONPATH}"
export BLOCKOPS_SANITIZED_RUN=1   # tests/test_sanitizers.py skips itself inside (no recursion)
# The library loaded must be the sanitized one.
"$PY" -c "import blockops, sys; f = blockops._C.__file__
sys.exit(0 if f.startswith('$PKG') else 'sanitize.sh: loaded ' + f)"
exec "$PY" -m pytest -q -p no:cacheprovider "${ARGS[@]}"
