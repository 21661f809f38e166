#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Build vllm._qtip_C with our CMakeLists.txt and install it beside a vllm package.
#   usage: build_qtip_ext.sh PYTHON VLLM_SOURCE_DIR INSTALL_PREFIX [BUILD_DIR]
# INSTALL_PREFIX is the directory that holds vllm/ (a source tree installed
# editable, or site-packages).
#
# Architectures: TORCH_CUDA_ARCH_LIST if set; otherwise those of the GPUs
# present (nvidia-smi, else torch); otherwise, on a machine without a GPU,
# the release list QTIP_RELEASE_ARCHS. Parallelism: MAX_JOBS compile jobs
# (default: the number of cores) and NVCC_THREADS architectures per nvcc
# (default: what the cores left over allow), as in vLLM's setup.py.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
PY=${1:?python}; SRC=${2:?vLLM source tree}; PREFIX=${3:?install prefix}
BUILD=${4:-$REPO/build/qtip-ext}
QTIP_RELEASE_ARCHS=${QTIP_RELEASE_ARCHS:-8.0 8.6 8.9 9.0}
if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
  archs=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | sort -u | xargs || true)
  if [ -z "$archs" ]; then
    archs=$("$PY" -c 'import torch
print(*sorted({"%d.%d" % torch.cuda.get_device_capability(i)
               for i in range(torch.cuda.device_count())}))' 2>/dev/null || true)
  fi
  if [ -n "$archs" ]; then
    echo "GPU present: building for its architecture(s) $archs" \
      "(TORCH_CUDA_ARCH_LIST overrides, e.g. make build-release)"
  fi
  TORCH_CUDA_ARCH_LIST=${archs:-$QTIP_RELEASE_ARCHS}
fi
export TORCH_CUDA_ARCH_LIST
n_archs=$(echo "$TORCH_CUDA_ARCH_LIST" | tr ';' ' ' | wc -w)
cores=$(nproc)
# Four sources compile side by side; cores beyond that go to nvcc threads.
NVCC_THREADS=${NVCC_THREADS:-$(( cores / 4 < 1 ? 1 : (cores / 4 > n_archs ? n_archs : cores / 4) ))}
MAX_JOBS=${MAX_JOBS:-$(( cores / NVCC_THREADS < 1 ? 1 : cores / NVCC_THREADS ))}
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
echo "building _qtip_C for TORCH_CUDA_ARCH_LIST='$TORCH_CUDA_ARCH_LIST' with $CUDA_HOME/bin/nvcc" \
  "($MAX_JOBS jobs, $NVCC_THREADS nvcc threads)"
cmake -S "$REPO" -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release \
  -DVLLM_PYTHON_EXECUTABLE="$PY" -DVLLM_SOURCE_DIR="$SRC" \
  -DCMAKE_CUDA_COMPILER="$CUDA_HOME/bin/nvcc" -DCUDAToolkit_ROOT="$CUDA_HOME" -DCUDA_TOOLKIT_ROOT_DIR="$CUDA_HOME" \
  -DNVCC_THREADS="$NVCC_THREADS" "${extra[@]}"
cmake --build "$BUILD" --target _qtip_C -j "$MAX_JOBS"
cmake --install "$BUILD" --component _qtip_C --prefix "$PREFIX"
