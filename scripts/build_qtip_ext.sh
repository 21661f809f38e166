#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Build vllm._qtip_C with our CMakeLists.txt and install it beside a vllm package.
#   usage: build_qtip_ext.sh PYTHON VLLM_SOURCE_DIR INSTALL_PREFIX [BUILD_DIR]
# INSTALL_PREFIX is the directory that holds vllm/ (a source tree installed
# editable, or site-packages). TORCH_CUDA_ARCH_LIST picks the architectures.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
PY=${1:?python}; SRC=${2:?vLLM source tree}; PREFIX=${3:?install prefix}
BUILD=${4:-$REPO/build/qtip-ext}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-8.0 8.6 8.9 9.0}
if [ -z "${CUDA_HOME:-}" ]; then
  if [ -x /usr/local/cuda/bin/nvcc ]; then
    CUDA_HOME=/usr/local/cuda
  else
    NVCC=$(command -v nvcc || true)
    [ -n "$NVCC" ] || { echo "error: nvcc not found; set CUDA_HOME" >&2; exit 1; }
    CUDA_HOME=$(dirname "$(dirname "$(readlink -f "$NVCC")")")
  fi
fi
export CUDA_HOME
extra=()
if ! /sbin/ldconfig -p 2>/dev/null | grep -q 'libcuda\.so ' \
   && [ ! -e "$CUDA_HOME/lib64/stubs/libcuda.so" ]; then
  # A machine without a GPU driver: link against an empty stand-in; the
  # driver's libcuda is what the extension finds at run time.
  mkdir -p "$BUILD/stubs"
  echo "" | gcc -shared -x c - -o "$BUILD/stubs/libcuda.so"
  extra+=("-DCUDA_cuda_driver_LIBRARY=$BUILD/stubs/libcuda.so")
fi
echo "building _qtip_C for TORCH_CUDA_ARCH_LIST='$TORCH_CUDA_ARCH_LIST' with $CUDA_HOME/bin/nvcc"
cmake -S "$REPO" -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release \
  -DVLLM_PYTHON_EXECUTABLE="$PY" -DVLLM_SOURCE_DIR="$SRC" \
  -DCMAKE_CUDA_COMPILER="$CUDA_HOME/bin/nvcc" -DCUDAToolkit_ROOT="$CUDA_HOME" -DCUDA_TOOLKIT_ROOT_DIR="$CUDA_HOME" \
  "${extra[@]}"
cmake --build "$BUILD" --target _qtip_C
cmake --install "$BUILD" --component _qtip_C --prefix "$PREFIX"
