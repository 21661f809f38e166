// SPDX-License-Identifier: Apache-2.0
// SPDX-FileCopyrightText: Copyright contributors to the vLLM project
//
// Launch helpers shared by the QTIP kernels.
#pragma once

#include <cuda_runtime.h>

#include <atomic>

#include "qtip_ops.h"

namespace vllm {
namespace qtip {

constexpr int kMaxDevices = 64;

// Shards of one fused layer (q/k/v, gate/up) that run in one launch: their
// trellises back to back, one table and one SU row each.
constexpr int kMaxShards = 8;

// Rows of each shard, in 32-row trellis blocks: shard s owns row blocks
// [rb0[s], rb0[s + 1]). Passed by value (kernel parameter space).
struct ShardRows {
  int count;
  int rb0[kMaxShards + 1];

  __host__ __device__ int shard_of(int row_block) const {
    int s = 0;
    while (s + 1 < count && row_block >= rb0[s + 1]) ++s;
    return s;
  }
};

// Builds ShardRows from the shards' row counts; names the op on bad input.
inline ShardRows make_shard_rows(const std::vector<int64_t>& rows, int64_t m,
                                 const char* op) {
  STD_TORCH_CHECK(!rows.empty() && (int64_t)rows.size() <= kMaxShards, op,
                  ": shard_rows must list 1 to ", kMaxShards,
                  " shard row counts, got ", rows.size());
  ShardRows t{};
  t.count = (int)rows.size();
  int64_t total = 0;
  for (int s = 0; s < t.count; ++s) {
    STD_TORCH_CHECK(rows[s] > 0 && rows[s] % 32 == 0, op, ": shard_rows[", s,
                    "] = ", rows[s], " must be a positive multiple of 32");
    t.rb0[s] = (int)(total / 32);
    total += rows[s];
  }
  t.rb0[t.count] = (int)(total / 32);
  STD_TORCH_CHECK(total == m, op, ": shard_rows ", join(rows), " sum to ",
                  total, ", but the trellis has m = ", m, " rows");
  return t;
}

// Per-device "already done" flags; each launcher template keeps its own
// (a static local), since kernels of one signature share a function type.
using DeviceFlags = std::atomic<bool>[kMaxDevices];

// Raises a kernel's dynamic shared-memory limit to the device maximum less
// its static shared memory (the two together may not pass the opt-in limit),
// once per kernel and device. cudaFuncSetAttribute is a host-side setting,
// not a stream operation, and the device properties are cached
// (get_device_prop), so this costs nothing per call and is legal during
// CUDA-graph capture.
template <typename Kernel>
void ensure_max_dynamic_smem(Kernel kernel, DeviceFlags& done) {
  int dev = 0;
  check_cuda(cudaGetDevice(&dev));
  if (dev < kMaxDevices && done[dev].load(std::memory_order_relaxed)) return;
  const cudaDeviceProp* prop = get_device_prop();
  cudaFuncAttributes attr{};
  check_cuda(cudaFuncGetAttributes(&attr, kernel));
  check_cuda(cudaFuncSetAttribute(
      kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
      (int)(prop->sharedMemPerBlockOptin - attr.sharedSizeBytes)));
  if (dev < kMaxDevices) done[dev].store(true, std::memory_order_relaxed);
}

// Programmatic dependent launch (sm_90+): the three kernels of a QTIP
// linear (input transform, GEMM, output transform) are launched so that each
// may start while its predecessor drains; a kernel does the work that does
// not read its predecessor's output (LUT build, trellis prefetch, index
// math) and then waits in wait_for_producer(). Also kept in CUDA graphs.
__device__ __forceinline__ void wait_for_producer() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__device__ __forceinline__ void allow_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;");
#endif
}

template <typename... KernelArgs, typename... Args>
void launch_dependent(void (*kernel)(KernelArgs...), dim3 grid, dim3 block,
                      size_t smem, cudaStream_t stream, Args&&... args) {
  const cudaDeviceProp* prop = get_device_prop();
  cudaLaunchAttribute attr{};
  attr.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr.val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t config{};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  config.attrs = &attr;
  config.numAttrs = prop->major >= 9 ? 1 : 0;
  check_cuda(
      cudaLaunchKernelEx(&config, kernel, static_cast<KernelArgs>(args)...));
}

}  // namespace qtip
}  // namespace vllm
