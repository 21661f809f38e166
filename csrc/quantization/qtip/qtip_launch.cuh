// SPDX-License-Identifier: Apache-2.0
// SPDX-FileCopyrightText: Copyright contributors to the vLLM project
//
// Launch helpers shared by the QTIP kernels.
#pragma once

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>

#include <atomic>

namespace vllm {
namespace qtip {

constexpr int kMaxDevices = 64;

// Per-device "already done" flags; each launcher template keeps its own
// (a static local), since kernels of one signature share a function type.
using DeviceFlags = std::atomic<bool>[kMaxDevices];

// Raises a kernel's dynamic shared-memory limit to the device maximum, once
// per kernel and device. cudaFuncSetAttribute is a host-side setting, not a
// stream operation, and the device properties are cached by PyTorch, so this
// costs nothing per call and is legal during CUDA-graph capture.
template <typename Kernel>
void ensure_max_dynamic_smem(Kernel kernel, DeviceFlags& done) {
  const int dev = c10::cuda::current_device();
  if (dev < kMaxDevices && done[dev].load(std::memory_order_relaxed)) return;
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  C10_CUDA_CHECK(cudaFuncSetAttribute(
      kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
      (int)prop->sharedMemPerBlockOptin));
  if (dev < kMaxDevices) done[dev].store(true, std::memory_order_relaxed);
}

}  // namespace qtip
}  // namespace vllm
