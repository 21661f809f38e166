// SPDX-License-Identifier: Apache-2.0
// SPDX-FileCopyrightText: Copyright contributors to the vLLM project
//
// Device helpers of the QTIP Hadamard-transform kernels: 8-value loads and
// stores, and the Sylvester (power-of-two Hadamard) stages in registers, warp
// shuffles and shared memory.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace vllm {
namespace qtip {
namespace kernels {

// Sylvester stages done in registers and warp shuffles (0-2 and 3-5).
constexpr int kShflStages = 6;

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

// Stages from_bit .. to_bit - 1 over shared memory in radix-8 passes (one
// barrier each), for values already in X.
__device__ __forceinline__ void smem_stages(float* X, int b, int from_bit,
                                            int to_bit) {
  for (int bit = from_bit; bit < to_bit; bit += 3) {
    const int r = min(3, to_bit - bit);
    if (r == 3)
      smem_pass<8>(X, b, bit);
    else if (r == 2)
      smem_pass<4>(X, b, bit);
    else
      smem_pass<2>(X, b, bit);
    __syncthreads();
  }
}

// Stages 0 .. shfl_stages - 1 of 8 consecutive values per lane: 0-2 in
// registers, then across the lanes of a warp (the partner values sit in lane
// ^ 1, 2, 4: a shared-memory pass at those strides hits each bank four
// times). For stage 3 + log2(h8) this lane holds the upper half of its pairs
// when bit h8 of its group index (= of the lane) is set. Every lane of the
// warp must take part.
__device__ __forceinline__ void register_stages(float (&v)[8], int lane,
                                                int shfl_stages) {
  butterflies<8>(v);
  for (int h8 = 1; h8 < (1 << (shfl_stages - 3)); h8 <<= 1) {
    const bool upper = (lane & h8) != 0;
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const float other = __shfl_xor_sync(0xffffffffu, v[i], h8);
      v[i] = upper ? other - v[i] : v[i] + other;
    }
  }
}

// Group g (8 values) of X times mult (and out_scale from column col0 on),
// stored to the output row (y: the row's first element).
template <typename OutT>
__device__ __forceinline__ void store_group8(
    const float* X, int g, float mult, const float* __restrict__ out_scale,
    int col0, OutT* __restrict__ y) {
  float v[8];
#pragma unroll
  for (int i = 0; i < 8; ++i) v[i] = X[g * 8 + i] * mult;
  if (out_scale != nullptr) {
    float s[8];
    load8(out_scale + col0 + g * 8, s);
#pragma unroll
    for (int i = 0; i < 8; ++i) v[i] *= s[i];
  }
  store8(y + col0 + g * 8, v);
}

// Group g's 8 loaded values through stages 0 .. shfl_stages - 1
// (register_stages: every lane of the warp takes part) into X (valid lanes).
__device__ __forceinline__ void stage_group8(float (&v)[8], float* X, int g,
                                             int lane, int shfl_stages,
                                             bool valid) {
  register_stages(v, lane, shfl_stages);
  if (valid) {
    reinterpret_cast<float4*>(X + g * 8)[0] =
        make_float4(v[0], v[1], v[2], v[3]);
    reinterpret_cast<float4*>(X + g * 8)[1] =
        make_float4(v[4], v[5], v[6], v[7]);
  }
}

// The b values of x from its start (b a multiple of 2^log2P; x and in_scale
// point at the first; split-K partials added in split order, kLoads in
// flight since one CTA may pull a whole row's), scaled by in_scale, through
// Sylvester stages 0 .. log2P - 1 (each 2^log2P-long run on its own), into X.
// The loop is warp-uniform so that every lane takes part in the shuffles; lanes
// past the end only shuffle (their partners are past the end too: whole runs).
// Ends with a barrier.
template <int kLoads, typename InT>
__device__ __forceinline__ void load_sylvester(
    const InT* __restrict__ x, int in_splits, int64_t split_stride,
    const float* __restrict__ in_scale, float* X, int b, int log2P) {
  const int lane = threadIdx.x & 31;
  const int groups = b / 8;
  const int shfl_stages = min(log2P, kShflStages);
  for (int g = threadIdx.x; g - lane < groups; g += blockDim.x) {
    const bool valid = g < groups;
    float v[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    if (valid) load8(x + g * 8, v);
    if constexpr (sizeof(InT) == 4) {
      for (int sp0 = 1; valid && sp0 < in_splits; sp0 += kLoads) {
        float p[kLoads][8];
#pragma unroll
        for (int q = 0; q < kLoads; ++q)
          if (sp0 + q < in_splits)
            load8(x + (sp0 + q) * split_stride + g * 8, p[q]);
#pragma unroll
        for (int q = 0; q < kLoads; ++q)
          if (sp0 + q < in_splits)
#pragma unroll
            for (int i = 0; i < 8; ++i) v[i] += p[q][i];
      }
    }
    if (in_scale != nullptr && valid) {
      float s[8];
      load8(in_scale + g * 8, s);
#pragma unroll
      for (int i = 0; i < 8; ++i) v[i] *= s[i];
    }
    stage_group8(v, X, g, lane, shfl_stages, valid);
  }
  __syncthreads();
  smem_stages(X, b, shfl_stages, log2P);
}

}  // namespace kernels
}  // namespace qtip
}  // namespace vllm
