#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Kernel iteration on a GPU host without vLLM (torch only): build _qtip_C with
# CMake, run the vLLM-free kernel tests, the decode-only
# ceiling (hyb_decode_bench.cu) and the kernel benchmark; logs to $OUT (one
# results.tgz when more than the 8 files a device call brings back).
# Needs .gpu/vllm-src/csrc/core/registration.h and .gpu/ref (goldens,
# hyb_decode_bench.cu): scripts/gpu_prepare.sh --kernels puts them there.
# ab_base + variants with AB=1: instead of a separate benchmark run per
# variant, scripts/ab_kernels.py times the variant and the tree's own kernels
# (built under another op namespace by ab_base) in turn in one process
# (AB_ARGS, e.g. "--K 2 --batches 1 16"), so both see the same clocks.
#   usage: scripts/gpu_kernel_run.sh [build] [tests] [ceiling] [bench] [ncu] [ncu_source] [ab_base] [variants] [quantize]
# variants: for each patch in VARIANTS (default .gpu/exp/*.patch, e.g. the
# ones of benchmarks/experiments/): apply, build, kernel tests, bench, the
# comparison with the baseline (scripts/compare_kernels.py), then revert;
# each variant's logs in $OUT/variants.tgz. Run it after build/bench so the
# tree's own kernels are the baseline; VARIANTS_RESTORE=0 skips rebuilding
# them at the end (when nothing else follows in the call).
set -uo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
OUT=${OUT:-/tmp/qtip-out}
# QK: where _qtip_C and the stand-ins go; a second run at the same time (one
# per GPU, from its own copy of the repository) needs its own.
QK=${QK:-/tmp/qtip-kernels}
mkdir -p "$OUT" "$QK/vllm"
source "$(dirname "$0")/gpu_pack_out.sh"
export PYTHONPATH=$QK:$REPO/vllm_overlay PYTHONUNBUFFERED=1
# Goldens are found next to the tests (tests/quantization/qtip_goldens).
cd "$REPO"

# The two things outside torch that the wrappers and the codec import, as
# stand-ins on a host without vLLM: the platform (CUDA capability queries)
# and compressed-tensors' H_K table (copied by gpu_prepare.sh --kernels).
write_shims() {
  mkdir -p "$QK/vllm/platforms" "$QK/compressed_tensors/transform/utils"
  cat > "$QK/vllm/platforms/__init__.py" <<'PY'
import torch


class _CudaPlatform:
    def is_cuda(self) -> bool:
        return torch.cuda.is_available() and torch.version.hip is None

    def has_device_capability(self, capability, device_id: int = 0) -> bool:
        if isinstance(capability, int):
            capability = divmod(capability, 10)
        return torch.cuda.get_device_capability(device_id) >= tuple(capability)


current_platform = _CudaPlatform()
PY
  touch "$QK/compressed_tensors/__init__.py" "$QK/compressed_tensors/transform/__init__.py" \
    "$QK/compressed_tensors/transform/utils/__init__.py"
  echo "REPO_PATH = '$REPO/.gpu/ref/hadamards.safetensors'" \
    > "$QK/compressed_tensors/transform/utils/hadamard.py"
}

step_build() {
  write_shims
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
  local t0=$SECONDS
  # The same CMake build as the product's (vLLM's helpers from .gpu/vllm-src),
  # installed beside the stand-in vllm package.
  TORCH_CUDA_ARCH_LIST=9.0 bash scripts/build_qtip_ext.sh python3 "$REPO/.gpu/vllm-src" "$QK" \
    "$QK-build" > "$OUT/build.log" 2>&1 || { tail -30 "$OUT/build.log"; return 1; }
  echo "_qtip_C built in $((SECONDS - t0)) s"
}

# TESTS_K narrows the kernel tests (pytest -k, always without bad_inputs) and
# TESTS_TIMEOUT bounds them, e.g. a quick first run of a new kernel that could
# hang: TESTS_K=gemm_vs_decoded TESTS_TIMEOUT=90.
step_tests() {
  timeout "${TESTS_TIMEOUT:-300}" python3 -m pytest -p no:cacheprovider -q -rfEs -x \
    vllm_overlay/tests/kernels/quantization/test_qtip.py \
    -k "not bad_inputs${TESTS_K:+ and ($TESTS_K)}" 2>&1 \
    | tee "$OUT/tests_kernels.log" | tail -30
  timeout 60 python3 -m pytest -p no:cacheprovider -q -rfE \
    vllm_overlay/tests/kernels/quantization/test_qtip.py -k bad_inputs 2>&1 | tail -3
}

step_ceiling() {
  nvcc -O3 -arch=sm_90 -o "$QK/hyb_decode_bench" .gpu/ref/hyb_decode_bench.cu &&
    timeout 120 "$QK/hyb_decode_bench" | tee "$OUT/decode_ceiling.log" | sort -t';' -k2 | tail -4
}

step_bench() {
  local ceiling=()
  [ -f "$OUT/decode_ceiling.log" ] && ceiling=(--ceiling-log "$OUT/decode_ceiling.log")
  timeout "${BENCH_TIMEOUT:-300}" python3 scripts/bench_kernels.py "$OUT/kernels_h200.json" \
    "${ceiling[@]}" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench_kernels.log" | tail -80
}

# ncu serializes kernels, so its durations are each kernel's own (the
# benchmark's profiler times of PDL-chained kernels include their waits).
# Per batch in NCU_BATCHES (default: 1 and 64): the duration of every kernel
# of one qtip_matmul call for each m x n in NCU_SHAPES, then (unless
# NCU_DETAIL=0; only at the batches in NCU_DETAIL_BATCHES if set) one detailed report and the stall reasons of the third
# launch of NCU_KERNEL (a regex, default qtip_mma: only below 256 rows, where
# the fused path runs; NCU_SKIP matching launches skipped first, default 2) at
# NCU_M x 4096, then its per-pipe utilisation. The matching launches come in profile_kernels.py's call order:
# e.g. NCU_KERNEL=qtip_hadamard matches each call's input then output
# transform, so NCU_SKIP=3 picks the second call's output transform.
# The raw files go to $OUT/ncu.tgz, or ncu_$NCU_TAG.tgz when NCU_TAG is set (so
# several ncu steps of one call keep theirs; a device call returns at most 8 files).
step_ncu() {
  local raw=$OUT/ncu
  mkdir -p "$raw"
  for batch in ${NCU_BATCHES:-1 64}; do
    for shape in ${NCU_SHAPES:-4096x4096 4096x11008 11008x4096}; do
      timeout 120 ncu --clock-control none --print-units base --metrics gpu__time_duration.sum \
        --csv python3 scripts/profile_kernels.py --m "${shape%x*}" --n "${shape#*x}" --batch "$batch" --iters 2 \
        2>&1 | grep -v "^==" > "$raw/ncu_times_${shape}_b$batch.csv"
      echo "$shape batch $batch (us):"
      python3 - "$raw/ncu_times_${shape}_b$batch.csv" <<'PY'
import csv, sys
rows = [r for r in csv.DictReader(open(sys.argv[1])) if r.get("Metric Name") == "gpu__time_duration.sum"]
last = rows[len(rows) // 2:]  # the second of the two calls
for r in last:
    print(f"  {float(r['Metric Value'].replace(',', '')) / 1000:9.2f}  {r['Kernel Name'][:100]}")
print(f"  {sum(float(r['Metric Value'].replace(',', '')) for r in last) / 1000:9.2f}  total")
PY
    done
    # The dense path has no qtip_mma; NCU_DETAIL=0 skips the detailed report.
    [ "${NCU_DETAIL:-1}" = 1 ] || continue
    [[ " ${NCU_DETAIL_BATCHES:-$batch} " == *" $batch "* ]] || continue
    [ "$batch" -lt 256 ] || [ "${NCU_KERNEL:-qtip_mma}" != qtip_mma ] || continue
    timeout 180 ncu --clock-control none --kernel-name "regex:${NCU_KERNEL:-qtip_mma}" --launch-skip "${NCU_SKIP:-2}" --launch-count 1 \
      --section SpeedOfLight --section WarpStateStats --section ComputeWorkloadAnalysis --section Occupancy \
      --metrics smsp__issue_active.avg.pct_of_peak_sustained_active,l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_ld.sum,smsp__inst_executed_op_shared_ld.sum,l1tex__data_pipe_lsu_wavefronts_mem_shared_op_ld.sum,smsp__inst_executed.sum,sm__cycles_elapsed.avg.per_second,smsp__warps_active.avg.pct_of_peak_sustained_active \
      python3 scripts/profile_kernels.py --m ${NCU_M:-11008} --n ${NCU_N:-4096} --batch "$batch" 2>&1 \
      | tee "$raw/ncu_b$batch.log" | grep -v "^==PROF==" | tail -70
    # Every stall reason in cycles per issued instruction (the sections name
    # only the largest); its own run, so a metric this ncu lacks costs only it.
    local reasons="barrier branch_resolving dispatch_stall drain imc_miss lg_throttle long_scoreboard"
    reasons+=" math_pipe_throttle membar mio_throttle misc no_instruction not_selected selected"
    reasons+=" short_scoreboard sleeping tex_throttle wait"
    local metrics=""
    for r in $reasons; do metrics+="${metrics:+,}smsp__average_warps_issue_stalled_${r}_per_issue_active.ratio"; done
    timeout 120 ncu --clock-control none --kernel-name "regex:${NCU_KERNEL:-qtip_mma}" --launch-skip "${NCU_SKIP:-2}" --launch-count 1 \
      --metrics "$metrics" python3 scripts/profile_kernels.py --m ${NCU_M:-11008} --n ${NCU_N:-4096} --batch "$batch" 2>&1 \
      | tee "$raw/ncu_stalls_b$batch.log" | grep "stalled" | sort -k3 -g -r | head -8
    # Per-pipe utilisation (is the decode ALU- or FMA-pipe bound, the tensor
    # pipe busy?): every pipe metric this ncu knows for the chip, so no name
    # of ours can fail the run.
    local pipes
    pipes=$(ncu --query-metrics --chip "${NCU_CHIP:-gh100}" 2>/dev/null | awk '{print $1}' \
      | grep -E '^sm__(pipe_[a-z0-9_]+_cycles_active|inst_executed_pipe_[a-z0-9_]+)$' \
      | sed 's/$/.avg.pct_of_peak_sustained_active/' | paste -sd, -)
    [ -n "$pipes" ] && timeout 120 ncu --clock-control none --kernel-name "regex:${NCU_KERNEL:-qtip_mma}" \
      --launch-skip "${NCU_SKIP:-2}" --launch-count 1 --metrics "$pipes" \
      python3 scripts/profile_kernels.py --m ${NCU_M:-11008} --n ${NCU_N:-4096} --batch "$batch" 2>&1 \
      | tee "$raw/ncu_pipes_b$batch.log" | grep -E "^ +sm__" | sort -k3 -g -r | head -24
  done
  tar czf "$OUT/ncu${NCU_TAG:+_$NCU_TAG}.tgz" -C "$OUT" ncu && rm -rf "$raw"
}

# Where a kernel's warps wait, instruction by instruction: for each
# KERNEL:MxN:ROWS[:DENSE_MIN_ROWS] in NCU_SOURCE, one launch of the regex
# KERNEL with PC sampling (SourceCounters), its SASS with the samples and
# stall reasons per instruction as CSV, and the hottest instructions printed
# (scripts/ncu_source_top.py). DENSE_MIN_ROWS routes a row count to the
# prefill GEMM that the fused GEMM would take.
step_ncu_source() {
  local raw=$OUT/ncu_source
  mkdir -p "$raw"
  for spec in ${NCU_SOURCE:-qtip_prefill:4096x4096:64:32}; do
    IFS=: read -r kernel shape rows dense <<< "$spec"
    local tag=${kernel}_${shape}_b$rows
    timeout 180 ncu --clock-control none --kernel-name "regex:$kernel" --launch-skip "${NCU_SKIP:-2}" --launch-count 1 \
      --section SourceCounters --section WarpStateStats --section SpeedOfLight --import-source no \
      -o "$raw/$tag" python3 scripts/profile_kernels.py --m "${shape%x*}" --n "${shape#*x}" --batch "$rows" \
      --K "${NCU_SOURCE_K:-2}" ${dense:+--dense-min-rows "$dense"} > "$raw/$tag.log" 2>&1
    ncu -i "$raw/$tag.ncu-rep" --print-units base > "$raw/$tag.txt" 2>&1
    ncu -i "$raw/$tag.ncu-rep" --page source --csv --print-source sass > "$raw/$tag.csv" 2>&1
    echo "--- $spec"
    grep -E "Duration|Warp Cycles Per Issued|Compute \(SM\) Throughput" "$raw/$tag.txt" | head -4
    python3 scripts/ncu_source_top.py "$raw/$tag.csv" --top "${NCU_SOURCE_TOP:-30}" \
      --listing "$raw/${tag}_listing.txt" | tee "$raw/${tag}_top.txt"
  done
  tar czf "$OUT/ncu_source.tgz" -C "$OUT" ncu_source && rm -rf "$raw"
}

# The quantizer's scale benchmark (issue 14): torch, triton, safetensors,
# numpy, transformers and tqdm are on the host; the H_K table comes through
# the compressed_tensors stand-in. Finished rows of the committed JSON are
# kept; it stops itself before the 600 s call limit (QUANT_ARGS adds options).
step_quantize() {
  write_shims
  HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TQDM_MININTERVAL=10 \
    python3 scripts/qtip_quant/bench_scale.py --json "$OUT/quantize_scale_h200.json" \
    --merge benchmarks/quantize_scale_h200.json --deadline-s "${QUANT_DEADLINE_S:-540}" \
    ${QUANT_ARGS:-} 2> "$OUT/bench_scale.log" | tail -30
}

# The tree's kernels as torch.ops._qtip_C_base (a renamed copy of the
# sources), to load beside a variant's _qtip_C in scripts/ab_kernels.py.
# Both libraries are loaded RTLD_LOCAL, so each binds its own functions and
# kernels, except GNU "unique" objects (inline variables, static locals of
# inline functions), which bind to the first library's copy: only vLLM's
# header-only caches and thrust / libstdc++ internals may be such, never
# state of our own (e.g. the launchers' per-kernel DeviceFlags).
step_ab_base() {
  local src=$QK-ab-src bindings=csrc/libtorch_stable/quantization/qtip/torch_bindings.cpp
  rm -rf "$src" && mkdir -p "$src/scripts" "$src/vllm_overlay"
  cp -r CMakeLists.txt csrc "$src/" && cp -r vllm_overlay/cmake "$src/vllm_overlay/" &&
    cp scripts/build_qtip_ext.sh "$src/scripts/"
  sed -i -E 's/^(STABLE_TORCH_LIBRARY(_IMPL)?)\(_qtip_C,/\1(_qtip_C_base,/' "$src/$bindings"
  [ "$(grep -c '(_qtip_C_base,' "$src/$bindings")" = 2 ] || { echo "ab_base: namespace not renamed"; return 1; }
  local t0=$SECONDS
  TORCH_CUDA_ARCH_LIST=9.0 bash "$src/scripts/build_qtip_ext.sh" python3 "$REPO/.gpu/vllm-src" "$QK-ab" \
    "$QK-ab-build" > "$OUT/build_ab_base.log" 2>&1 || { tail -30 "$OUT/build_ab_base.log"; return 1; }
  local unique
  unique=$(nm -DC --defined-only "$QK-ab/vllm/_qtip_C.abi3.so" | awk '$2 == "u"' |
    grep -v -E ' (guard variable for )?(device_flags|device_properties|vectors_init_flag)$|thrust|cuda::std|std::' ||
    true)
  [ -z "$unique" ] || { echo "ab_base: state shared across the two libraries:"; echo "$unique"; return 1; }
  echo "_qtip_C_base built in $((SECONDS - t0)) s"
}

# Each variant's logs go to $OUT/variants.tgz (a device call returns at most
# 8 files); the benchmark tables are also printed. With AB=1 only the op is
# timed (scripts/ab_kernels.py): a patch that changes vllm/_qtip_ops.py or the
# op schema is not measured as it would run in vLLM.
step_variants() {
  local base=$OUT names=()
  for patch in ${VARIANTS:-.gpu/exp/*.patch}; do
    local name
    name=$(basename "$patch" .patch)
    names+=("$name")
    echo "--- variant $name"
    mkdir -p "$base/$name"
    patch -p1 --forward < "$patch" > "$base/$name/patch.log" || { cat "$base/$name/patch.log"; continue; }
    # A failed build must not leave the previous library to be measured.
    rm -f "$QK"/vllm/_qtip_C*.so
    OUT=$base/$name step_build || { patch -p1 -R < "$patch" > /dev/null; continue; }
    OUT=$base/$name step_tests
    if [ "${AB:-0}" = 1 ]; then
      ! grep -q -E '^\+\+\+ .*(_qtip_ops\.py|torch_bindings\.cpp)' "$patch" ||
        echo "note: $name changes _qtip_ops.py or the op schema; AB times the op alone"
      # Interleaved with the tree's own kernels in one process (ab_base).
      timeout "${BENCH_TIMEOUT:-300}" python3 scripts/ab_kernels.py "$QK-ab/vllm/_qtip_C.abi3.so" \
        "$base/$name/ab.json" ${AB_ARGS:-} 2>&1 | tee "$base/$name/compare.log" | tail -40
    else
      cp "$base/decode_ceiling.log" "$base/$name/" 2>/dev/null
      OUT=$base/$name step_bench | grep "^|" | head -60
      # Against the baseline of this call, raw and against the fp16 GEMM
      # timed next to each layer (the GPU drifts within a call).
      [ -f "$base/kernels_h200.json" ] && python3 scripts/compare_kernels.py \
        "$base/kernels_h200.json" "$base/$name/kernels_h200.json" | tee "$base/$name/compare.log"
    fi
    patch -p1 -R < "$patch" > /dev/null
  done
  [ ${#names[@]} -gt 0 ] && tar czf "$base/variants.tgz" -C "$base" "${names[@]}" &&
    (cd "$base" && rm -rf "${names[@]}")
  # Back to the tree's own kernels, unless the call ends here
  # (VARIANTS_RESTORE=0 saves that build's ~60 s of device time).
  [ "${VARIANTS_RESTORE:-1}" = 0 ] || OUT=$base step_build
}

# On a warm host the CMake build directory of an earlier call is reused, but
# this call's copy of the tree carries the checkout's modification times,
# older than the objects an earlier call built from a patched source: CMake
# would keep them (a variant was once measured on the previous variant's
# GEMM). Newer times on every source make the call's first build a full one;
# the patches applied and reverted within the call then date themselves.
if [ -d "$QK-build" ]; then
  find csrc vllm_overlay/cmake CMakeLists.txt -type f -exec touch {} +
fi

# Every step but a bare build needs .gpu/ref (the H_K factors, goldens):
# without it the tests and benchmarks stop at the first H_K factor, after the
# builds have spent the call's time.
if [ "$*" != build ] && [ ! -f .gpu/ref/hadamards.safetensors ]; then
  echo "error: .gpu/ref/hadamards.safetensors is missing: carry .gpu/ref" >&2
  exit 1
fi
for step in "$@"; do
  echo "=== $step ==="
  "step_$step" || echo "step $step failed"
done
