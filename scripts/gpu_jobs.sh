#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Runs one job per GPU of a multi-GPU test host at the same time (e.g. the
# kernel A/B on one H200 while the other runs the end-to-end benchmark), each
# with its own CUDA_VISIBLE_DEVICES and its own log folder $OUT/gpu<i>, then
# packs all of $OUT into one archive: a device call brings back at most 8
# files, and each run script packs only its own folder.
#   usage: scripts/gpu_jobs.sh "<job for GPU 0>" "<job for GPU 1>" ...
#   e.g.   scripts/gpu_jobs.sh \
#            'E2E_ARGS="--models llama-2-7b" scripts/gpu_host_run.sh e2e' \
#            'scripts/gpu_kernel_run.sh build tests bench'
# Each job is a bash command line run from the repository root; its output
# goes to $OUT/gpu<i>/run.log. Jobs that need no GPU of their own are not
# this script's business.
set -uo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
OUT=${OUT:-/tmp/qtip-out}
mkdir -p "$OUT"
cd "$REPO"
gpu=0
pids=()
for job in "$@"; do
  dir=$OUT/gpu$gpu
  mkdir -p "$dir"
  CUDA_VISIBLE_DEVICES=$gpu OUT=$dir bash -c "$job" > "$dir/run.log" 2>&1 &
  pids+=($!)
  gpu=$((gpu + 1))
done
status=0
for i in "${!pids[@]}"; do
  wait "${pids[$i]}" || { echo "job on GPU $i exited with $?"; status=1; }
  tail -5 "$OUT/gpu$i/run.log" | sed "s/^/[gpu$i] /"
done
source "$REPO/scripts/gpu_pack_out.sh"  # packs $OUT on exit when > 8 files
exit $status
