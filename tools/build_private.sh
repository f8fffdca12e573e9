#!/usr/bin/env bash
# Builds blockops' extension into a private folder (not the package's build/ or python/blockops), e.g. to check a
# family's CUDA sources and glue compile and link while another build or test uses the installed one:
#   tools/build_private.sh /tmp/build-attn attention        # families: BLOCKOPS_FAMILIES syntax (; separated)
# The library lands in DIR/out/. TORCH_CUDA_ARCH_LIST defaults to CI's "8.0;9.0a".
set -euo pipefail
cd "$(dirname "$0")/.."
dir=$1
families=${2:-}
py=$PWD/.venv/bin/python
cmake=$($py -c 'import cmake, pathlib; print(pathlib.Path(cmake.CMAKE_BIN_DIR) / "cmake")')
ninja=$($py -c 'import ninja, pathlib; print(pathlib.Path(ninja.BIN_DIR) / "ninja")')
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda-13.0}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-8.0;9.0a}
args=()
[ -n "$families" ] && args+=("-DBLOCKOPS_FAMILIES=$families")
"$cmake" -S . -B "$dir" -G Ninja -DPython_EXECUTABLE="$py" -DCMAKE_LIBRARY_OUTPUT_DIRECTORY="$dir/out" \
  -DCMAKE_BUILD_TYPE=Release -DCMAKE_MAKE_PROGRAM="$ninja" "${args[@]}" >"$dir.configure.log" 2>&1 ||
  { tail -30 "$dir.configure.log"; exit 1; }
"$cmake" --build "$dir" --parallel "${MAX_JOBS:-2}"
