#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Run on the offline H100 test host, from the repository root, after the three
# parts of the vLLM runtime bundle have been copied to /tmp/parts
# (scripts/gpu_prepare.sh builds what this needs into .gpu/; see
# ../shared/gpu/README.md). Steps, each optional, in order:
#   setup   unpack vLLM 0.26.0 into /tmp/vllm-site, lay the Python part of the
#           series onto it, build _qtip_C for sm_90 into it
#   tests   the QTIP GPU tests (kernels, layer, end to end) and the CPU ones
#   bench   scripts/bench_kernels.py -> $OUT/kernels_h100.json
# Logs go to $OUT (or /tmp/qtip-out).
#   usage: scripts/gpu_host_run.sh setup tests bench
set -uo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
OUT=${OUT:-/tmp/qtip-out}
SITE=/tmp/vllm-site
VTREE=/tmp/vllm-tests-tree
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_USE_FLASHINFER_SAMPLER=0
export PYTHONPATH=$SITE PYTHONUNBUFFERED=1
export QTIP_GOLDEN_DIR=$REPO/.gpu/ref/goldens QTIP_HADAMARD_NPZ=$REPO/.gpu/ref/qtip_hadamard_k.npz
cd "$REPO"

step_setup() {
  set -e
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
  if [ ! -d "$SITE/vllm" ]; then
    bash .gpu/unpack-vllm-bundle.sh /tmp/parts "$SITE"
  fi
  python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$SITE" .gpu/whl/*.whl
  python3 scripts/vllm_tree.py apply --tree "$SITE"
  local t0=$SECONDS
  TORCH_CUDA_ARCH_LIST=9.0 NVCC_THREADS=4 bash scripts/build_qtip_ext.sh python3 \
    "$REPO/.gpu/vllm-src" "$SITE" /tmp/qtip-ext > "$OUT/build.log" 2>&1 \
    || { tail -50 "$OUT/build.log"; return 1; }
  echo "_qtip_C built in $((SECONDS - t0)) s"
  python3 -c "import vllm._qtip_C, torch; print('ops:', [o for o in dir(torch.ops._qtip_C) if not o.startswith('_')])"
  rm -rf "$VTREE" && mkdir -p "$VTREE" && tar xzf .gpu/vllm-tests.tgz -C "$VTREE"
  cp -r vllm_overlay/tests/. "$VTREE/tests/"
  set +e
}

step_tests() {
  ( cd "$VTREE" && python3 -m pytest -p no:cacheprovider -rs -v \
      tests/kernels/quantization/test_qtip.py \
      tests/quantization/test_qtip_reference.py \
      tests/quantization/test_qtip.py \
      tests/quantization/test_qtip_detection.py \
      tests/models/quantization/test_qtip.py 2>&1 | tee "$OUT/tests.log" | tail -80 )
}

step_bench() {
  python3 scripts/bench_kernels.py --out "$OUT/kernels_h100.json" 2>&1 | tee "$OUT/bench.log" | tail -60
}

for step in "$@"; do
  echo "=== $step ==="
  "step_$step" || echo "step $step failed"
done
