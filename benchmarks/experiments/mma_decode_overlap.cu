// SPDX-License-Identifier: Apache-2.0
// SPDX-FileCopyrightText: Copyright contributors to the vLLM project
//
// What one Hopper SM does with the two halves of qtip_mma_kernel's main loop,
// alone and together (issue 11: is 16-128 rows bound by the tensor pipe of
// mma.sync, by the decode, or by how the two share a warp scheduler?):
//   mma:   mma.sync m16n8k16 (fp16 in, fp32 accumulate), `chains` independent
//          accumulators per warp (the kernel's 2 x NB tiles x 2 k-tiles);
//   lut:   the K = 2 decode of one 32x32 block per iteration (16 independent
//          lookups per lane in a 32-copy LUT of 128 KiB, state -> s * s + s ->
//          address, as SignedLut<32>::lookup), nothing else;
//   mixed: per iteration one block decoded into four A fragments, then
//          4 * nb HMMAs with them (the kernel's step() without the trellis and
//          x~ loads: nb = 1 is batch <= 8, nb = 8 is 64 rows per pass).
// One CTA of `warps` warps per SM (128 KiB LUT, as the kernel), clock64 per
// CTA. Prints per-SM rates per cycle and the wall-clock rate.
//   nvcc -O3 -arch=sm_90 -o mma_decode_overlap mma_decode_overlap.cu
#include <cstdint>
#include <cstdio>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

// The kernels' own LUT lookup, K = 2 block decode and mma.sync helpers.
#include "../../csrc/libtorch_stable/quantization/qtip/qtip_codebook.cuh"

using vllm::qtip::decode_block;
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

// kMode 0: mma only, 1: lut only, 2: mixed. NB: n8 tiles (HMMAs per
// iteration = 4 * NB).
template <int kMode, int NB, int kWarps>
__global__ void __launch_bounds__(kWarps * 32, 1)
    bench(int iters, float* sink, long long* cycles) {
  extern __shared__ __align__(128) char lut[];
  const int tid = threadIdx.x, lane = tid & 31;
  for (int i = tid; i < kLutBytes / 4; i += blockDim.x)
    reinterpret_cast<uint32_t*>(lut)[i] = 0x3c003c00u ^ (i * 0x9e3779b9u);
  __syncthreads();
  const uint32_t lane_term = vllm::qtip::SignedLut<32>::lane_term(lane);
  uint32_t w0 = tid * 0x01000193u + 7, w1 = tid * 0x811c9dc5u + 3;
  uint32_t frag[4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) frag[i][j] = 0x3c003c00u ^ (tid * (i + j + 1));
  uint32_t b[NB][2];
#pragma unroll
  for (int nb = 0; nb < NB; ++nb) {
    b[nb][0] = 0x3c003c00u ^ (tid + nb);
    b[nb][1] = 0x3c003c00u ^ (tid * 3 + nb);
  }
  float acc[2][NB][4] = {};
  uint32_t mix = 0;
  __syncthreads();
  const long long t0 = clock64();
  for (int it = 0; it < iters; ++it) {
    if constexpr (kMode != 0) {
      const uint32_t w[2] = {w0, w1};
      decode_block<2, 32>(w, lut, lane_term, lane, frag);
      // The next "trellis words" depend on this block's values, as the
      // kernel's ring refills do not, but cheaply (two ops per block).
      w0 += frag[0][0] ^ frag[3][3];
      w1 ^= frag[1][2] + (uint32_t)it;
    }
    if constexpr (kMode == 1) {
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) mix ^= frag[i][j];
    } else {
#pragma unroll
      for (int nb = 0; nb < NB; ++nb) {
        mma_16816(acc[0][nb], frag[0], b[nb][0], b[nb][1]);
        mma_16816(acc[1][nb], frag[1], b[nb][0], b[nb][1]);
      }
#pragma unroll
      for (int nb = 0; nb < NB; ++nb) {
        mma_16816(acc[0][nb], frag[2], b[nb][0] ^ 1, b[nb][1]);
        mma_16816(acc[1][nb], frag[3], b[nb][0], b[nb][1] ^ 1);
      }
    }
  }
  const long long t1 = clock64();
  __syncthreads();
  float s = __uint_as_float(mix & 0x3fffffffu) * 1e-30f;
#pragma unroll
  for (int mr = 0; mr < 2; ++mr)
#pragma unroll
    for (int nb = 0; nb < NB; ++nb)
#pragma unroll
      for (int i = 0; i < 4; ++i) s += acc[mr][nb][i];
  sink[blockIdx.x * blockDim.x + tid] = s;
  if (tid == 0) cycles[blockIdx.x] = t1 - t0;
}

template <int kMode, int NB, int warps>
int run(const char* name, int sms, int iters, float* sink, long long* cycles,
        long long* host_cycles) {
  auto k = bench<kMode, NB, warps>;
  CHECK(cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             kLutBytes));
  cudaEvent_t e0, e1;
  cudaEventCreate(&e0);
  cudaEventCreate(&e1);
  k<<<sms, warps * 32, kLutBytes>>>(iters / 8, sink, cycles);  // warm-up
  CHECK(cudaGetLastError());
  cudaEventRecord(e0);
  k<<<sms, warps * 32, kLutBytes>>>(iters, sink, cycles);
  cudaEventRecord(e1);
  CHECK(cudaEventSynchronize(e1));
  float ms = 0;
  cudaEventElapsedTime(&ms, e0, e1);
  CHECK(cudaMemcpy(host_cycles, cycles, sms * sizeof(long long),
                   cudaMemcpyDeviceToHost));
  long long cmax = 0;
  for (int i = 0; i < sms; ++i)
    cmax = host_cycles[i] > cmax ? host_cycles[i] : cmax;
  const double warp_iters = (double)warps * iters;  // per SM
  const double hmma = kMode == 1 ? 0 : warp_iters * 4 * NB;
  const double weights = kMode == 0 ? 0 : warp_iters * 1024;
  // Per SM per cycle: FMAs (m16n8k16 = 2048) and decoded weights.
  printf(
      "%-6s nb=%d warps=%2d  %8.1f us  %7.1f FMA/clk/SM  %6.2f weights/clk/SM"
      "  %7.1f TFLOPS  %6.2f T weights/s  %5.2f cycles/iter/warp\n",
      name, NB, warps, ms * 1e3, hmma * 2048 / cmax, weights / cmax,
      hmma * 2048 * 2 * sms / (ms * 1e-3) / 1e12,
      weights * sms / (ms * 1e-3) / 1e12, (double)cmax / iters);
  return 0;
}

template <int W>
void run_all(int sms, int it, float* sink, long long* cycles,
             long long* host_cycles) {
  run<0, 1, W>("mma", sms, it, sink, cycles, host_cycles);
  run<0, 2, W>("mma", sms, it, sink, cycles, host_cycles);
  run<1, 1, W>("lut", sms, it, sink, cycles, host_cycles);
  run<2, 1, W>("mixed", sms, it, sink, cycles, host_cycles);
  run<2, 2, W>("mixed", sms, it, sink, cycles, host_cycles);
  if constexpr (W <= 16) {
    run<0, 8, W>("mma", sms, it, sink, cycles, host_cycles);
    run<2, 4, W>("mixed", sms, it, sink, cycles, host_cycles);
    run<2, 8, W>("mixed", sms, it, sink, cycles, host_cycles);
  }
}

int main() {
  cudaDeviceProp prop;
  CHECK(cudaGetDeviceProperties(&prop, 0));
  const int sms = prop.multiProcessorCount;
  printf("%s, %d SMs\n", prop.name, sms);
  float* sink;
  long long* cycles;
  CHECK(cudaMalloc(&sink, sms * 1024 * sizeof(float)));
  CHECK(cudaMalloc(&cycles, sms * sizeof(long long)));
  long long host_cycles[1024];
  const int it = 4096;
  // 16 warps is qtip_mma_kernel's CTA (128 registers); 32 warps leave 64
  // registers, too few for the nb = 4 and 8 accumulators.
  run_all<8>(sms, it, sink, cycles, host_cycles);
  run_all<16>(sms, it, sink, cycles, host_cycles);
  run_all<32>(sms, it, sink, cycles, host_cycles);
  return 0;
}
