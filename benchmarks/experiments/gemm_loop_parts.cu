// SPDX-License-Identifier: Apache-2.0
// SPDX-FileCopyrightText: Copyright contributors to the vLLM project
//
// qtip_mma_kernel's main loop rebuilt part by part (issue 11, NOTES.md
// "Eighteenth session"): mma_decode_overlap.cu found the 16-row GEMM at 52% of
// the rate of its decode + MMA mix alone; this adds, one at a time and all
// together, what that mix leaves out, to see which part costs the rest:
//   loads: trellis words from global memory (ld.global.cs, 8 bytes per lane per
//          32x32 block, a ring of 8 blocks at nb = 1 and 4 otherwise, each
//          warp streaming its own contiguous blocks, as a row tile's k range);
//   ldsm:  B fragments by ldmatrix.x4 from the x~ staging layout (one per n8
//          tile per block) instead of fixed registers;
//   stage: x~ staged by cp.async per chunk of 16 blocks, double-buffered, with
//          the kernel's two barriers per chunk.
// One CTA of 16 warps per SM with the 128 KiB LUT, K = 2, clock64 per CTA;
// cycles per 32x32 block per warp over 1024 blocks (the loop's steady state;
// BENCHMARKS.md "fifteenth run"), then at one call's run length (32 and 64
// blocks per warp; 14336x4096 gives a warp 32) as the loop alone and as the
// whole CTA (ring loads, LUT fill, loop, the epilogue's partial-sum stores), to
// size the per-call fixed part the kernel pays at 1-16 rows (BENCHMARKS.md
// "sixteenth run").
//   nvcc -O3 -arch=sm_90 -o gemm_loop_parts gemm_loop_parts.cu
#include <cstdint>
#include <cstdio>
#include <cuda_runtime.h>

// The kernels' own LUT lookup, K = 2 block decode and mma.sync helpers.
#include "../../csrc/libtorch_stable/quantization/qtip/qtip_codebook.cuh"

using vllm::qtip::decode_block;
using vllm::qtip::load_lane;
using vllm::qtip::mma_16816;

#define CHECK(x)                                                       \
  do {                                                                 \
    cudaError_t e = (x);                                               \
    if (e != cudaSuccess) {                                            \
      printf("%s:%d %s\n", __FILE__, __LINE__, cudaGetErrorString(e)); \
      return 1;                                                        \
    }                                                                  \
  } while (0)

constexpr int kLutBytes = vllm::qtip::SignedLut<32>::kBytes;  // 128 KiB
constexpr int kWarps = 16;
constexpr int kThreads = kWarps * 32;
// Blocks per staged chunk (two buffers beside the LUT fit 227 KiB).
__host__ __device__ constexpr int chunk_blocks(int nb) {
  return nb == 8 ? 8 : 16;
}
constexpr int kLoads = 1, kLdsm = 2, kStage = 4;
static double prop_clock_khz = 1.98e6;  // the SM clock (device properties)

__device__ __forceinline__ void ldmatrix_x4(uint32_t addr, uint32_t (&r)[4]) {
  asm volatile(
      "ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
      : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
      : "r"(addr));
}
__device__ __forceinline__ void cp_async16(uint32_t smem, const void* gmem) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(smem),
               "l"(gmem));
}
// The kernel's staging layout (qtip_gemm.cu: stage_offset).
__device__ __forceinline__ int stage_offset(int r, int p) {
  return r * 64 + ((p ^ (r >> 1)) & 3) * 16;
}

// trellis: per warp `iters` blocks of 32 lanes x 8 bytes; xt: 8 * NB rows of
// iters * 4 16-byte vectors (x~ of the k range, L2-resident as in the kernel).
template <int kParts, int NB>
__global__ void __launch_bounds__(kThreads, 1)
    bench(const uint2* __restrict__ trellis, const uint4* __restrict__ xt,
          int iters, int whole, float* part, long long* cycles) {
  extern __shared__ __align__(128) char smem[];
  char* lut = smem;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  // whole: the clock covers one call's CTA as the kernel runs it (ring
  // loads, LUT fill, the loop, the partial-sum stores), else the loop alone.
  const long long t_entry = clock64();
  constexpr int kChunk = NB == 8 ? 8 : 16;  // chunk_blocks(NB)
  constexpr int kBlockBytes = NB * 512 + 16;
  constexpr int kBufBytes = kChunk * kBlockBytes;
  const uint32_t stage_addr =
      static_cast<uint32_t>(__cvta_generic_to_shared(smem + kLutBytes));
  const uint32_t lane_offset = stage_offset(lane & 7, lane >> 3);
  const uint32_t lane_term = vllm::qtip::SignedLut<32>::lane_term(lane);
  const uint2* wp =
      trellis + ((size_t)(blockIdx.x * kWarps + warp) * iters) * 32 + lane;
  constexpr int kRing = NB == 1 ? 8 : 4;
  uint32_t w[kRing][2];
#pragma unroll
  for (int st = 0; st < kRing; ++st) {
    if constexpr (kParts & kLoads) {
      load_lane<2>(reinterpret_cast<const uint8_t*>(wp + st * 32), w[st]);
    } else {
      w[st][0] = tid * 0x01000193u + st;
      w[st][1] = tid * 0x811c9dc5u + st;
    }
  }
  for (int i = tid; i < kLutBytes / 4; i += kThreads)
    reinterpret_cast<uint32_t*>(lut)[i] = 0x3c003c00u ^ (i * 0x9e3779b9u);
  uint32_t bfix[NB][2];  // B in registers when not loaded (k-tiles share it)
#pragma unroll
  for (int nb = 0; nb < NB; ++nb)
#pragma unroll
    for (int j = 0; j < 2; ++j) bfix[nb][j] = 0x3c003c00u ^ (tid + nb + j);
  float acc[2][NB][4] = {};
  const int row_vecs = iters * 4;
  auto stage_chunk = [&](int c) {
    const uint32_t base = stage_addr + (c & 1) * kBufBytes;
    constexpr int kVecs = kChunk * 4;
    for (int i = tid; i < 8 * NB * kVecs; i += kThreads) {
      const int row = i / kVecs, v = i % kVecs;
      cp_async16(base + (v >> 2) * kBlockBytes + stage_offset(row, v),
                 xt + (size_t)row * row_vecs + c * kVecs + v);
    }
  };
  __syncthreads();
  const long long t0 = whole ? t_entry : clock64();
  const int nchunks = iters / kChunk;
  if constexpr (kParts & kStage) {
    stage_chunk(0);
    asm volatile("cp.async.commit_group;");
  }
  for (int c = 0; c < nchunks; ++c) {
    if constexpr (kParts & kStage) {
      if (c + 1 < nchunks) stage_chunk(c + 1);
      asm volatile("cp.async.commit_group;");
      asm volatile("cp.async.wait_group 1;" ::: "memory");
      __syncthreads();
    }
    const uint32_t buf = stage_addr + (c & 1) * kBufBytes + lane_offset;
    for (int base = 0; base < kChunk; base += kRing) {
#pragma unroll
      for (int st = 0; st < kRing; ++st) {
        const int i = c * kChunk + base + st;
        uint32_t frag[4][4];
        decode_block<2, 32>(w[st], lut, lane_term, lane, frag);
        if constexpr (kParts & kLoads) {
          if (i + kRing < iters)
            load_lane<2>(
                reinterpret_cast<const uint8_t*>(wp + (i + kRing) * 32), w[st]);
        } else {
          w[st][0] += 0x9e3779b9u;
          w[st][1] ^= (uint32_t)i;
        }
        uint32_t b[NB][4];
#pragma unroll
        for (int nb = 0; nb < NB; ++nb) {
          if constexpr (kParts & kLdsm) {
            ldmatrix_x4(buf + (base + st) * kBlockBytes + nb * 512, b[nb]);
          } else {
#pragma unroll
            for (int j = 0; j < 4; ++j) b[nb][j] = bfix[nb][j & 1];
          }
        }
#pragma unroll
        for (int nb = 0; nb < NB; ++nb) {
          mma_16816(acc[0][nb], frag[0], b[nb][0], b[nb][1]);
          mma_16816(acc[1][nb], frag[1], b[nb][0], b[nb][1]);
        }
#pragma unroll
        for (int nb = 0; nb < NB; ++nb) {
          mma_16816(acc[0][nb], frag[2], b[nb][2], b[nb][3]);
          mma_16816(acc[1][nb], frag[3], b[nb][2], b[nb][3]);
        }
      }
    }
    if constexpr (kParts & kStage) __syncthreads();
  }
  long long t1 = clock64();
  // The kernel's epilogue: each lane's C fragments to a (rows, m) slice,
  // m = 14336 (4-byte stores, rows m apart).
  constexpr int kM = 14336;
  const int g = lane >> 2, q = lane & 3;
  float* dst = part + (size_t)(blockIdx.x * kWarps + warp) % (kM / 32) * 32 +
               (size_t)(2 * q) * kM + g;
#pragma unroll
  for (int mr = 0; mr < 2; ++mr)
#pragma unroll
    for (int nb = 0; nb < NB; ++nb)
#pragma unroll
      for (int i = 0; i < 4; ++i)
        dst[(size_t)(nb * 8 + (i & 1)) * kM + mr * 16 + 8 * (i >> 1)] =
            acc[mr][nb][i];
  if (whole) {
    __syncthreads();
    t1 = clock64();
  }
  if (tid == 0) cycles[blockIdx.x] = t1 - t0;
}

template <int kParts, int NB>
int run(int sms, int iters, int whole, const uint2* trellis, const uint4* xt,
        float* part, long long* cycles, long long* host_cycles) {
  auto k = bench<kParts, NB>;
  const int smem = kLutBytes + 2 * chunk_blocks(NB) * (NB * 512 + 16);
  CHECK(cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             smem));
  cudaEvent_t e0, e1;
  cudaEventCreate(&e0);
  cudaEventCreate(&e1);
  k<<<sms, kThreads, smem>>>(trellis, xt, iters, whole, part,
                             cycles);  // warm-up
  CHECK(cudaGetLastError());
  cudaEventRecord(e0);
  k<<<sms, kThreads, smem>>>(trellis, xt, iters, whole, part, cycles);
  cudaEventRecord(e1);
  CHECK(cudaEventSynchronize(e1));
  float ms = 0;
  cudaEventElapsedTime(&ms, e0, e1);
  CHECK(cudaMemcpy(host_cycles, cycles, sms * sizeof(long long),
                   cudaMemcpyDeviceToHost));
  long long cmax = 0;
  for (int i = 0; i < sms; ++i)
    cmax = host_cycles[i] > cmax ? host_cycles[i] : cmax;
  const double weights = (double)sms * kWarps * iters * 1024;
  printf(
      "nb=%d %-5s %-4s %-5s %-5s %4d blocks  %8.1f us  %7.1f cycles/block/warp"
      "  %7.2f us per CTA  %5.2f T weights/s\n",
      NB, kParts & kLoads ? "loads" : "-", kParts & kLdsm ? "ldsm" : "-",
      kParts & kStage ? "stage" : "-", whole ? "whole" : "loop", iters,
      ms * 1e3, (double)cmax / iters, cmax / (prop_clock_khz * 1e-3),
      weights / (ms * 1e-3) / 1e12);
  return 0;
}

template <int NB>
void run_parts(int sms, int it, const uint2* tr, const uint4* xt, float* part,
               long long* cycles, long long* hc) {
  run<0, NB>(sms, it, 0, tr, xt, part, cycles, hc);
  run<kLoads, NB>(sms, it, 0, tr, xt, part, cycles, hc);
  run<kLdsm, NB>(sms, it, 0, tr, xt, part, cycles, hc);
  run<kLdsm | kStage, NB>(sms, it, 0, tr, xt, part, cycles, hc);
  run<kLoads | kLdsm | kStage, NB>(sms, it, 0, tr, xt, part, cycles, hc);
}

// One call's run length (a warp of 14336x4096 sees 32 blocks): the loop
// alone, then the whole CTA (ring loads, LUT fill, loop, epilogue).
template <int NB>
void run_short(int sms, const uint2* tr, const uint4* xt, float* part,
               long long* cycles, long long* hc) {
  constexpr int kAll = kLoads | kLdsm | kStage;
  run<kAll, NB>(sms, 32, 0, tr, xt, part, cycles, hc);
  run<kAll, NB>(sms, 32, 1, tr, xt, part, cycles, hc);
  run<kAll, NB>(sms, 64, 1, tr, xt, part, cycles, hc);
}

int main() {
  cudaDeviceProp prop;
  CHECK(cudaGetDeviceProperties(&prop, 0));
  const int sms = prop.multiProcessorCount;
  const int iters = 1024;  // blocks per warp (a 14336x4096 layer has ~27)
  printf("%s, %d SMs, %d warps per SM, %d blocks per warp\n", prop.name, sms,
         kWarps, iters);
  uint2* trellis;
  uint4* xt;
  float* part;
  long long* cycles;
  const size_t tbytes = (size_t)sms * kWarps * iters * 256;
  const size_t xbytes = (size_t)64 * iters * 64;
  CHECK(cudaMalloc(&trellis, tbytes));
  CHECK(cudaMalloc(&xt, xbytes));
  CHECK(cudaMemset(trellis, 0x5a, tbytes));
  CHECK(cudaMemset(xt, 0x3c, xbytes));
  CHECK(cudaMalloc(&part, (size_t)64 * 14336 * sizeof(float)));
  CHECK(cudaMalloc(&cycles, sms * sizeof(long long)));
  long long hc[1024];
  int clock_khz = 0;
  CHECK(cudaDeviceGetAttribute(&clock_khz, cudaDevAttrClockRate, 0));
  prop_clock_khz = clock_khz;
  run_parts<1>(sms, iters, trellis, xt, part, cycles, hc);
  run_parts<2>(sms, iters, trellis, xt, part, cycles, hc);
  run_parts<8>(sms, iters, trellis, xt, part, cycles, hc);
  run_short<1>(sms, trellis, xt, part, cycles, hc);
  run_short<2>(sms, trellis, xt, part, cycles, hc);
  run_short<8>(sms, trellis, xt, part, cycles, hc);
  return 0;
}
