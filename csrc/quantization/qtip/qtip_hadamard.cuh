// SPDX-License-Identifier: Apache-2.0
// SPDX-FileCopyrightText: Copyright contributors to the vLLM project
//
// Device helpers of the Sylvester (power-of-two) Hadamard transform in fp32,
// shared by qtip_hadamard_kernel and the GEMM's fused input transform.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace vllm {
namespace qtip {
namespace kernels {

__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) {
  return __bfloat162float(v);
}
__device__ __forceinline__ float to_float(float v) { return v; }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ __half from_float<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}
template <>
__device__ __forceinline__ float from_float<float>(float v) {
  return v;
}

// 8 consecutive elements (16 or 32 bytes, aligned).
template <typename T>
__device__ __forceinline__ void load8(const T* p, float (&v)[8]) {
  if constexpr (sizeof(T) == 4) {
    const float4 a = reinterpret_cast<const float4*>(p)[0];
    const float4 b = reinterpret_cast<const float4*>(p)[1];
    v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w;
    v[4] = b.x, v[5] = b.y, v[6] = b.z, v[7] = b.w;
  } else {
    const uint4 u = *reinterpret_cast<const uint4*>(p);
    const T* h = reinterpret_cast<const T*>(&u);
#pragma unroll
    for (int i = 0; i < 8; ++i) v[i] = to_float(h[i]);
  }
}

template <typename T>
__device__ __forceinline__ void store8(T* p, const float (&v)[8]) {
  if constexpr (sizeof(T) == 4) {
    reinterpret_cast<float4*>(p)[0] = make_float4(v[0], v[1], v[2], v[3]);
    reinterpret_cast<float4*>(p)[1] = make_float4(v[4], v[5], v[6], v[7]);
  } else {
    uint4 u;
    T* h = reinterpret_cast<T*>(&u);
#pragma unroll
    for (int i = 0; i < 8; ++i) h[i] = from_float<T>(v[i]);
    *reinterpret_cast<uint4*>(p) = u;
  }
}

template <int R>
__device__ __forceinline__ void butterflies(float* v) {
#pragma unroll
  for (int h = 1; h < R; h <<= 1)
#pragma unroll
    for (int i = 0; i < R; ++i)
      if (!(i & h)) {
        const float a = v[i], c = v[i + h];
        v[i] = a + c;
        v[i + h] = a - c;
      }
}

// Stages bit .. bit+log2(R)-1 of the Sylvester transform over shared memory.
template <int R>
__device__ __forceinline__ void smem_pass(float* X, int b, int bit) {
  constexpr int r = R == 8 ? 3 : R == 4 ? 2 : 1;
  const int h = 1 << bit;
  for (int gid = threadIdx.x; gid < (b >> r); gid += blockDim.x) {
    const int base = ((gid >> bit) << (bit + r)) | (gid & (h - 1));
    float v[R];
#pragma unroll
    for (int j = 0; j < R; ++j) v[j] = X[base + j * h];
    butterflies<R>(v);
#pragma unroll
    for (int j = 0; j < R; ++j) X[base + j * h] = v[j];
  }
}

// Stages 3 .. log2P-1 of the Sylvester transform over the len values in X
// (len a multiple of 2^log2P, so blocks of 2^log2P are transformed
// independently); stages 0..2 were done in registers as the values were
// loaded. One barrier per pass, the last one included.
__device__ __forceinline__ void sylvester_smem_stages(float* X, int len,
                                                      int log2P) {
  for (int bit = 3; bit < log2P; bit += 3) {
    const int r = min(3, log2P - bit);
    if (r == 3)
      smem_pass<8>(X, len, bit);
    else if (r == 2)
      smem_pass<4>(X, len, bit);
    else
      smem_pass<2>(X, len, bit);
    __syncthreads();
  }
}

}  // namespace kernels
}  // namespace qtip
}  // namespace vllm
