#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Run on an offline GPU test host (here: the H200), from the repository root, after the three
# parts of the vLLM runtime bundle have been copied to /tmp/parts
# (scripts/gpu_prepare.sh builds what this needs into .gpu/; see
# ../shared/gpu/README.md). Steps, each optional, in order:
#   setup   unpack vLLM 0.26.0 into /tmp/vllm-site, lay the Python part of the
#           series onto it, build _qtip_C for sm_90 into it
#   tests   the kernel, codec and detection tests
#   models  the end-to-end model tests (LLM.generate vs the HF reference;
#           MODELS_K selects with pytest -k)
#   bench   scripts/bench_kernels.py -> $OUT/kernels_h200.json
#   profile scripts/profile_decode.py: one decode step, QTIP 2-bit and FP16
#           (PROFILE_MODEL, default llama-2-7b; PROFILE_BATCH, default 1;
#           PROFILE_WEIGHTS, default "qtip2 fp16"; PROFILE_TP, default 1, e.g.
#           2 with PROFILE_WEIGHTS="qtip2 qtip2-split" on an x2 host)
#           -> $OUT/profile_<weights>_<model>_b<batch>_tp<tp>.json
#   e2e     scripts/bench_e2e.py -> /tmp/e2e_h200.json, copied to $OUT
#           (resumes: rerun the step on the same machine to finish the table;
#           E2E_ARGS narrows it, E2E_JSON names another file, e.g. one per GPU)
#   serve   scripts/bench_serve.py (vllm serve + vllm bench serve, tokenizer
#           from .gpu/tokenizer) -> /tmp/serve_h200.json, copied to $OUT, and
#           each server's log in $OUT/serve_logs
#           (resumes like e2e; SERVE_ARGS narrows it)
#   parallel  the TP=2 / PP=2 model tests (two GPUs) and the one-GPU test of
#           their kernel path; PARALLEL_K selects with pytest -k, e.g.
#           "rcp0 or one_rank"
#   scale   scripts/bench_scale.py -> /tmp/scale_h200.json, copied to $OUT
#           (resumes like e2e; SCALE_ARGS narrows it, e.g.
#           "--configs 405b-qtip2"; two-GPU configurations need two GPUs)
#   scale_variants  for each patch in VARIANTS (e.g. the TP patches in
#           benchmarks/experiments/): apply it, rerun setup (lays the series,
#           rebuilds _qtip_C), run the SCALE_ARGS configurations into
#           $OUT/scale_<patch>.json, revert; then setup again for the tree's
#           own series (VARIANTS_RESTORE=0: the last variant stays applied).
#           A `scale` step before it is the same call's baseline
#           ($OUT/scale_main.json).
# Logs go to $OUT (or /tmp/qtip-out), packed into $OUT/results.tgz when
# they are more than the 8 files a device call brings back.
#   usage: scripts/gpu_host_run.sh setup tests models bench e2e
set -uo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
OUT=${OUT:-/tmp/qtip-out}
SITE=/tmp/vllm-site
VTREE=/tmp/vllm-tests-tree
mkdir -p "$OUT"
source "$(dirname "$0")/gpu_pack_out.sh"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_USE_FLASHINFER_SAMPLER=0
# The hosts keep NVLink multicast off; let vLLM's TP all-reduce not even set up
# symmetric memory (its custom all-reduce and NCCL remain).
export VLLM_ALLREDUCE_USE_SYMM_MEM=0
export PYTHONPATH=$SITE PYTHONUNBUFFERED=1
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
  cmake --version | head -1
  if TORCH_CUDA_ARCH_LIST=9.0 bash scripts/build_qtip_ext.sh python3 \
      "$REPO/.gpu/vllm-src" "$SITE" /tmp/qtip-ext > "$OUT/build.log" 2>&1; then
    echo "_qtip_C built with CMake in $((SECONDS - t0)) s"
  else
    # Should the host's CMake not take our CMakeLists.txt, build the same
    # sources with torch's extension builder so the GPU run still happens.
    tail -30 "$OUT/build.log"
    echo "CMake build failed; building with torch.utils.cpp_extension"
    TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 python3 - <<'PY' 2>&1 | tail -5
import glob, shutil, torch.utils.cpp_extension as ce
# The stable libtorch ABI of torch 2.11, built as the extension vllm._qtip_C.
STABLE = ["-DTORCH_TARGET_VERSION=0x020B000000000000ULL", "-DUSE_CUDA", "-DQTIP_STANDALONE_EXTENSION"]
srcs = sorted(glob.glob("csrc/libtorch_stable/quantization/qtip/*.cu") + glob.glob("csrc/libtorch_stable/quantization/qtip/*.cpp"))
m = ce.load(name="_qtip_C", sources=srcs, extra_include_paths=[".gpu/vllm-src/csrc"],
            extra_cflags=STABLE, extra_cuda_cflags=STABLE + ["-O3", "--expt-relaxed-constexpr"], build_directory="/tmp")
shutil.copy(m.__file__, "/tmp/vllm-site/vllm/_qtip_C.abi3.so")
PY
    echo "_qtip_C built with cpp_extension in $((SECONDS - t0)) s"
  fi
  python3 -c "import vllm._qtip_C, torch; print('ops:', [o for o in dir(torch.ops._qtip_C) if not o.startswith('_')])"
  rm -rf "$VTREE" && mkdir -p "$VTREE" && tar xzf .gpu/vllm-tests.tgz -C "$VTREE"
  cp -r vllm_overlay/tests/. "$VTREE/tests/"
  set +e
}

# GPU tests: kernels (bad inputs in their own process, since a bad launch
# can take the process down), the codec, detection, and the models end to end.
# The layer tests of test_qtip.py are CPU tests; CI runs them.
step_tests() {
  cd "$VTREE"
  local t=tests/kernels/quantization/test_qtip.py
  timeout 240 python3 -m pytest -p no:cacheprovider -q -rfEs $t -k "not bad_inputs" \
    tests/kernels/quantization/test_qtip_fake.py \
    tests/quantization/test_qtip_reference.py \
    tests/quantization/test_qtip_detection.py 2>&1 | tee "$OUT/tests_kernels.log" | tail -25
  timeout 60 python3 -m pytest -p no:cacheprovider -q -rfE $t -k bad_inputs 2>&1 \
    | tee "$OUT/tests_bad_inputs.log" | tail -5
  cd "$REPO"
}

step_models() {
  cd "$VTREE"
  timeout "${MODELS_TIMEOUT:-420}" python3 -m pytest -p no:cacheprovider -v -rfEs \
    tests/models/quantization/test_qtip.py ${MODELS_K:+-k "$MODELS_K"} 2>&1 \
    | tee "$OUT/tests_models.log" | tail -40
  cd "$REPO"
}

step_parallel() {
  cd "$VTREE"
  timeout "${PARALLEL_TIMEOUT:-570}" python3 -m pytest -p no:cacheprovider -v -rfEs -s \
    tests/models/quantization/test_qtip_parallel.py ${PARALLEL_K:+-k "$PARALLEL_K"} 2>&1 \
    | tee -a "$OUT/tests_parallel.log" | grep -E "PASSED|FAILED|SKIPPED|ERROR|max \|logprob|Error|passed|failed" | tail -40
  cd "$REPO"
}

step_bench() {
  timeout "${BENCH_TIMEOUT:-240}" python3 scripts/bench_kernels.py "$OUT/kernels_h200.json" \
    2>&1 | tee "$OUT/bench_kernels.log" | tail -60
}

step_profile() {
  local model=${PROFILE_MODEL:-llama-2-7b} batch=${PROFILE_BATCH:-1} tp=${PROFILE_TP:-1}
  for weights in ${PROFILE_WEIGHTS:-qtip2 fp16}; do
    local name="profile_${weights}_${model}_b${batch}_tp${tp}"
    timeout "${PROFILE_TIMEOUT:-150}" python3 scripts/profile_decode.py \
      --model "$model" --weights $weights --batch "$batch" --tp "$tp" \
      --out "$OUT/$name.json" 2>&1 | tee "$OUT/$name.log" | tail -25
  done
}

step_e2e() {
  local json=${E2E_JSON:-/tmp/e2e_h200.json}
  timeout "${E2E_TIMEOUT:-420}" python3 scripts/bench_e2e.py --out "$json" \
    --resume ${E2E_ARGS:-} 2>&1 | tee -a "$OUT/bench_e2e.log" | tail -30
  # E2E_JSON may already be in $OUT (cp would fail on the same file).
  [ "$json" -ef "$OUT/$(basename "$json")" ] || cp "$json" "$OUT/" 2>/dev/null
}

step_serve() {
  timeout "${SERVE_TIMEOUT:-420}" python3 scripts/bench_serve.py --tokenizer .gpu/tokenizer \
    --out /tmp/serve_h200.json --resume --log-dir "$OUT/serve_logs" ${SERVE_ARGS:-} 2>&1 |
    tee -a "$OUT/bench_serve.log" | tail -30
  cp /tmp/serve_h200.json "$OUT/" 2>/dev/null
}

step_scale() {
  timeout "${SCALE_TIMEOUT:-570}" python3 scripts/bench_scale.py --out /tmp/scale_h200.json \
    --resume ${SCALE_ARGS:-} 2>&1 | tee -a "$OUT/bench_scale.log" | tail -40
  cp /tmp/scale_h200.json "$OUT/" 2>/dev/null
}

step_scale_variants() {
  if [ -f /tmp/scale_h200.json ]; then
    mv /tmp/scale_h200.json "$OUT/scale_main.json"
    rm -f "$OUT/scale_h200.json"
  fi
  local patch name
  for patch in ${VARIANTS:?VARIANTS must list the patches to measure}; do
    name=$(basename "$patch" .patch)
    echo "--- variant $name" | tee -a "$OUT/bench_scale.log"
    if ! patch -p1 --forward < "$patch" > "$OUT/patch_$name.log"; then
      cat "$OUT/patch_$name.log"
      continue
    fi
    # In a subshell, so that setup's `set -e` does not stay on for the loop;
    # a failed setup is reported and the loop goes on.
    (step_setup) > "$OUT/setup_$name.log" 2>&1 || echo "setup of $name failed"
    step_scale
    mv /tmp/scale_h200.json "$OUT/scale_$name.json" 2>/dev/null
    rm -f "$OUT/scale_h200.json"
    # VARIANTS_RESTORE=0 keeps the last variant applied and built (its
    # parallel tests can follow in the same call; ~60 s less device time).
    [ "${VARIANTS_RESTORE:-1}" = 0 ] && [ "$patch" = "${VARIANTS##* }" ] && return
    patch -p1 -R < "$patch" > /dev/null
  done
  (step_setup) > "$OUT/setup_main.log" 2>&1 || echo "setup of the tree's own series failed"
}

for step in "$@"; do
  echo "=== $step ==="
  "step_$step" || echo "step $step failed"
done
