// SPDX-License-Identifier: Apache-2.0
// SPDX-FileCopyrightText: Copyright contributors to the vLLM project
//
// Prefill GEMM on Hopper (sm_90a): acc (rows, m) fp16 = x~ @ W_hat^T for
// every shard of a layer, with W_hat decoded straight into the register A
// operand of wgmma, so the dense path's fp16 W_hat never goes through HBM
// (decode-to-memory + cuBLAS wrote and re-read 2 bytes per weight per call)
// nor through shared memory (whose generic-proxy stores wgmma could only read
// after a proxy fence per stage).
//
// Persistent, one CTA per SM, CTAs in clusters of two; a work unit is a tile
// of 128 W_hat rows x T x~ rows (T = 256; 128 for calls of at most 128 rows,
// 64 for at most 64) with its whole k range, or
// with one of `splits` k ranges where the tiles alone would leave SMs idle
// (fp32 partials, added in order by the output transform: the same bits on
// every run), and the two CTAs of a cluster take neighbouring row tiles
// against the same x~ rows:
//  * Consumers: one pair of warpgroups (232 registers), or with T = 64 two
//    pairs (112 registers; 640 threads), pair p taking steps p, p + 2, ...
//    of the unit, pair 1's sums added to pair 0's through shared memory
//    before the store. A pair's warpgroups own 64 W_hat rows each: warp w
//    owns rows 16w..16w+15 of its warpgroup's 64, i.e. one 16-row half of a
//    32x32 trellis block. Per 64-column stage it decodes its two blocks'
//    halves (decode_half, 16-copy LUT) into four mma.m16n8k16 A fragments,
//    which are the warp's share of wgmma's register A operand, and the
//    warpgroup runs 4 wgmma m64nTk16 against the stage's x~ in shared
//    memory. It decodes the next stage while they run (two A buffers;
//    wgmma.wait_group 1 frees the older). Trellis words come straight from
//    global memory into a register ring. The epilogue writes the 64 x T
//    block of acc^T rounded to fp16 (the numerics of the cuBLAS GEMM it
//    replaces: fp16 products, fp32 sums), or as fp32 partials.
//  * Producer (one thread of warpgroup 0): per step, this CTA's half of the
//    stage (T / 2 x~ rows x 64 columns, one TMA box in the 128-byte swizzle of
//    a K-major wgmma operand, zeros past the last row) multicast into both
//    CTAs, once both CTAs' consumers of that step released the stage; at
//    the end it waits for the releases of its last stages, after which no
//    access of the peer to this CTA's shared memory is outstanding (so no
//    final cluster barrier, whose release would wait for the epilogue's
//    stores).
#include <torch/csrc/stable/accelerator.h>

#include <cuda.h>
#include <cudaTypedefs.h>

#include "qtip_codebook.cuh"
#include "qtip_launch.cuh"
#include "qtip_ops.h"

namespace vllm {
namespace qtip {

namespace kernels {

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  #define QTIP_PREFILL_DEVICE 1
#endif

// The [[maybe_unused]] constants are read only by the sm_90a device code, not
// by the other architectures' passes.
constexpr int kPfCols = 128;  // W_hat rows per tile (2 warpgroups x m64)
constexpr int kPfK = 64;      // columns per stage: one 128-byte row
// Stages of trellis words in flight per warp.
[[maybe_unused]] constexpr int kPfRing = 2;
// Warps of one consumer pair (two warpgroups of m64: a tile's 128 rows).
[[maybe_unused]] constexpr int kPfPairWarps = 8;
constexpr int kPfCopies = 16;  // 64 KiB, room for the stages
constexpr int kPfLutBytes = SignedLut<kPfCopies>::kBytes;
// A cluster of two CTAs takes the two W_hat row tiles 2c, 2c + 1 against the
// same x~ tile; each CTA loads one half of every x~ stage and multicasts it
// into both, so x~ is read from L2 m / 256 times instead of m / 128 (L2
// bandwidth, not the tensor cores, bounded the one-CTA form: its x~ staging
// alone took ~115 us of 4096x4096 at 2048 rows).
constexpr int kPfCluster = 2;

// A tile's x~ rows (wgmma N): 256; 128 where a call has at most 128 rows
// (half the zero rows; at 256 rows and more, tiles of 128 decode each W_hat
// tile twice as often and lose by up to 50%, BENCHMARKS.md "twenty-second
// run"); 64 where it has at most 64. The decode is latency-bound with two
// consumer warps per scheduler (ncu, BENCHMARKS.md "twenty-third run"); the
// 32 accumulators of a 64-row tile leave registers for a second consumer
// pair, which takes every other 64-column step of the unit, its sums added
// to the first pair's in the epilogue.
constexpr int pf_consumer_pairs(int tokens) { return tokens == 64 ? 2 : 1; }

template <int kTokens>
struct PfTile {
  static_assert(kTokens == 64 || kTokens == 128 || kTokens == 256);
  static constexpr int kPairs = pf_consumer_pairs(kTokens);
  static constexpr int kConsumerThreads = 32 * kPfPairWarps * kPairs;
  static constexpr int kThreads = 128 + kConsumerThreads;
  // setmaxnreg: the producer warpgroup gives its registers to the consumers
  // (together at most the launch's 65536 / kThreads, rounded down to 8).
  static constexpr int kProducerRegs = kPairs == 2 ? 24 : 40;
  static constexpr int kConsumerRegs = kPairs == 2 ? 112 : 232;
  static_assert(128 * kProducerRegs + kConsumerThreads * kConsumerRegs <=
                kThreads * (65536 / kThreads / 8 * 8));
  // A multiple of kPairs: pair p always finds its steps in slots p, p +
  // kPairs, ...
  static constexpr int kStages = kPairs == 2 ? 6 : 5;
  static constexpr int kStageBytes = kTokens * kPfK * 2;
  [[maybe_unused]] static constexpr int kHalfBytes = kStageBytes / kPfCluster;
  // The second pair's sums for the first to add.
  static constexpr int kReduceBytes =
      (kPairs - 1) * 32 * kPfPairWarps * (kTokens / 2) * 4;
  // LUT, stages, the reduction buffer, 2 * kStages mbarriers, and slack to
  // align the base to the swizzle pattern's 1024 bytes.
  static constexpr int kSmemBytes =
      kPfLutBytes + kStages * kStageBytes + kReduceBytes + 16 * kStages + 1024;
  static_assert(kStages % kPairs == 0 && kPfLutBytes % 1024 == 0 &&
                kStageBytes % 1024 == 0);
};

struct PrefillArgs {
  const uint8_t* trellis;
  const __half* tlut;
  __half* out;      // (rows, m), or nullptr with split-K
  float* partials;  // (splits, rows, m) with split-K, else nullptr
  // tiles: (tile pair, k split) work units; steps: 64-column steps of the
  // k range, split_steps per split (a multiple of 2 * kPairs; the last split
  // may have fewer).
  int col0, rows, m, nblk, steps, split_steps, col_pairs, pairs, tiles;
  ShardRows shards;
  // x~ (shards, rows, n_x~) as boxes of T / 2 rows x 64 columns (half a
  // stage); the GEMM's columns from col0.
  CUtensorMap x_map;
};

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

#ifdef QTIP_PREFILL_DEVICE

__device__ __forceinline__ void mbar_init(uint32_t bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(bar),
               "r"(count));
}

__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
  asm volatile(
      "{\n.reg .pred p;\nLAB_WAIT:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n"
      "@p bra DONE;\nbra LAB_WAIT;\nDONE:\n}\n" ::"r"(bar),
      "r"(parity)
      : "memory");
}

__device__ __forceinline__ void mbar_arrive_expect_tx(uint32_t bar,
                                                      uint32_t bytes) {
  asm volatile(
      "mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(bar),
      "r"(bytes)
      : "memory");
}

// Arrives on the barrier at the same offset in CTA `rank` of the cluster
// (release at CTA scope, as the stage was read by wgmma, complete by now; a
// cluster-scope release waited for this warp's trellis loads in flight).
__device__ __forceinline__ void mbar_arrive_cluster(uint32_t bar,
                                                    uint32_t rank) {
  asm volatile(
      "{\n.reg .b32 r;\nmapa.shared::cluster.u32 r, %0, %1;\n"
      "mbarrier.arrive.shared::cluster.b64 _, [r];\n}" ::"r"(bar),
      "r"(rank)
      : "memory");
}

// One box of a 3-D tensor map at (c0, c1, c2) into the same offset of every
// CTA in mask, each counting its bytes on its own barrier at offset bar.
__device__ __forceinline__ void tma_load_3d_multicast(uint32_t dst,
                                                      const CUtensorMap* map,
                                                      int c0, int c1, int c2,
                                                      uint32_t bar,
                                                      uint16_t mask) {
  asm volatile(
      "cp.async.bulk.tensor.3d.shared::cluster.global.tile.mbarrier::"
      "complete_tx::bytes.multicast::cluster [%0], [%1, {%2, %3, %4}], [%5], "
      "%6;" ::"r"(dst),
      "l"(map), "r"(c0), "r"(c1), "r"(c2), "r"(bar), "h"(mask)
      : "memory");
}

__device__ __forceinline__ uint32_t cluster_rank() {
  uint32_t r;
  asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(r));
  return r;
}

__device__ __forceinline__ void cluster_sync() {
  asm volatile(
      "barrier.cluster.arrive.release.aligned;\n"
      "barrier.cluster.wait.acquire.aligned;" ::
          : "memory");
}

// Named barrier `id` (0 is __syncthreads') of kThreads threads.
template <int id, int kThreads>
__device__ __forceinline__ void named_sync() {
  asm volatile("barrier.sync %0, %1;" ::"n"(id), "n"(kThreads) : "memory");
}

// K-major operand with the 128-byte swizzle: 8-row groups 1024 bytes apart
// (SBO), LBO unused (one swizzle atom spans the stage's 64 columns).
__device__ __forceinline__ uint64_t sw128_desc(uint32_t addr) {
  return (uint64_t)((addr & 0x3FFFF) >> 4) | ((uint64_t)1 << 16) |
         ((uint64_t)(1024 >> 4) << 32) | ((uint64_t)1 << 62);
}

__device__ __forceinline__ void wgmma_fence() {
  asm volatile("wgmma.fence.sync.aligned;" ::: "memory");
}

__device__ __forceinline__ void wgmma_commit() {
  asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory");
}

template <int kPending>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;" ::"n"(kPending) : "memory");
}

// Keeps the compiler from moving reads or writes of registers that an
// asynchronous wgmma owns (accumulators, A operands) across the wgmma.
template <int N>
__device__ __forceinline__ void fence_operands(float (&d)[N]) {
  #pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

__device__ __forceinline__ void fence_operands(uint32_t (&r)[2][2][4]) {
  #pragma unroll
  for (int i = 0; i < 16; ++i)
    asm volatile("" : "+r"(r[i >> 3][(i >> 2) & 1][i & 3])::"memory");
}

// D (64 x 256 fp32, this thread's 128) (+)= A (64 x 16 fp16, registers: this
// warp's rows as an mma.m16n8k16 A fragment) * B (256 x 16, shared, desc
// b)^T; D = A * B^T when accumulate == 0.
__device__ __forceinline__ void wgmma_m64n256k16_rs(float (&d)[128],
                                                    const uint32_t (&a)[4],
                                                    uint64_t b,
                                                    int accumulate) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %133, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n256k16.f32.f16.f16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, "
      "%30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, "
      "%44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, "
      "%58, %59, %60, %61, %62, %63, %64, %65, %66, %67, %68, %69, %70, %71, "
      "%72, %73, %74, %75, %76, %77, %78, %79, %80, %81, %82, %83, %84, %85, "
      "%86, %87, %88, %89, %90, %91, %92, %93, %94, %95, %96, %97, %98, %99, "
      "%100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, "
      "%112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, "
      "%124, %125, %126, %127}, {%128, %129, %130, %131}, %132, p, 1, 1, "
      "0;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]),
        "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]),
        "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
        "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]),
        "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]),
        "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]),
        "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]),
        "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]),
        "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]),
        "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]),
        "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
        "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]),
        "+f"(d[61]), "+f"(d[62]), "+f"(d[63]), "+f"(d[64]), "+f"(d[65]),
        "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]),
        "+f"(d[71]), "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]),
        "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]), "+f"(d[80]),
        "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]),
        "+f"(d[86]), "+f"(d[87]), "+f"(d[88]), "+f"(d[89]), "+f"(d[90]),
        "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]),
        "+f"(d[96]), "+f"(d[97]), "+f"(d[98]), "+f"(d[99]), "+f"(d[100]),
        "+f"(d[101]), "+f"(d[102]), "+f"(d[103]), "+f"(d[104]), "+f"(d[105]),
        "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]), "+f"(d[110]),
        "+f"(d[111]), "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]),
        "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]), "+f"(d[120]),
        "+f"(d[121]), "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]),
        "+f"(d[126]), "+f"(d[127])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(accumulate));
}

// The same with N = 128 (this thread's 64 of D).
__device__ __forceinline__ void wgmma_m64n128k16_rs(float (&d)[64],
                                                    const uint32_t (&a)[4],
                                                    uint64_t b,
                                                    int accumulate) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.f16.f16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, "
      "%30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, "
      "%44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, "
      "%58, %59, %60, %61, %62, %63}, {%64, %65, %66, %67}, %68, p, 1, 1, "
      "0;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]),
        "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]),
        "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
        "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]),
        "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]),
        "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]),
        "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]),
        "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]),
        "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]),
        "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]),
        "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
        "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]),
        "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(accumulate));
}

// The same with N = 64 (this thread's 32 of D).
__device__ __forceinline__ void wgmma_m64n64k16_rs(float (&d)[32],
                                                   const uint32_t (&a)[4],
                                                   uint64_t b, int accumulate) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, "
      "%30, %31}, {%32, %33, %34, %35}, %36, p, 1, 1, 0;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]),
        "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]),
        "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
        "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]),
        "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]),
        "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]),
        "+f"(d[31])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(accumulate));
}

template <int kTokens>
__device__ __forceinline__ void wgmma_rs(float (&d)[kTokens / 2],
                                         const uint32_t (&a)[4], uint64_t b,
                                         int accumulate) {
  if constexpr (kTokens == 256)
    wgmma_m64n256k16_rs(d, a, b, accumulate);
  else if constexpr (kTokens == 128)
    wgmma_m64n128k16_rs(d, a, b, accumulate);
  else
    wgmma_m64n64k16_rs(d, a, b, accumulate);
}

#endif  // QTIP_PREFILL_DEVICE

#ifdef QTIP_PREFILL_DEVICE
// A warp's 64 x kTokens share of a tile's sums into out (fp16: the numerics
// of the cuBLAS GEMM it replaces, fp32 sums rounded once; fp32: a split-K
// partial). acc[4 j + 2 h + e] is W_hat row 16 w4 + lane / 4 + 8 h of the
// warpgroup's 64, x~ row 8 j + 2 (lane % 4) + e of the tile's; o points
// at the first of them, x~ row `row`. The pointer walks the rows (no
// per-element offsets for ptxas to keep).
template <int kTokens, typename T>
__device__ __forceinline__ void store_acc(T* o, const float (&acc)[kTokens / 2],
                                          int row, int rows, size_t m) {
  #pragma unroll
  for (int j = 0; j < kTokens / 8; ++j) {
  #pragma unroll
    for (int e = 0; e < 2; ++e) {
      if (row + 8 * j + e >= rows) continue;
      if constexpr (std::is_same_v<T, float>) {
        o[e * m] = acc[4 * j + e];
        o[e * m + 8] = acc[4 * j + 2 + e];
      } else {
        o[e * m] = __float2half_rn(acc[4 * j + e]);
        o[e * m + 8] = __float2half_rn(acc[4 * j + 2 + e]);
      }
    }
    o += 8 * m;
    asm volatile("" : "+l"(o));  // not kTokens / 8 precomputed pointers
  }
}
#endif

// A warp's place in the CTA's walk over (work unit, k step); unit-derived
// values are computed when the unit changes, not per step.
template <int kTokens>
struct PrefillPos {
  int tile, step, step_end, split, xrow0, row0, shard, rank;
  // The steps of a unit this walk takes: first, first + stride, ...
  int first = 0, stride = 1;

  // t counts work units (one per cluster): k split t / pairs of tile pair
  // t % pairs, whose row tile 2 * pair + rank this CTA takes. Units of one
  // split are neighbours, so a wave reads one k range of x~.
  __device__ __forceinline__ void set_tile(int t, const PrefillArgs& a) {
    tile = t;
    step = step_end = 0;
    if (t >= a.tiles) return;
    split = t / a.pairs;
    const int pair = t - split * a.pairs;
    step = split * a.split_steps;
    step_end = min(step + a.split_steps, a.steps);
    step += first;
    const int tt = pair / a.col_pairs;
    row0 = ((pair - tt * a.col_pairs) * kPfCluster + rank) * kPfCols;
    xrow0 = tt * kTokens;
    // Unrolled, so the parameter array is never indexed at run time.
    shard = 0;
    const int rb = row0 / 32;
#pragma unroll
    for (int s = 1; s < kMaxShards; ++s)
      shard += (s < a.shards.count && rb >= a.shards.rb0[s]) ? 1 : 0;
  }
  __device__ __forceinline__ bool valid(const PrefillArgs& a) const {
    return tile < a.tiles;
  }
  // The cluster's next unit (every grid-th).
  __device__ __forceinline__ int next_tile() const {
    return tile + gridDim.x / kPfCluster;
  }
  // True where the walk moved to another unit.
  __device__ __forceinline__ bool advance(const PrefillArgs& a) {
    if ((step += stride) < step_end) return false;
    set_tile(next_tile(), a);
    return true;
  }
};

template <int K, int kTokens>
__global__ void __launch_bounds__(PfTile<kTokens>::kThreads, 1)
    qtip_prefill_kernel(const __grid_constant__ PrefillArgs a) {
#ifdef QTIP_PREFILL_DEVICE
  using Tile = PfTile<kTokens>;
  using Pos = PrefillPos<kTokens>;
  using Lut = SignedLut<kPfCopies>;
  using Blk = TrellisBlock<K>;
  extern __shared__ __align__(1024) char smem_raw[];
  const uint32_t raw = smem_addr(smem_raw);
  const uint32_t pad = (1024u - (raw & 1023u)) & 1023u;
  char* lut = smem_raw + pad;
  const uint32_t stages = raw + pad + kPfLutBytes;
  constexpr int kStages = Tile::kStages, kPairs = Tile::kPairs;
  float* const reduce =
      reinterpret_cast<float*>(lut + kPfLutBytes + kStages * Tile::kStageBytes);
  const uint32_t full =
      stages + kStages * Tile::kStageBytes + Tile::kReduceBytes;
  const uint32_t empty = full + 8 * kStages;
  const int tid = threadIdx.x, lane = tid & 31;
  const int warp = __shfl_sync(0xffffffffu, tid >> 5, 0);
  const int rank = (int)cluster_rank();
  const int first_pair = blockIdx.x / kPfCluster;
  if (tid == 0) {
    // The x~ descriptor's fetch overlaps the set-up instead of delaying the
    // first TMA (a wait of ~2 us before the first stage under ncu).
    asm volatile("prefetch.tensormap [%0];" ::"l"(&a.x_map) : "memory");
  #pragma unroll
    for (int s = 0; s < kStages; ++s) {
      mbar_init(full + 8 * s, 1);  // this CTA's producer thread (+ bytes)
      // The stage is written in both CTAs: the consumer pair whose step it
      // holds releases it in both CTAs.
      mbar_init(empty + 8 * s, kPfCluster * kPfPairWarps);
    }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  // The peer's multicasts and arrivals target this CTA's barriers only after
  // they are initialised.
  cluster_sync();

  if (warp < 4) {
    // Producer: one thread issues this CTA's half of every x~ stage, both
    // CTAs' consumers having released the stage.
    asm volatile(
        "setmaxnreg.dec.sync.aligned.u32 %0;" ::"n"(Tile::kProducerRegs));
    if (tid == 0) {
      Pos pos;
      pos.rank = rank;
      pos.set_tile(first_pair, a);
      wait_for_producer();
      int it = 0;
      for (; pos.valid(a); ++it) {
        const int slot = it % kStages;
        if (it >= kStages)
          mbar_wait(empty + 8 * slot, ((it / kStages) + 1) & 1);
        mbar_arrive_expect_tx(full + 8 * slot, Tile::kStageBytes);
        tma_load_3d_multicast(
            stages + slot * Tile::kStageBytes + rank * Tile::kHalfBytes,
            &a.x_map, a.col0 + pos.step * kPfK,
            pos.xrow0 + rank * (kTokens / kPfCluster), pos.shard,
            full + 8 * slot, (1u << kPfCluster) - 1);
        pos.advance(a);
      }
      // This CTA leaves only once the consumers of both CTAs released its
      // last stages: their remote arrivals have landed on its barriers (and
      // the peer's multicasts into it, which its own consumers waited for).
      // Cheaper than a final cluster barrier, whose release waits for the
      // epilogue's global stores.
      for (int j = max(0, it - kStages); j < it; ++j)
        mbar_wait(empty + 8 * (j % kStages), (j / kStages) & 1);
    }
  } else {
    asm volatile(
        "setmaxnreg.inc.sync.aligned.u32 %0;" ::"n"(Tile::kConsumerRegs));
    const int ctid = tid - 128;
    // The pair takes steps pair, pair + kPairs, ... of every unit (a
    // constant 0 with one pair, so the walk stays in uniform registers).
    const int pair = kPairs == 1 ? 0 : ctid / (32 * kPfPairWarps);
    const int wg = ((warp - 4) >> 2) & 1;  // warpgroup of the pair: 0 or 1
    const int w4 = warp & 3;
    // This warp's rows of a tile: 64 wg + 16 w4 .. + 15, the 16-row half mr of
    // 32x32 block row rb.
    const int rb = 2 * wg + (w4 >> 1), mr = w4 & 1;
    Pos cur, far;
    cur.rank = rank;
    cur.first = pair;
    cur.stride = kPairs;
    cur.set_tile(first_pair, a);
    if (cur.valid(a)) {
      int lut_shard = cur.shard;
      Lut::template fill<Tile::kConsumerThreads>(
          reinterpret_cast<uint32_t*>(lut), a.tlut + lut_shard * kTlutRows * 2,
          ctid);
      const uint32_t lane_term = Lut::lane_term(lane);
      // This lane's share of trellis blocks (rb, 2 step) and (rb, 2 step + 1)
      // of the step `far` is at, back to back in memory: computed per unit,
      // then advanced by a constant per step.
      auto far_block = [&]() {
        return a.trellis +
               ((size_t)(far.row0 / 32 + rb) * a.nblk + far.step * 2) *
                   Blk::kBytes +
               lane * Blk::kLaneBytes;
      };
      far = cur;
      const uint8_t* far_blk = far_block();
      // The trellis words of `far`'s step into w, then `far` one step of
      // this pair on.
      auto load_far = [&](uint32_t (&w)[2][K]) {
        if (far.valid(a)) {
          load_lane<K>(far_blk, w[0]);
          load_lane<K>(far_blk + Blk::kBytes, w[1]);
        }
        if (far.advance(a))
          far_blk = far_block();
        else
          far_blk += kPairs * 2 * Blk::kBytes;
      };
      uint32_t ring[kPfRing][2][K];
  #pragma unroll
      for (int i = 0; i < kPfRing; ++i) load_far(ring[i]);
      named_sync<1, Tile::kConsumerThreads>();  // the LUT is filled
      wait_for_producer();
      float acc[kTokens / 2];
      // A operands of two stages: [buffer][column block][kc].
      uint32_t afrag[2][2][2][4];
      // The stage the next step reads and its phase; the stage it released
      // last.
      uint32_t slot = pair, phase = 0, prev_slot = 0;
      const uint64_t desc0 = sw128_desc(stages);
      // Decodes the current step's trellis words (a ring slot) into an A buffer
      // and refills the ring slot kPfRing steps ahead.
      auto decode_step = [&](uint32_t (&w)[2][K], uint32_t (&af)[2][2][4]) {
  #pragma unroll
        for (int cb = 0; cb < 2; ++cb)
          decode_half<K, kPfCopies>(w[cb], mr, lut, lane_term, lane, af[cb]);
        load_far(w);
      };
      // One step: its 4 wgmmas from A buffer af (first: the tile's first step,
      // which starts the accumulators), then the previous step's stage
      // released.
      auto mma_step = [&](uint32_t (&af)[2][2][4], bool first) {
        mbar_wait(full + 8 * slot, phase);
        // The stage's descriptor: stage addresses stay below 256 KiB, so the
        // start-address field (bits 0-13, address / 16) takes the offset.
        const uint64_t desc = desc0 + slot * (Tile::kStageBytes >> 4);
        fence_operands(acc);
        wgmma_fence();
  #pragma unroll
        for (int kk = 0; kk < 4; ++kk)
          wgmma_rs<kTokens>(acc, af[kk >> 1][kk & 1], desc + 2 * kk,
                            !first || kk != 0);
        wgmma_commit();
        fence_operands(acc);
        wgmma_wait<1>();  // the previous step's wgmmas are done
        if (!first && lane < kPfCluster)
          mbar_arrive_cluster(empty + 8 * prev_slot, lane);
        prev_slot = slot;
        if ((slot += kPairs) >= kStages) {
          slot -= kStages;
          phase ^= 1;
        }
      };
      static_assert(kPfRing == 2, "the walk below alternates two ring slots");
      for (; cur.valid(a); cur.set_tile(cur.next_tile(), a)) {
        const int row0 = cur.row0, xrow0 = cur.xrow0;
        if (cur.shard != lut_shard) {
          // Another shard's codebook: every consumer warpgroup is past its
          // lookups of the previous one (its last decode precedes this).
          lut_shard = cur.shard;
          named_sync<1, Tile::kConsumerThreads>();
          Lut::template fill<Tile::kConsumerThreads>(
              reinterpret_cast<uint32_t*>(lut),
              a.tlut + lut_shard * kTlutRows * 2, ctid);
          named_sync<1, Tile::kConsumerThreads>();
        }
        // A pair's steps two at a time (the host keeps their count even):
        // ring slot and A buffer alternate. A buffer's registers stay live
        // (fence_operands) until the wgmma.wait_group that retires the wgmmas
        // reading them, so the compiler cannot reuse them while the tensor
        // cores do.
        decode_step(ring[0], afrag[0]);
        // This pair's steps of the unit (an even count: the host keeps
        // split_steps a multiple of 2 * kPairs).
        const int unit_steps = (cur.step_end - cur.step + kPairs - 1) / kPairs;
        for (int step = 0; step < unit_steps; step += 2) {
          mma_step(afrag[0], step == 0);
          fence_operands(afrag[1]);
          decode_step(ring[1], afrag[1]);
          mma_step(afrag[1], false);
          fence_operands(afrag[0]);
          if (step + 2 < unit_steps) decode_step(ring[0], afrag[0]);
        }
        wgmma_wait<0>();
        fence_operands(acc);
        if (lane < kPfCluster) mbar_arrive_cluster(empty + 8 * prev_slot, lane);
        // The CTA's last unit is done: the output transform may launch and
        // take the SMs as this grid drains (-4 to -7% on most layers at
        // 52-64 rows). At kernel start instead, its CTAs waited on the SMs
        // this grid leaves idle from the outset (+7% on 14336x4096).
        if (cur.next_tile() >= a.tiles) allow_dependents();
        if constexpr (kPairs == 2) {
          // Pair 1's sums through shared memory (element-major: each store
          // and load conflict-free), added to pair 0's in the same order on
          // every run.
          float* red = reduce + (ctid & (32 * kPfPairWarps - 1));
          if (pair == 1) {
  #pragma unroll
            for (int i = 0; i < kTokens / 2; ++i)
              red[i * 32 * kPfPairWarps] = acc[i];
          }
          named_sync<2, Tile::kConsumerThreads>();
          if (pair == 0) {
  #pragma unroll
            for (int i = 0; i < kTokens / 2; ++i)
              acc[i] += red[i * 32 * kPfPairWarps];
          }
          // Pair 1 writes the buffer again only after pair 0 read it.
          named_sync<3, Tile::kConsumerThreads>();
          if (pair != 0) continue;
        }
        const int row = xrow0 + 2 * (lane & 3);
        const size_t at =
            (size_t)row * a.m + row0 + 64 * wg + 16 * w4 + (lane >> 2);
        if (a.partials != nullptr)
          store_acc<kTokens>(a.partials + (size_t)cur.split * a.rows * a.m + at,
                             acc, row, a.rows, a.m);
        else
          store_acc<kTokens>(a.out + at, acc, row, a.rows, a.m);
      }
    }  // cur.valid
  }  // consumers
#else
  __trap();
#endif
}

}  // namespace kernels

namespace {

// Clusters of two CTAs, one CTA per SM, persistent: as many clusters as the
// GPU holds at once (fewer than SMs / 2 where a GPC has an odd count), so no
// cluster waits for a second wave; each walks every grid-th of the `units`
// (tile pair, k split) work units.
template <int K, int kTokens>
void launch_prefill(const kernels::PrefillArgs& a, int64_t units,
                    cudaStream_t stream) {
  constexpr auto kernel = kernels::qtip_prefill_kernel<K, kTokens>;
  static DeviceFlags smem_set;
  ensure_max_dynamic_smem(kernel, smem_set);
  cudaLaunchAttribute attrs[2]{};
  attrs[0].id = cudaLaunchAttributeClusterDimension;
  attrs[0].val.clusterDim.x = kernels::kPfCluster;
  attrs[0].val.clusterDim.y = 1;
  attrs[0].val.clusterDim.z = 1;
  attrs[1].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attrs[1].val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t config{};
  config.blockDim = dim3(kernels::PfTile<kTokens>::kThreads);
  config.dynamicSmemBytes = kernels::PfTile<kTokens>::kSmemBytes;
  config.stream = stream;
  config.attrs = attrs;
  config.numAttrs = 1;
  // The clusters that fit at once, queried once per device (a host-side
  // query, legal during CUDA-graph capture; the grid below needs it).
  static std::atomic<int> max_clusters[kMaxDevices];
  int dev = 0;
  check_cuda(cudaGetDevice(&dev));
  int clusters =
      dev < kMaxDevices ? max_clusters[dev].load(std::memory_order_relaxed) : 0;
  if (clusters == 0) {
    config.gridDim = dim3(kernels::kPfCluster * 66);
    check_cuda(cudaOccupancyMaxActiveClusters(&clusters, kernel, &config));
    STD_TORCH_CHECK(
        clusters > 0,
        "qtip_prefill_gemm: no cluster of two CTAs fits an SM pair");
    if (dev < kMaxDevices)
      max_clusters[dev].store(clusters, std::memory_order_relaxed);
  }
  config.gridDim =
      dim3(kernels::kPfCluster * std::min<int64_t>(units, clusters));
  config.numAttrs = 2;
  check_cuda(cudaLaunchKernelEx(&config, kernel, a));
}

// cuTensorMapEncodeTiled through the runtime, so _qtip_C does not link the
// driver library itself.
PFN_cuTensorMapEncodeTiled_v12000 tensor_map_encoder() {
  static PFN_cuTensorMapEncodeTiled_v12000 encode = [] {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult found{};
    check_cuda(cudaGetDriverEntryPointByVersion(
        "cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault, &found));
    STD_TORCH_CHECK(found == cudaDriverEntryPointSuccess && fn != nullptr,
                    "qtip_prefill_gemm: the CUDA driver has no "
                    "cuTensorMapEncodeTiled");
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(fn);
  }();
  return encode;
}

// x~ (shards, rows, ld) fp16 as TMA boxes of half a stage (tokens / 2 rows x
// 64 columns), in the 128-byte swizzle wgmma reads; rows past the end read as
// zeros.
CUtensorMap x_tensor_map(const Tensor& xt, int64_t tokens) {
  CUtensorMap map;
  const cuuint64_t dims[3] = {(cuuint64_t)xt.size(2), (cuuint64_t)xt.size(1),
                              (cuuint64_t)xt.size(0)};
  const cuuint64_t strides[2] = {(cuuint64_t)xt.size(2) * 2,
                                 (cuuint64_t)(xt.size(1) * xt.size(2) * 2)};
  const cuuint32_t box[3] = {kernels::kPfK,
                             (cuuint32_t)(tokens / kernels::kPfCluster), 1};
  const cuuint32_t elem_strides[3] = {1, 1, 1};
  const CUresult r = tensor_map_encoder()(
      &map, CU_TENSOR_MAP_DATA_TYPE_FLOAT16, 3, xt.data_ptr(), dims, strides,
      box, elem_strides, CU_TENSOR_MAP_INTERLEAVE_NONE,
      CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
      CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  STD_TORCH_CHECK(r == CUDA_SUCCESS,
                  "qtip_prefill_gemm: cuTensorMapEncodeTiled failed (", (int)r,
                  ") for x~ of shape ", shape(xt));
  return map;
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// x~ rows per tile for a call of `rows` rows (kernels::PfTile).
int64_t prefill_tokens(int64_t rows) {
  return rows <= 64 ? 64 : rows <= 128 ? 128 : 256;
}

// Each consumer pair takes a unit's steps two at a time: the unit's step
// count is a multiple of this.
int64_t step_multiple(int64_t tokens) {
  return 2 * kernels::pf_consumer_pairs((int)tokens);
}

// 64-column steps per k split when `steps` (a multiple of `multiple`) are
// split `splits` ways: a multiple of it too; the last split may have fewer.
int64_t split_steps(int64_t steps, int64_t splits, int64_t multiple) {
  return multiple * ceil_div(steps, multiple * splits);
}

}  // namespace

int64_t prefill_gemm_splits(const Tensor& trellis,
                            const std::vector<int64_t>& shard_rows,
                            int64_t rows, bool against_fused) {
#ifdef QTIP_SM90A
  // Up to 48 rows the fused GEMM, whose time grows with the rows, still
  // wins where the prefill GEMM's, flat up to its tile's rows, does not: at
  // 48 rows it won on the fused q/k/v and gate/up layers (by 3-16%); from
  // 52 rows the prefill GEMM, split as below, tied or won on all 10 shapes
  // timed, by up to 35% (BENCHMARKS.md "twenty-fourth run").
  if (against_fused && rows < kPrefillGemmMinRows) return 0;
  const torch::stable::accelerator::DeviceGuard guard(
      trellis.get_device_index());
  const cudaDeviceProp* prop = get_device_prop();
  if (prop->major != 9 || prop->minor != 0 ||
      prop->sharedMemPerBlockOptin < (size_t)kernels::PfTile<256>::kSmemBytes)
    return 0;
  // Steps of 64 columns, in pairs per consumer pair.
  const int64_t steps = trellis.size(1) / 2;
  const int64_t tokens = prefill_tokens(rows);
  const int64_t multiple = step_multiple(tokens);
  if (steps == 0 || trellis.size(1) % 2 != 0 || steps % multiple != 0) return 0;
  // Both CTAs of a cluster read the same x~, so the same shard.
  for (int64_t r : shard_rows)
    if (r % (kernels::kPfCols * kernels::kPfCluster) != 0) return 0;
  // K = 3's decode (more byte shuffles per weight) stops hiding under the
  // MMAs beyond 1024 rows: at 2048, cuBLAS on the decoded W_hat wins by up
  // to 9% where m >= 11008 (BENCHMARKS.md "twenty-first run").
  if (trellis.size(2) == 3 * 64 && rows > 1024) return 0;
  // A tile walks its k range alone, so whole tiles quantise the SMs' work
  // into waves: k is split (partials added in order by the output
  // transform), each split at least 8 steps, where a plan's cost is least:
  // per wave, a unit's steps (0.35 / 0.51 / 0.57 us each at T = 64 / 128 /
  // 256) and ~1 us of fixed work (the stages' refill, the epilogue); plus
  // ~0.3 us per MB of partials (fp32 per split, or the unsplit fp16 sums)
  // written and read back by the output transform. Fitted to the layer
  // times of 1 to 8 splits on 10 Llama shapes at 48-256 rows on an H200
  // (BENCHMARKS.md "twenty-fourth run"), it picks within 2.4% of the best
  // split everywhere. The best split beat the fused GEMM from 52 rows and
  // decode + cuBLAS at 128 and 256 rows on every shape, so it always runs.
  // The partials stay within 32 MB: beyond, they leave the 50 MB L2 for
  // DRAM, which the model does not count (Llama-2's q/k/v at 512 rows, 50
  // MB in 2 splits: +6.7%).
  const int64_t m = trellis.size(0) * 32;
  const int64_t tiles = ceil_div(rows, tokens) * m / kernels::kPfCols;
  const int64_t sms = prop->multiProcessorCount;
  const double step_us = tokens == 64 ? 0.35 : tokens == 128 ? 0.51 : 0.57;
  // Millions of outputs: 4 MB of fp32 partials per split, or 2 MB of fp16.
  const double outputs_m = 1e-6 * (double)(rows * m);
  constexpr double kMaxPartialsMb = 32;
  int64_t best_splits = 1;
  double best_us = 0;
  for (int64_t s = 1; s == 1 || steps >= 8 * s; s *= 2) {
    const int64_t s_steps = split_steps(steps, s, multiple);
    const int64_t splits = ceil_div(steps, s_steps);
    const double partials_mb =
        outputs_m * (splits > 1 ? 4.0 * (double)splits : 2.0);
    if (splits > 1 && partials_mb > kMaxPartialsMb) break;
    const double waves = (double)ceil_div(tiles * splits, sms);
    const double us =
        waves * ((double)s_steps * step_us + 1) + 0.3 * partials_mb;
    if (s == 1 || us < best_us) {
      best_us = us;
      best_splits = splits;
    }
  }
  return best_splits;
#else
  (void)trellis;
  (void)shard_rows;
  (void)rows;
  (void)against_fused;
  return 0;
#endif
}

void qtip_prefill_gemm(const Tensor& xt, int64_t col0, const Tensor& trellis,
                       const Tensor& tlut,
                       const std::vector<int64_t>& shard_rows, Tensor& out) {
  const char* op = "qtip_prefill_gemm";
  const int64_t K = trellis.size(2) / 64, rows = xt.size(1);
  const int64_t m = trellis.size(0) * 32, n = trellis.size(1) * 32;
  STD_TORCH_CHECK(
      xt.dim() == 3 && xt.scalar_type() == ScalarType::Half &&
          xt.is_contiguous() && xt.size(0) == (int64_t)shard_rows.size() &&
          col0 + n <= xt.size(2) && xt.size(2) % 8 == 0 && col0 % 8 == 0,
      op, ": x~ ", shape(xt), " must be contiguous fp16 (", shard_rows.size(),
      ", rows, >= ", col0 + n, ")");
  // fp16 sums (rows, m), or fp32 split-K partials (splits, rows, m).
  const bool split_k = out.dim() == 3;
  const int64_t splits = split_k ? out.size(0) : 1, steps = n / kernels::kPfK;
  const int64_t tokens = prefill_tokens(rows);
  const int64_t multiple = step_multiple(tokens);
  STD_TORCH_CHECK(steps > 0 && n % kernels::kPfK == 0 && steps % multiple == 0,
                  op, ": the trellis's ", n, " columns must be a positive ",
                  "multiple of ", multiple * kernels::kPfK, " at ", rows,
                  " rows");
  STD_TORCH_CHECK(
      out.dim() >= 2 && out.size(-2) == rows && out.size(-1) == m &&
          out.is_contiguous() &&
          (split_k ? out.scalar_type() == ScalarType::Float && splits > 0 &&
                         ceil_div(steps, split_steps(steps, splits,
                                                     multiple)) == splits
                   : out.dim() == 2 && out.scalar_type() == ScalarType::Half),
      op, ": out ", shape(out), " must be contiguous fp16 (", rows, ", ", m,
      ") or fp32 (splits, ", rows, ", ", m, ") with every split of the ", steps,
      " 64-column steps non-empty");
  const int64_t shards = (int64_t)shard_rows.size();
  STD_TORCH_CHECK(trellis.is_contiguous() &&
                      reinterpret_cast<uintptr_t>(trellis.data_ptr()) % 16 == 0,
                  op, ": trellis must be contiguous and 16-byte aligned");
  STD_TORCH_CHECK(tlut.scalar_type() == ScalarType::Half &&
                      tlut.is_contiguous() &&
                      tlut.numel() == shards * kTlutRows * 2,
                  op, ": tlut must be contiguous fp16 (", shards,
                  ", 512, 2), got ", shape(tlut));
  STD_TORCH_CHECK(reinterpret_cast<uintptr_t>(xt.data_ptr()) % 16 == 0, op,
                  ": x~ data must be 16-byte aligned");
  if (rows == 0) return;
  kernels::PrefillArgs a{};
  a.trellis = reinterpret_cast<const uint8_t*>(trellis.data_ptr());
  a.tlut = reinterpret_cast<const __half*>(tlut.data_ptr());
  if (split_k)
    a.partials = reinterpret_cast<float*>(out.data_ptr());
  else
    a.out = reinterpret_cast<__half*>(out.data_ptr());
  a.col0 = (int)col0;
  a.rows = (int)rows;
  a.m = (int)m;
  a.nblk = (int)(n / 32);
  a.steps = (int)steps;
  a.split_steps = (int)split_steps(steps, splits, multiple);
  a.col_pairs = (int)(m / (kernels::kPfCols * kernels::kPfCluster));
  const int64_t pairs = ceil_div(rows, tokens) * a.col_pairs;
  const int64_t tiles = pairs * splits;
  STD_TORCH_CHECK(tiles < (int64_t{1} << 30), op, ": ", rows, " rows x ", m,
                  " columns is more tiles than the kernel indexes");
  a.pairs = (int)pairs;
  a.tiles = (int)tiles;
  a.shards = make_shard_rows(shard_rows, m, op);
  const torch::stable::accelerator::DeviceGuard guard(
      trellis.get_device_index());
  a.x_map = x_tensor_map(xt, tokens);
  auto stream = get_current_cuda_stream();
  auto run = [&](auto k_tag) {
    constexpr int kK = decltype(k_tag)::value;
    if (tokens == 64)
      launch_prefill<kK, 64>(a, tiles, stream);
    else if (tokens == 128)
      launch_prefill<kK, 128>(a, tiles, stream);
    else
      launch_prefill<kK, 256>(a, tiles, stream);
  };
  switch (K) {
    case 2:
      run(std::integral_constant<int, 2>{});
      break;
    case 3:
      run(std::integral_constant<int, 3>{});
      break;
    case 4:
      run(std::integral_constant<int, 4>{});
      break;
    default:
      STD_TORCH_CHECK(false, op, ": K must be 2, 3 or 4, got ", K);
  }
  check_launch();
}

}  // namespace qtip
}  // namespace vllm
