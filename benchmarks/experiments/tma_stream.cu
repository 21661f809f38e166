// SPDX-License-Identifier: Apache-2.0
// SPDX-FileCopyrightText: Copyright contributors to the vLLM project
//
// How fast can one SM take in x~ stages, with nothing else to do? The prefill
// GEMM experiments' bare pipeline (QTIP_PF_MODE=3 of prefill-mc.patch) ran at
// ~1,100 cycles per 32 KiB stage per SM on the H200 (~34 B/clk per SM); this
// program streams the same walk without trellis loads or decode, to tell the
// hardware's ceiling from the pipeline's:
//
//   tma   the prefill walk: tiles of `tok` x~ rows, 64 steps of 64 columns per
//         tile (k = 4096), one TMA box per CTA and step, multicast to the
//         `cluster` CTAs that share the tile; 8 consumer warps wait for each
//         stage and release it (remote arrive at CTA scope), `stages` deep.
//   ldg   every SM reads the same bytes with 16-byte loads into registers (the
//         L2 -> SM ceiling without shared memory or barriers).
//
// Build and run on the GPU host (no vLLM, no torch):
//   nvcc -O3 -std=c++17 -gencode arch=compute_90a,code=sm_90a \
//     -o /tmp/tma_stream benchmarks/experiments/tma_stream.cu && /tmp/tma_stream
// Prints one line per configuration: us, bytes taken in per SM per cycle (tma:
// from the CTAs' own clock64; ldg: at the SM clock the device reports), and
// bytes per second from L2.
#include <cuda.h>
#include <cudaTypedefs.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>

#define CHECK(x)                                                          \
  do {                                                                    \
    cudaError_t e_ = (x);                                                 \
    if (e_ != cudaSuccess) {                                              \
      std::fprintf(stderr, "%s:%d %s\n", __FILE__, __LINE__,              \
                   cudaGetErrorString(e_));                               \
      std::exit(1);                                                       \
    }                                                                     \
  } while (0)

constexpr int kCols = 64;        // columns per step: one 128-byte row
constexpr int kK = 4096;         // columns per tile
constexpr int kSteps = kK / kCols;
constexpr int kConsumerWarps = 8;
constexpr int kThreads = 32 * (kConsumerWarps + 1);
constexpr int kMaxStages = 8;

struct Walk {
  CUtensorMap map;  // (rows, kK) fp16, boxes of tok / cluster rows x 64 columns
  int tok, cluster, stages;
  int units;  // W_hat row-tile groups per x~ tile: one per cluster
  int tiles;
};

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
  asm volatile(
      "{\n.reg .pred p;\nW:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n"
      "@!p bra W;\n}\n" ::"r"(bar),
      "r"(parity)
      : "memory");
}

__device__ __forceinline__ void cluster_sync() {
  asm volatile(
      "barrier.cluster.arrive.release.aligned;\n"
      "barrier.cluster.wait.acquire.aligned;" ::: "memory");
}

// tiles = x~ tiles * units; a cluster takes tiles c, c + clusters, ...; each
// of its CTAs loads rows [rank * tok / cluster, ...) of the tile's x~ rows.
__global__ void __launch_bounds__(kThreads, 1)
    tma_walk(const __grid_constant__ Walk w, unsigned long long* cycles) {
  extern __shared__ __align__(1024) char smem_raw[];
  const uint32_t raw = smem_u32(smem_raw);
  const uint32_t base = raw + ((1024u - (raw & 1023u)) & 1023u);
  const uint32_t stage_bytes = w.tok * kCols * 2;
  const uint32_t full = base + w.stages * stage_bytes;
  const uint32_t empty = full + 8 * kMaxStages;
  uint32_t rank;
  asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(rank));
  const int clusters = gridDim.x / w.cluster;
  const int first = blockIdx.x / w.cluster;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (threadIdx.x == 0) {
    for (int s = 0; s < w.stages; ++s) {
      asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(full + 8 * s));
      asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(empty + 8 * s),
                   "r"(w.cluster * kConsumerWarps));
    }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  cluster_sync();
  const unsigned long long t0 = clock64();
  if (warp == kConsumerWarps) {
    if (lane == 0) {
      int it = 0;
      for (int t = first; t < w.tiles; t += clusters) {
        const int xrow0 = (t / w.units) * w.tok + rank * (w.tok / w.cluster);
        for (int step = 0; step < kSteps; ++step, ++it) {
          const int slot = it % w.stages;
          if (it >= w.stages) mbar_wait(empty + 8 * slot, ((it / w.stages) + 1) & 1);
          asm volatile(
              "mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(
                  full + 8 * slot),
              "r"(stage_bytes)
              : "memory");
          asm volatile(
              "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::"
              "complete_tx::bytes.multicast::cluster [%0], [%1, {%2, %3}], "
              "[%4], %5;" ::"r"(base + slot * stage_bytes +
                                rank * (stage_bytes / w.cluster)),
              "l"(&w.map), "r"(step * kCols), "r"(xrow0), "r"(full + 8 * slot),
              "h"((uint16_t)((1u << w.cluster) - 1))
              : "memory");
        }
      }
    }
  } else {
    int it = 0;
    for (int t = first; t < w.tiles; t += clusters)
      for (int step = 0; step < kSteps; ++step, ++it) {
        const int slot = it % w.stages;
        mbar_wait(full + 8 * slot, (it / w.stages) & 1);
        if (lane < w.cluster)
          asm volatile(
              "{\n.reg .b32 r;\nmapa.shared::cluster.u32 r, %0, %1;\n"
              "mbarrier.arrive.shared::cluster.b64 _, [r];\n}" ::"r"(
                  empty + 8 * slot),
              "r"(lane)
              : "memory");
      }
  }
  __syncwarp();
  cluster_sync();
  if (threadIdx.x == 0) atomicAdd(cycles, clock64() - t0);
}

// Every CTA reads `bytes` from src (L2-resident) `passes` times.
__global__ void __launch_bounds__(512)
    ldg_walk(const int4* src, size_t n16, int passes, int4* sink) {
  int4 acc = make_int4(0, 0, 0, 0);
  for (int p = 0; p < passes; ++p)
    for (uint32_t i = threadIdx.x; i < n16; i += 8 * blockDim.x) {  // n16 = 2^k
      int4 v[8];
#pragma unroll
      for (int u = 0; u < 8; ++u)  // 8 loads in flight per thread
        v[u] = __ldcg(src + ((i + u * blockDim.x + blockIdx.x * 64) & (n16 - 1)));
#pragma unroll
      for (int u = 0; u < 8; ++u) {
        acc.x ^= v[u].x; acc.y ^= v[u].y; acc.z ^= v[u].z; acc.w ^= v[u].w;
      }
    }
  if ((acc.x ^ acc.y ^ acc.z ^ acc.w) == 0x7fffffff) sink[threadIdx.x] = acc;
}

static PFN_cuTensorMapEncodeTiled_v12000 encoder() {
  void* fn = nullptr;
  cudaDriverEntryPointQueryResult found{};
  CHECK(cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000,
                                         cudaEnableDefault, &found));
  if (found != cudaDriverEntryPointSuccess || !fn) std::exit(1);
  return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(fn);
}

int main() {
  cudaDeviceProp prop{};
  CHECK(cudaGetDeviceProperties(&prop, 0));
  int clock_khz = 0;
  CHECK(cudaDeviceGetAttribute(&clock_khz, cudaDevAttrClockRate, 0));
  const int sms = prop.multiProcessorCount;
  std::printf("%s, %d SMs, SM clock %d MHz\n", prop.name, sms, clock_khz / 1000);
  const int rows = 2048;
  void* x = nullptr;
  CHECK(cudaMalloc(&x, (size_t)rows * kK * 2));
  CHECK(cudaMemset(x, 0, (size_t)rows * kK * 2));
  unsigned long long* cycles = nullptr;
  CHECK(cudaMalloc(&cycles, sizeof(unsigned long long)));
  cudaEvent_t a, b;
  CHECK(cudaEventCreate(&a));
  CHECK(cudaEventCreate(&b));
  CHECK(cudaFuncSetAttribute(tma_walk, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             227 * 1024));
  // W_hat rows per tile 128 (prefill-mc) -> 32 units for m = 4096.
  const int units = 4096 / 128;
  struct Config {
    int tok, cluster, stages;
  };
  const Config configs[] = {{256, 1, 3}, {256, 2, 3}, {256, 2, 5}, {256, 4, 3},
                            {128, 1, 3}, {128, 1, 6}, {128, 2, 6}};
  for (const Config& c : configs) {
    Walk w{};
    w.tok = c.tok;
    w.cluster = c.cluster;
    w.stages = c.stages;
    w.units = units / c.cluster;
    w.tiles = rows / c.tok * w.units;
    const cuuint64_t dims[2] = {kK, (cuuint64_t)rows};
    const cuuint64_t strides[1] = {kK * 2};
    const cuuint32_t box[2] = {kCols, (cuuint32_t)(c.tok / c.cluster)};
    const cuuint32_t es[2] = {1, 1};
    if (encoder()(&w.map, CU_TENSOR_MAP_DATA_TYPE_FLOAT16, 2, x, dims, strides, box,
                  es, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                  CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                  CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) != CUDA_SUCCESS) {
      std::printf("tok %d cluster %d: no tensor map\n", c.tok, c.cluster);
      continue;
    }
    // > half an SM's 228 KiB: exactly one CTA per SM, so CTA clocks are SM clocks.
    const int smem = std::max(c.stages * c.tok * kCols * 2 + 16 * kMaxStages + 1024, 120 * 1024);
    cudaLaunchAttribute attr{};
    attr.id = cudaLaunchAttributeClusterDimension;
    attr.val.clusterDim.x = c.cluster;
    attr.val.clusterDim.y = 1;
    attr.val.clusterDim.z = 1;
    cudaLaunchConfig_t cfg{};
    cfg.blockDim = dim3(kThreads);
    cfg.dynamicSmemBytes = smem;
    cfg.attrs = &attr;
    cfg.numAttrs = 1;
    cfg.gridDim = dim3(sms);
    int max_clusters = 0;
    CHECK(cudaOccupancyMaxActiveClusters(&max_clusters, tma_walk, &cfg));
    cfg.gridDim = dim3(c.cluster * std::min(max_clusters, w.tiles));
    float best = 1e30f;
    unsigned long long cyc = 0;
    for (int r = 0; r < 5; ++r) {
      CHECK(cudaMemset(cycles, 0, sizeof(unsigned long long)));
      CHECK(cudaEventRecord(a));
      CHECK(cudaLaunchKernelEx(&cfg, tma_walk, w, cycles));
      CHECK(cudaEventRecord(b));
      CHECK(cudaEventSynchronize(b));
      float ms = 0;
      CHECK(cudaEventElapsedTime(&ms, a, b));
      if (ms < best) {
        best = ms;
        CHECK(cudaMemcpy(&cyc, cycles, sizeof(cyc), cudaMemcpyDeviceToHost));
      }
    }
    const double received = (double)w.tiles * c.cluster * kSteps * c.tok * kCols * 2;
    const double l2_read = received / c.cluster;
    const double cta_cycles = (double)cyc / cfg.gridDim.x;
    std::printf(
        "tma tok %3d cluster %d stages %d: %7.1f us (%d CTAs), %5.1f B/clk per SM "
        "taken in (CTA clocks), %5.2f TB/s from L2, %5.2f TB/s into shared memory\n",
        c.tok, c.cluster, c.stages, best * 1e3, cfg.gridDim.x,
        received / cfg.gridDim.x / cta_cycles, l2_read / best / 1e9,
        received / best / 1e9);
  }
  // The same bytes per SM by 16-byte loads: each CTA reads a 2 MiB window.
  int4* sink = nullptr;
  CHECK(cudaMalloc(&sink, 512 * sizeof(int4)));
  const size_t n16 = (size_t)2 * 1024 * 1024 / 16;
  for (int passes : {8, 16}) {
    float best = 1e30f;
    for (int r = 0; r < 5; ++r) {
      CHECK(cudaEventRecord(a));
      ldg_walk<<<sms, 512>>>(static_cast<const int4*>(x), n16, passes, sink);
      CHECK(cudaEventRecord(b));
      CHECK(cudaEventSynchronize(b));
      float ms = 0;
      CHECK(cudaEventElapsedTime(&ms, a, b));
      best = std::min(best, ms);
    }
    const double bytes = (double)sms * passes * n16 * 16;
    std::printf("ldg %2d passes of 2 MiB per SM: %7.1f us, %5.1f B/clk per SM, %5.2f TB/s\n",
                passes, best * 1e3, bytes / sms / (best * 1e-3 * clock_khz * 1e3),
                bytes / best / 1e9);
  }
  CHECK(cudaGetLastError());
  return 0;
}
