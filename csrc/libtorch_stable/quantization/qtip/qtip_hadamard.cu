// SPDX-License-Identifier: Apache-2.0
// SPDX-FileCopyrightText: Copyright contributors to the vLLM project
//
// QTIP's randomized Hadamard transform with its scalings fused:
//   y = factor * out_scale ⊙ H_b (in_scale ⊙ x),  H_b = (H_K ⊗ S_P) / sqrt(b)
// along the last dim of x (rows, n), block-diagonal with blocks of b = K * P
// elements (b = n unless the checkpoint was split for tensor parallelism),
// S_P the Sylvester Hadamard of size P (a power of two) and H_K one of the
// twelve small factors (K = 1 for powers of two; H_K^T when transpose).
// In a QTIP linear the input side is in_scale = SU, factor = 1/32, fp16 out;
// the output side is out_scale = SV, factor = 32, the activation dtype out.
// Everything is computed in fp32 as in the reference.
//
// Fused layers: x's columns may be split into segments (the shards' outputs
// of q/k/v or gate/up), each with its own block size, and in_scale may have
// one row per shard (SU_s), giving one transformed copy of x per shard; all
// in one launch.
//
// The GEMM's output side: x may be (splits, rows, n) fp32 split-K partial
// sums, added in split order as they are loaded (deterministic). On its input
// side the GEMM reads the (shards, rows, n) row-major copies as they are.
//
// One thread block per (copy, row, Hadamard block), the block's b values in
// fp32 shared memory (so b <= ~57k on Hopper); for powers of two (K = 1) a
// thread block takes several small blocks of a row, so blocks of a few dozen
// columns (the Sylvester half of a K > 1 transform whose H_K step runs on
// the tensor cores, TP-split layers) do not each get a tiny thread block:
//  1. load 8 consecutive values per thread (16/32-byte loads), scale them,
//     do the first three butterfly stages in registers and the next three
//     with warp shuffles (at those strides shared memory has bank conflicts);
//  2. the remaining log2(P) - 6 stages in radix-8 passes over shared memory
//     (one barrier per three stages);
//  3. K == 1: scale and store. K > 1: y[r][p] = sum_k H_K[r][k] X[k][p], the
//     K x K factor applied per column p with fp32 FMAs, reading the needed
//     rows of H_K from a small shared-memory slice (broadcast float4 loads).
//     That step costs K * b FMAs, so for small batches its rows and columns
//     are split over gridDim.y blocks (each redoing the cheap Sylvester part)
//     to spread it over the GPU.
// With a few rows and K <= 32 that redone part dominates: the blocks of a row
// split its columns only, and each one loads all of the row (all its split-K
// partials on the output side) for a few of its outputs. There the op runs
// in two launches instead: the Sylvester part alone (K = 1 blocks of P
// columns, fp32, unscaled) over many small blocks, then the H_K step on
// those values (`presummed`), each block loading only the columns it mixes.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/csrc/stable/accelerator.h>

#include <algorithm>
#include <limits>
#include <type_traits>

#include "qtip_codebook.cuh"
#include "qtip_hadamard.cuh"
#include "qtip_launch.cuh"
#include "qtip_ops.h"

namespace vllm {
namespace qtip {

namespace kernels {

constexpr int kHadMaxThreads = 1024;
// Columns a thread block takes at least when a row has several small
// power-of-two blocks (eight per thread).
constexpr int64_t kHadMinCtaCols = 2048;
// Blocks per row of a large H_K factor (see rchunk in qtip_hadamard).
constexpr int64_t kHadMaxRowChunks = 4;
// Split-K partial loads a thread keeps in flight (4 x 32 bytes).
constexpr int kSplitLoads = 4;
// Up to this many rows (times copies) and this K, an H_K transform takes
// two launches (see above).
constexpr int64_t kHadTwoLaunchMaxRows = 32;
constexpr int64_t kHadTwoLaunchMaxK = 32;
// Output transforms with a larger H_K (Llama-2's K = 172 x 64) of up to this
// many rows (times copies) take kHadFewRowsHkRows rows of H_K per thread
// block, not 32: at one row 32 left the H_K step to 12 thread blocks,
// instruction-bound for ~7 us of a ~21 us layer (H200, ncu); 8 spread it
// over 44 per 11008 columns. The fused path takes qtip_hk64_kernel from 2
// rows (kHk64OutMinRows), faster there, so in a model this is the one-row
// case (a fused gate_up's two segments included).
constexpr int64_t kHadFewRowsMaxRows = 2;
constexpr int kHadFewRowsHkRows = 8;
// Columns per thread block of the first of the two launches (64 threads).
constexpr int64_t kHadSylvesterCtaCols = 512;
// With H_K, the columns a thread block's rows of H_K serve at least: blocks of
// fewer than 64 columns per H_K row (K x 2^a with 2^a < 64, e.g. the 1376 =
// 172 x 8 blocks of a split_for_tp Llama-2-7B at TP = 1) are grouped, so every
// slice of H_K loaded serves as many values as a whole-matrix block's.
constexpr int64_t kHadHkMinCols = 64;
// From this many rows (times copies) on: where a row takes at most
// kHadMaxRowChunks thread blocks, the grouped plan equals the whole-matrix one.
constexpr int64_t kHadHkGroupMinRows = 8;

// Column segments of a row: segment s starts at column col[s], has len[s]
// columns and is made of Hadamard blocks of K * 2^log2P[s] columns. Thread
// blocks blk0[s].. each take cta_cols[s] of its columns (whole blocks: one
// when K > 1 unless they are narrow, see kHadHkMinCols; the last one may take
// fewer).
struct HadSegments {
  int count;
  int col[kMaxShards];
  int len[kMaxShards];
  int cta_cols[kMaxShards];
  int log2P[kMaxShards];
  int blk0[kMaxShards + 1];
  float mult[kMaxShards];  // factor / sqrt(K * 2^log2P)
};

template <typename InT, typename OutT>
__global__ void __launch_bounds__(kHadMaxThreads)
    qtip_hadamard_kernel(const InT* __restrict__ x,
                         const float* __restrict__ in_scale,
                         const float* __restrict__ out_scale,
                         const float* __restrict__ had, OutT* __restrict__ y,
                         int rows, int n, HadSegments segs, int K,
                         bool transpose, int rchunk, int p_splits, int ksplit,
                         int in_splits, bool presummed) {
  extern __shared__ __align__(16) float X[];
  const int per_row = segs.blk0[segs.count];
  const int copy_row = blockIdx.x / per_row, j = blockIdx.x % per_row;
  const int copy = copy_row / rows, row = copy_row % rows;
  int seg = 0;
  while (seg + 1 < segs.count && j >= segs.blk0[seg + 1]) ++seg;
  const int seg_off = (j - segs.blk0[seg]) * segs.cta_cols[seg];
  const int b = min(segs.cta_cols[seg], segs.len[seg] - seg_off);
  const int log2P = segs.log2P[seg];
  const int col0 = segs.col[seg] + seg_off;
  // x is shared by the copies (copy c is scaled by in_scale row c), or,
  // presummed, has one row-major copy each.
  x += ((presummed ? (int64_t)copy * rows : 0) + row) * n + col0;
  if (in_scale != nullptr) in_scale += (int64_t)copy * n;
  // This block's output row: row-major, copy after copy.
  y += ((int64_t)copy * rows + row) * n;
  const float mult = segs.mult[seg];
  const int64_t split_stride = (int64_t)rows * n;
  allow_dependents();
  // K > 1: M[k][r - r0] = H[r][k] (H = H_K, or H_K^T when transpose) for
  // this CTA's output rows r0.. of the H_K step, in shared memory behind the
  // block's values. H_K is a weight, never the previous kernel's output (the
  // op's contract), so it loads before the wait below, under that kernel's
  // tail; the barrier after step 1 publishes it.
  // Element i = k * rchunk + (r - r0) is walked by a precomputed step (no
  // division per element: with K = 172 at one row the divisions were a
  // fifth of the kernel's instructions, and CTAs that get an SM only as the
  // GEMM's exit run this part after their producer is done).
  float* M = X + b;
  const int r0 = (blockIdx.y / p_splits) * rchunk;
  if (K > 1) {
    const int dk = blockDim.x / rchunk, dr = blockDim.x % rchunk;
    int k = threadIdx.x / rchunk, r = r0 + threadIdx.x % rchunk;
#pragma unroll 4
    for (int i = threadIdx.x; i < K * rchunk; i += blockDim.x) {
      M[i] = r < K ? (transpose ? had[k * K + r] : had[r * K + k]) : 0.f;
      k += dk;
      r += dr;
      if (r >= r0 + rchunk) {
        r -= rchunk;
        ++k;
      }
    }
  }
  // K > 1: y[r][p] = sum_k M[k][r - r0] * X[k][p] for this block's rows
  // r0.. of H_K and its columns p_lo..p_hi of each Hadamard block.
  const int P = 1 << log2P;
  const int ps = blockIdx.y % p_splits;
  const int p_lo = (int)((int64_t)ps * P / p_splits);
  const int plen = (int)((int64_t)(ps + 1) * P / p_splits) - p_lo;
  // The H_K step's columns: plen (a power of two) of each of the thread
  // block's Hadamard blocks (several when they are narrow), numbered c = 0 ..
  // step_cols - 1 across them; value k of column c is at col_base(c) + k * P.
  const int step_cols = plen * (b / (K << log2P));
  auto col_base = [&](int c) {
    return (c / plen) * (K << log2P) + p_lo + c % plen;
  };
  wait_for_producer();

  if (presummed) {
    // The Sylvester part is done: only columns p_lo.. of each k (plen a
    // multiple of 4, 16-byte aligned).
    const int quads = step_cols / 4;
    for (int i = threadIdx.x; i < K * quads; i += blockDim.x) {
      const int off = (i / quads) * P + col_base((i % quads) * 4);
      *reinterpret_cast<float4*>(X + off) =
          *reinterpret_cast<const float4*>(x + off);
    }
    __syncthreads();
  } else {
    load_sylvester<kSplitLoads>(x, in_splits, split_stride,
                                in_scale == nullptr ? nullptr : in_scale + col0,
                                X, b, log2P);
  }

  if (K == 1) {
    for (int g = threadIdx.x; g < b / 8; g += blockDim.x)
      store_group8(X, g, mult, out_scale, col0, y);
    return;
  }

  const int items = (rchunk / 8) * step_cols;
  // Output (r, c) of this block, scaled.
  auto put = [&](int r, int c, float acc) {
    const int idx = col_base(c) + r * P;
    float val = acc * mult;
    if (out_scale != nullptr) val *= out_scale[col0 + idx];
    y[col0 + idx] = from_float<OutT>(val);
  };
  if (ksplit == 1) {
    // Many rows: each thread takes 8 rows x 2 columns, so every k costs
    // three shared loads (2 values of X, 8 of H_K) for 16 FMAs (4 columns
    // would need more than the 64 registers of a 1024-thread block).
    const int pairs = step_cols / 2;
    for (int it = threadIdx.x; it < (rchunk / 8) * pairs; it += blockDim.x) {
      const int sub = it / pairs, c = (it % pairs) * 2;
      const int rs = r0 + sub * 8;
      if (rs >= K) continue;
      float acc[8][2] = {};
      const float4* m4 = reinterpret_cast<const float4*>(M + sub * 8);
      const float2* x2 = reinterpret_cast<const float2*>(X + col_base(c));
#pragma unroll 2
      for (int k = 0; k < K; ++k) {
        const float2 v = x2[k * (P / 2)];
        const float4 h0 = m4[k * (rchunk / 4)], h1 = m4[k * (rchunk / 4) + 1];
        const float h[8] = {h0.x, h0.y, h0.z, h0.w, h1.x, h1.y, h1.z, h1.w};
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          acc[j][0] += h[j] * v.x;
          acc[j][1] += h[j] * v.y;
        }
      }
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        if (rs + j >= K) break;
        put(rs + j, c, acc[j][0]);
        put(rs + j, c + 1, acc[j][1]);
      }
    }
    return;
  }
  // Few rows: ksplit threads share each output group (one pass, the host
  // guarantees items * ksplit <= blockDim.x), each summing a k-range, so the
  // dependent chain is K / ksplit long; the partial sums meet in shared
  // memory and are added in k-range order (deterministic).
  float* partial = M + K * rchunk;
  const int ks = threadIdx.x / items, it = threadIdx.x % items;
  const int sub = it / step_cols, c = it % step_cols, rs = r0 + sub * 8;
  const bool mine = ks < ksplit && rs < K;
  float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  if (mine) {
    // y[rs..rs+7][c] over this thread's k-range.
    const float4* m4 = reinterpret_cast<const float4*>(M + sub * 8);
    const float* xc = X + col_base(c);
#pragma unroll 4
    for (int k = K * ks / ksplit; k < K * (ks + 1) / ksplit; ++k) {
      const float v = xc[k * P];
      const float4 h0 = m4[k * (rchunk / 4)], h1 = m4[k * (rchunk / 4) + 1];
      acc[0] += h0.x * v, acc[1] += h0.y * v, acc[2] += h0.z * v;
      acc[3] += h0.w * v, acc[4] += h1.x * v, acc[5] += h1.y * v;
      acc[6] += h1.z * v, acc[7] += h1.w * v;
    }
    if (ks > 0) {
#pragma unroll
      for (int j = 0; j < 8; ++j)
        partial[((ks - 1) * items + it) * 8 + j] = acc[j];
    }
  }
  __syncthreads();
  if (mine && ks == 0) {
    for (int other = 1; other < ksplit; ++other)
#pragma unroll
      for (int j = 0; j < 8; ++j)
        acc[j] += partial[((other - 1) * items + it) * 8 + j];
#pragma unroll
    for (int j = 0; j < 8; ++j)
      if (rs + j < K) put(rs + j, c, acc[j]);
  }
}

// Blocks of 4096 columns with K = 1 (the hidden size of Llama-2-7B and
// Llama-3-8B) and no split-K partials take a kernel of their own: 256
// threads hold 16 values each and do the 12 butterfly stages in three
// radix-16 register passes (column bits 0-3, 4-7, 8-11), joined by two
// exchanges through shared memory (slots: syl16_slot below), where every
// exchange is free of bank conflicts (the first as 16-byte stores). About 28
// instructions per element in all (20 on the data path), against ~50 in the
// shuffle and radix-8 passes of qtip_hadamard_kernel, which this transform
// is bound by at many rows. Same fp32 operations in the same order: the
// same bits.
constexpr int kSyl16Cols = 4096;
constexpr int kSyl16Threads = kSyl16Cols / 16;
// Rows of x from which it is taken: the prefill GEMM's (prefill_gemm_splits),
// which follows it from 49 rows (H200, 52-112 rows: 4096x4096 and 1024x4096
// layers -3 to -8%, 11008x4096 and 14336x4096 -2 to -4%; twenty-fifth run),
// as at 2048 (4096x4096 -24%, tenth run). Before the fused GEMM it is taken
// only where a fused layer's copies make 128 rows: there, against one CTA
// per row, the GEMM's early launch made layers up to 17% slower at 64 rows.
constexpr int64_t kSyl16MinRows = kPrefillGemmMinRows;
constexpr int64_t kSyl16MinCopyRows = 128;

// The exchanges keep column e in shared-memory slot
//   syl16_slot(e) = e ^ (((e >> 5) & 3) << 2) ^ (((e >> 8) & 1) << 4),
// written out below per pass as per-thread bases plus constant offsets.

// One CTA per (row, 4096-column block, copy) = (blockIdx.x, .y, .z); scales
// as qtip_hadamard_kernel
// (in_scale row `copy`, then mult and out_scale at the end).
template <typename InT, typename OutT>
__global__ void __launch_bounds__(kSyl16Threads)
    qtip_sylvester4096_kernel(const InT* __restrict__ x,
                              const float* __restrict__ in_scale,
                              const float* __restrict__ out_scale,
                              OutT* __restrict__ y, int rows, int n,
                              float mult) {
  __shared__ __align__(16) float X[kSyl16Cols];
  const int row = blockIdx.x, col0 = blockIdx.y * kSyl16Cols;
  const int copy = blockIdx.z;
  const int64_t copy_row = (int64_t)copy * rows + row;
  const int t = threadIdx.x;
  x += (int64_t)row * n + col0;
  y += copy_row * n + col0;
  allow_dependents();
  wait_for_producer();

  // Pass 0: columns 16t .. 16t + 15, contiguous.
  float v[16];
  load8(x + 16 * t, *reinterpret_cast<float (*)[8]>(v));
  load8(x + 16 * t + 8, *reinterpret_cast<float (*)[8]>(v + 8));
  if (in_scale != nullptr) {
    float s[16];
    const float* sc = in_scale + (int64_t)copy * n + col0 + 16 * t;
    load8(sc, *reinterpret_cast<float (*)[8]>(s));
    load8(sc + 8, *reinterpret_cast<float (*)[8]>(s + 8));
#pragma unroll
    for (int i = 0; i < 16; ++i) v[i] *= s[i];
  }
  butterflies<16>(v);
  // syl16_slot(16t + 4q): granule q ^ ((t >> 1) & 3) of 16t ^ bit 8 into 4.
  const int tb4 = (t >> 4) & 1;
  const int row0 = (16 * t) ^ (tb4 << 4), gsw = (t >> 1) & 3;
#pragma unroll
  for (int q = 0; q < 4; ++q)
    *reinterpret_cast<float4*>(X + row0 + 4 * (q ^ gsw)) =
        make_float4(v[4 * q], v[4 * q + 1], v[4 * q + 2], v[4 * q + 3]);
  __syncthreads();

  // Pass 1: bits 4-7; each thread reads and rewrites its own 16 slots,
  // syl16_slot(((t >> 4) << 8) | (i << 4) | (t & 15)) = base[i & 7] + 16 i
  // (i's bits 1-2 pick the XOR into t's bits 2-3, its bit 0 the sign of
  // bit 8's XOR into bit 4), so the loads and stores take immediates.
  int base1[8];
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    const int c = (j >> 1) & 3, odd = j & 1;
    base1[j] = ((t >> 4) << 8) + ((t & 15) ^ (c << 2)) + (odd ? -16 : 16) * tb4;
  }
#pragma unroll
  for (int i = 0; i < 16; ++i) v[i] = X[base1[i & 7] + 16 * i];
  butterflies<16>(v);
#pragma unroll
  for (int i = 0; i < 16; ++i) X[base1[i & 7] + 16 * i] = v[i];
  __syncthreads();

  // Pass 2: bits 8-11; column 256 i + t (coalesced stores), whose slot is
  // 256 i + (u ^ 16 (i & 1)) with u = t ^ (bits 5-6 of t into bits 2-3).
  const int u = t ^ (((t >> 5) & 3) << 2);
  const int base2[2] = {u, u ^ 16};
#pragma unroll
  for (int i = 0; i < 16; ++i) v[i] = X[base2[i & 1] + 256 * i];
  butterflies<16>(v);
#pragma unroll
  for (int i = 0; i < 16; ++i) {
    const int e = 256 * i + t;
    float val = v[i] * mult;
    if (out_scale != nullptr) val *= out_scale[col0 + e];
    y[e] = from_float<OutT>(val);
  }
}

// Hadamard blocks of K x 512 columns with 1 < K <= 32 (14336 = 28 x 512,
// Llama-3's MLP) at many rows take a kernel of their own: one CTA per (row,
// block, copy) does the whole transform in one pass over shared memory,
// X[k][p] = x[k * 512 + p] (32 rows; K.. stay zero):
//  1. the Sylvester part over p for every k: radix-16 register passes on 16
//     consecutive columns (bits 0-3), then radix-32 on 32 columns 16 apart
//     (bits 4-8);
//  2. H_K on the tensor cores, each warp for its two 16-column tiles:
//     Y^T (16 x 32) = X^T (16 x 32) * Hm^T (32 x 32), mma.sync m16n8k8 in
//     tf32, H_K's +-1 entries exact and X in two tf32 pieces (hi + lo, ~23
//     bits: fp32's accuracy; both pieces sum into one accumulator);
//  3. the scales, 8 consecutive columns per thread.
// The dense path otherwise runs a Sylvester kernel and a batched cuBLAS GEMM
// (~200 us per 14336 x 2048, H200), and qtip_hadamard_kernel's own H_K step
// ~116 instructions per element (ncu, 2048 rows).
constexpr int kHk512P = 512;
constexpr int kHk512MaxK = 32;
constexpr int kHk512Threads = 512;
// Row stride of X: 8 mod 32 banks, so the A fragments' rows q and columns g
// hit 32 distinct banks.
constexpr int kHk512Stride = kHk512P + 8;
// Hm^T as tf32 B operands, rows of 40: 8 mod 32 again.
constexpr int kHk512HStride = kHk512MaxK + 8;
constexpr int kHk512Smem =
    (kHk512MaxK * kHk512Stride + kHk512MaxK * kHk512HStride) * 4;
// Rows (times copies) from which it is taken: above the two-launch range,
// so also on the fused path's output side (split-K partials) at 33-127
// rows, where qtip_hadamard_kernel gives a 14336-column row to 4 CTAs that
// each re-read its partials and redo its Sylvester part.
constexpr int64_t kHk512MinRows = kHadTwoLaunchMaxRows + 1;
// On the input side (no partials) from two rows (one row of a whole-row
// block is the GEMM's own input): one CTA per row block in place of the two
// launches.
constexpr int64_t kHk512InMinRows = 2;

// X's slot of column p: its 16-byte granule (bits 2-3) XORed with bits 5-6,
// so the first pass's 16-byte stores are free of bank conflicts.
__device__ __forceinline__ int hk512_slot(int p) {
  return p ^ (((p >> 5) & 3) << 2);
}

__device__ __forceinline__ uint32_t to_tf32(float v) {
  uint32_t r;
  asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(v));
  return r;
}

// acc += A (16 x 8) * B (8 x 8), tf32 in, fp32 sums.
__device__ __forceinline__ void mma_tf32(float (&acc)[4],
                                         const uint32_t (&a)[4], uint32_t b0,
                                         uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0, %1, %2, %3}, "
      "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
      : "+f"(acc[0]), "+f"(acc[1]), "+f"(acc[2]), "+f"(acc[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// One CTA per (row, block, copy) = (blockIdx.x, .y, .z); scales as
// qtip_hadamard_kernel (in_scale row `copy`, then mult and out_scale).
template <typename InT, typename OutT>
__global__ void __launch_bounds__(kHk512Threads, 2)
    qtip_hk512_kernel(const InT* __restrict__ x,
                      const float* __restrict__ in_scale,
                      const float* __restrict__ out_scale,
                      const float* __restrict__ had, OutT* __restrict__ y,
                      int rows, int n, int K, bool transpose, float mult,
                      int in_splits) {
  extern __shared__ __align__(16) float X[];
  uint32_t* Hs = reinterpret_cast<uint32_t*>(X + kHk512MaxK * kHk512Stride);
  const int64_t split_stride = (int64_t)rows * n;
  const int row = blockIdx.x, col0 = blockIdx.y * K * kHk512P;
  const int copy = blockIdx.z;
  const int t = threadIdx.x, warp = t >> 5, lane = t & 31;
  x += (int64_t)row * n + col0;
  y += ((int64_t)copy * rows + row) * n + col0;
  allow_dependents();
  // Hs[k][r] = Hm[r][k] (Hm = H_K, or H_K^T when transpose), zero past K,
  // and X's rows K.. zero: weights and constants, so before the wait.
  for (int i = t; i < kHk512MaxK * kHk512MaxK; i += kHk512Threads) {
    const int k = i / kHk512MaxK, r = i % kHk512MaxK;
    const float h =
        k < K && r < K ? (transpose ? had[k * K + r] : had[r * K + k]) : 0.f;
    Hs[k * kHk512HStride + r] = to_tf32(h);
  }
  for (int i = K * kHk512Stride + t; i < kHk512MaxK * kHk512Stride;
       i += kHk512Threads)
    X[i] = 0.f;
  wait_for_producer();

  // 1a. Columns 16j .. 16j + 15 of row k, contiguous (coalesced loads).
  for (int item = t; item < K * 32; item += kHk512Threads) {
    const int k = item >> 5, j = item & 31;
    const int col = k * kHk512P + 16 * j;
    float v[16];
    load8(x + col, *reinterpret_cast<float (*)[8]>(v));
    load8(x + col + 8, *reinterpret_cast<float (*)[8]>(v + 8));
    // Split-K partial sums (the fused GEMM's output, fp32), added in split
    // order.
#pragma unroll 1
    for (int sp = 1; sizeof(InT) == 4 && sp < in_splits; ++sp) {
      float w[16];
      load8(x + sp * split_stride + col, *reinterpret_cast<float (*)[8]>(w));
      load8(x + sp * split_stride + col + 8,
            *reinterpret_cast<float (*)[8]>(w + 8));
#pragma unroll
      for (int i = 0; i < 16; ++i) v[i] += w[i];
    }
    if (in_scale != nullptr) {
      float sc[16];
      const float* s = in_scale + (int64_t)copy * n + col0 + col;
      load8(s, *reinterpret_cast<float (*)[8]>(sc));
      load8(s + 8, *reinterpret_cast<float (*)[8]>(sc + 8));
#pragma unroll
      for (int i = 0; i < 16; ++i) v[i] *= sc[i];
    }
    butterflies<16>(v);
    float* dst = X + k * kHk512Stride + 16 * j;
    const int sw = (j >> 1) & 3;
#pragma unroll
    for (int q = 0; q < 4; ++q)
      *reinterpret_cast<float4*>(dst + 4 * (q ^ sw)) =
          make_float4(v[4 * q], v[4 * q + 1], v[4 * q + 2], v[4 * q + 3]);
  }
  __syncthreads();

  // 1b. Columns 16i + jj, i < 32, of row k; a warp's two half-warps take
  // rows two apart (16 banks apart: no conflicts).
  {
    const int k = 4 * (warp >> 1) + (warp & 1) + 2 * (lane >> 4);
    const int jj = lane & 15;
    if (k < K) {
      float* src = X + k * kHk512Stride;
      float v[32];
#pragma unroll
      for (int i = 0; i < 32; ++i)
        v[i] = src[16 * i + (jj ^ (((i >> 1) & 3) << 2))];
      butterflies<32>(v);
#pragma unroll
      for (int i = 0; i < 32; ++i)
        src[16 * i + (jj ^ (((i >> 1) & 3) << 2))] = v[i];
    }
  }
  __syncthreads();

  // 2. H_K: this warp's 16-column tiles p0 = 16 * warp and 256 + 16 * warp.
  // Lane (g, q) holds A rows (columns p) g, g + 8 and k q, q + 4 of each k8
  // step; C rows g, g + 8 and n (outputs r) 2q, 2q + 1 of each n8 tile.
  const int g = lane >> 2, q = lane & 3;
#pragma unroll 1
  for (int tile = 0; tile < 2; ++tile) {
    const int p0 = 16 * warp + 256 * tile;
    const int s0 = hk512_slot(p0 + g), s1 = hk512_slot(p0 + g + 8);
    float acc[4][4] = {};
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
      const float* r0 = X + (8 * kk + q) * kHk512Stride;
      const float* r4 = r0 + 4 * kHk512Stride;
      const float a[4] = {r0[s0], r0[s1], r4[s0], r4[s1]};
      // hi: the value rounded to tf32; lo: the exact rest, rounded to tf32
      // (0 for infinities, which hi carries).
      uint32_t hi[4], lo[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        hi[i] = to_tf32(a[i]);
        lo[i] = to_tf32(isinf(a[i]) ? 0.f : a[i] - __uint_as_float(hi[i]));
      }
      const uint32_t* h0 = Hs + (8 * kk + q) * kHk512HStride + g;
      const uint32_t* h4 = h0 + 4 * kHk512HStride;
#pragma unroll
      for (int nt = 0; nt < 4; ++nt) {
        mma_tf32(acc[nt], hi, h0[8 * nt], h4[8 * nt]);
        mma_tf32(acc[nt], lo, h0[8 * nt], h4[8 * nt]);
      }
    }
    __syncwarp();  // every lane has read the tile before it is rewritten
#pragma unroll
    for (int nt = 0; nt < 4; ++nt) {
      float* r0 = X + (8 * nt + 2 * q) * kHk512Stride;
      r0[s0] = acc[nt][0];
      r0[kHk512Stride + s0] = acc[nt][1];
      r0[s1] = acc[nt][2];
      r0[kHk512Stride + s1] = acc[nt][3];
    }
  }
  __syncthreads();

  // 3. Output r * 512 + p .. + 7: two 16-byte granules of X's row r.
  for (int i = t; i < K * (kHk512P / 8); i += kHk512Threads) {
    const int r = i / (kHk512P / 8), p = (i % (kHk512P / 8)) * 8;
    const float* src = X + r * kHk512Stride;
    const float4 lo4 = *reinterpret_cast<const float4*>(src + hk512_slot(p));
    const float4 hi4 =
        *reinterpret_cast<const float4*>(src + hk512_slot(p + 4));
    float v[8] = {lo4.x, lo4.y, lo4.z, lo4.w, hi4.x, hi4.y, hi4.z, hi4.w};
    const int e = r * kHk512P + p;
#pragma unroll
    for (int j = 0; j < 8; ++j) v[j] *= mult;
    if (out_scale != nullptr) {
      float sc[8];
      load8(out_scale + col0 + e, sc);
#pragma unroll
      for (int j = 0; j < 8; ++j) v[j] *= sc[j];
    }
    store8(y + e, v);
  }
}

// Hadamard blocks of K x 64 columns with 32 < K <= 176 (11008 = 172 x 64,
// Llama-2-7B's MLP) in fp16 without an input scale (the dense path's output
// side: cuBLAS's fp16 products, exact in fp16) at many rows take a kernel of
// their own: H_K first, on fp16 tensor cores with no rounding (H_K's +-1
// entries, as every QTIP H_K has, times fp16, fp32 sums), then the 64-point
// Sylvester part in registers.
// Y (KP x 64) = Hm (KP x KP) * X (KP x 64), KP = K rounded up to 16: warp w
// owns rows 16w .. 16w + 15 of Y, keeps its A fragments (its rows of Hm) in
// registers for the whole launch and reads X's B fragments with
// ldmatrix.trans. The CTAs (one per SM) are persistent over (row, block)
// items, each row block staged by cp.async one item ahead (two buffers).
constexpr int kHk64P = 64;
constexpr int kHk64MaxKTiles = 11;  // K <= 176
constexpr int kHk64MinK = 33;
// X row stride in halves: 144 bytes, so ldmatrix's 8 rows of 16 bytes hit
// 32 distinct banks.
constexpr int kHk64Stride = kHk64P + 8;
constexpr int kHk64BufBytes = kHk64MaxKTiles * 16 * kHk64Stride * 2;
constexpr int kHk64Smem = 2 * kHk64BufBytes;

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t smem_addr,
                                                  uint32_t (&r)[4]) {
  asm volatile(
      "ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, "
      "[%4];"
      : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
      : "r"(smem_addr));
}

__device__ __forceinline__ uint32_t pack_half2(float lo, float hi) {
  const __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&h);
}

// This warp's rows 16w .. 16w + 15 of Hm (H_K, or H_K^T when transpose),
// zero past K, as m16n8k16 A fragments: a[kt] = rows g, g + 8 x columns 2q,
// 2q + 1, 2q + 8, 2q + 9 of k-tile kt.
__device__ __forceinline__ void hk64_load_a(uint32_t (&a)[kHk64MaxKTiles][4],
                                            const float* __restrict__ had,
                                            int K, bool transpose, int warp,
                                            int lane) {
  const int g = lane >> 2, q = lane & 3;
  auto hm = [&](int r, int k) {
    return r < K && k < K ? (transpose ? had[k * K + r] : had[r * K + k]) : 0.f;
  };
#pragma unroll
  for (int kt = 0; kt < kHk64MaxKTiles; ++kt) {
    const int r = 16 * warp + g, k = 16 * kt + 2 * q;
    a[kt][0] = pack_half2(hm(r, k), hm(r, k + 1));
    a[kt][1] = pack_half2(hm(r + 8, k), hm(r + 8, k + 1));
    a[kt][2] = pack_half2(hm(r, k + 8), hm(r, k + 9));
    a[kt][3] = pack_half2(hm(r + 8, k + 8), hm(r + 8, k + 9));
  }
}

// acc[nt] += this warp's rows of Hm times n-tile nt of the X buffer at
// shared address xb (this lane's ldmatrix.trans address of k-tile 0, n-tiles
// 0 and 1: lane l gives row l & 7 of matrix l >> 3, k + 8 for matrices 1
// and 3, p + 8 for 2 and 3).
__device__ __forceinline__ void hk64_mma(float (&acc)[8][4],
                                         const uint32_t (&a)[kHk64MaxKTiles][4],
                                         uint32_t xb, int ktiles) {
#pragma unroll
  for (int kt = 0; kt < kHk64MaxKTiles; ++kt) {
    if (kt < ktiles) {  // warp-uniform
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        uint32_t b[4];
        ldmatrix_x4_trans(xb + kt * 16 * (kHk64Stride * 2) + j * 32, b);
        mma_16816(acc[2 * j], a[kt], b[0], b[1]);
        mma_16816(acc[2 * j + 1], a[kt], b[2], b[3]);
      }
    }
  }
}

// This lane's ldmatrix.trans offset within an X buffer (see hk64_mma).
__device__ __forceinline__ uint32_t hk64_lane_offset(int lane) {
  return ((lane & 7) + 8 * ((lane >> 3) & 1)) * (kHk64Stride * 2) +
         8 * (lane >> 4) * 2;
}

// Zeroes rows K .. 16 * ceil(K / 16) - 1 of an X buffer (0 times the padded
// columns of Hm: no stale NaN).
__device__ __forceinline__ void hk64_zero_pad(char* buf, int K) {
  const int kp = (K + 15) / 16 * 16;
  for (int i = threadIdx.x; i < (kp - K) * kHk64Stride / 2; i += blockDim.x)
    *reinterpret_cast<uint32_t*>(buf + K * kHk64Stride * 2 + i * 4) = 0u;
}

// Stores an item's K x 64 outputs, v[nt][2 h + e] of row 16 warp + g + 8 h,
// column 8 nt + 2 q + e (already scaled), to its K * 64 consecutive elements
// at dst, through `tile` (a free X buffer, rows of kHk64Stride halves: the
// fragments' 4-byte writes hit 32 banks): the fragments alone would store 4
// bytes per lane in 16-byte runs of 8 rows; from the tile every lane stores
// 16 bytes of a whole 128-byte row. The caller has a barrier between the
// last read of the tile's buffer and this, and one after it before the
// buffer is refilled. dst is 16-byte aligned (a fresh output, n a multiple
// of 64).
template <typename OutT>
__device__ __forceinline__ void hk64_store_item(const float (&v)[8][4],
                                                char* tile, OutT* dst, int K,
                                                int warp, int g, int q) {
  static_assert(sizeof(OutT) == 2);
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int r = 16 * warp + g + 8 * h;
    if (r >= K) continue;
#pragma unroll
    for (int nt = 0; nt < 8; ++nt) {
      const OutT pair[2] = {from_float<OutT>(v[nt][2 * h]),
                            from_float<OutT>(v[nt][2 * h + 1])};
      *reinterpret_cast<uint32_t*>(tile + r * (kHk64Stride * 2) +
                                   (8 * nt + 2 * q) * 2) =
          *reinterpret_cast<const uint32_t*>(pair);
    }
  }
  __syncthreads();
  for (int c = threadIdx.x; c < K * 8; c += blockDim.x)
    *reinterpret_cast<uint4*>(dst + c * 8) = *reinterpret_cast<const uint4*>(
        tile + (c >> 3) * (kHk64Stride * 2) + (c & 7) * 16);
}

// A persistent CTA's items blockIdx.x, + gridDim.x, ... with the next one's
// loads in flight: stage(item, b) issues an item's cp.async loads into
// buffer b (of two) and commits them; body(item, b) runs once they have
// landed and leaves buffer b (a barrier) before the next item's loads go
// there.
template <typename Stage, typename Body>
__device__ __forceinline__ void for_each_staged_item(int items, Stage& stage,
                                                     Body&& body) {
  if ((int)blockIdx.x < items) stage((int)blockIdx.x, 0);
  int buf = 0;
  for (int item = blockIdx.x; item < items; item += gridDim.x, buf ^= 1) {
    if (item + (int)gridDim.x < items)
      stage(item + (int)gridDim.x, buf ^ 1);
    else
      asm volatile("cp.async.commit_group;");  // keeps the count
    asm volatile("cp.async.wait_group 1;" ::: "memory");
    __syncthreads();
    body(item, buf);
  }
}

// y (rows, n) = the blocks of x (rows, n) fp16 transformed, times mult and
// out_scale; items = rows * (n / (K * 64)). With InT = float, x holds
// `splits` fp32 partial sums (splits, rows, n), added in split order and
// rounded to fp16 as they are staged (the fused path's output side, at the
// dense path's numerics: its product rounded to fp16 as cuBLAS's output).
template <typename InT, typename OutT>
__global__ void __launch_bounds__(kHk64MaxKTiles * 32, 1)
    qtip_hk64_kernel(const InT* __restrict__ x,
                     const float* __restrict__ out_scale,
                     const float* __restrict__ had, OutT* __restrict__ y,
                     int rows, int n, int K, bool transpose, float mult,
                     int splits) {
  extern __shared__ __align__(16) char smem[];
  const int t = threadIdx.x, warp = t >> 5, lane = t & 31;
  const int g = lane >> 2, q = lane & 3;
  const int ktiles = (K + 15) / 16;  // = the warps
  const int block = K * kHk64P, per_row = n / block;
  const int items = rows * per_row;
  allow_dependents();
  // This warp's rows of Hm, a weight: loaded before the wait.
  uint32_t a[kHk64MaxKTiles][4];
  hk64_load_a(a, had, K, transpose, warp, lane);
  // X's padded rows stay zero in both buffers.
  hk64_zero_pad(smem, K);
  hk64_zero_pad(smem + kHk64BufBytes, K);
  const uint32_t smem_addr =
      static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  // Item i's row block into buffer b: K rows of 8 16-byte pieces (fp16 by
  // cp.async; fp32 partials summed and rounded by the threads, an empty
  // cp.async group keeping the count).
  auto stage = [&](int i, int b) {
    const InT* src =
        x + (int64_t)(i / per_row) * n + (int64_t)(i % per_row) * block;
    for (int c = t; c < K * 8; c += blockDim.x) {
      const uint32_t off = (c >> 3) * (kHk64Stride * 2) + (c & 7) * 16;
      const InT* piece = src + (c >> 3) * kHk64P + (c & 7) * 8;
      if constexpr (std::is_same_v<InT, float>) {
        // kSplitLoads splits' loads in flight, added in split order.
        const int64_t split_stride = (int64_t)rows * n;
        float v[8];
        load8(piece, v);
        for (int sp0 = 1; sp0 < splits; sp0 += kSplitLoads) {
          float w[kSplitLoads][8];
#pragma unroll
          for (int q = 0; q < kSplitLoads; ++q)
            if (sp0 + q < splits) load8(piece + (sp0 + q) * split_stride, w[q]);
#pragma unroll
          for (int q = 0; q < kSplitLoads; ++q)
            if (sp0 + q < splits) {
#pragma unroll
              for (int j = 0; j < 8; ++j) v[j] += w[q][j];
            }
        }
        uint4 u;
        uint32_t* h = reinterpret_cast<uint32_t*>(&u);
#pragma unroll
        for (int j = 0; j < 4; ++j) h[j] = pack_half2(v[2 * j], v[2 * j + 1]);
        *reinterpret_cast<uint4*>(smem + b * kHk64BufBytes + off) = u;
      } else {
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(
                         smem_addr + b * kHk64BufBytes + off),
                     "l"(piece));
      }
    }
    asm volatile("cp.async.commit_group;");
  };
  const uint32_t lane_off = hk64_lane_offset(lane);
  float2 sv[2][8];
  int sv_col0 = -1;
  wait_for_producer();

  for_each_staged_item(items, stage, [&](int item, int buf) {
    float acc[8][4] = {};
    hk64_mma(acc, a, smem_addr + buf * kHk64BufBytes + lane_off, ktiles);
    // Every warp is done with buf's values: it takes the outputs next (or,
    // for fp32 outputs, the next item's loads).
    __syncthreads();

    // Sylvester over p = 8 nt + 2q + e, in place, for rows g (acc[nt][e])
    // and g + 8 (acc[nt][2 + e]): bits 0 (e) and 3-5 (nt) in registers, bits
    // 1-2 (q) across lanes.
#pragma unroll
    for (int i = 0; i < 4; ++i) {  // bit 0: e = i & 1
#pragma unroll
      for (int nt = 0; nt < 8; ++nt) {
        if (i & 1) continue;
        const float a0 = acc[nt][i], a1 = acc[nt][i + 1];
        acc[nt][i] = a0 + a1;
        acc[nt][i + 1] = a0 - a1;
      }
    }
#pragma unroll
    for (int hb = 1; hb < 8; hb <<= 1)  // bits 3-5: nt
#pragma unroll
      for (int nt = 0; nt < 8; ++nt) {
        if (nt & hb) continue;
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const float a0 = acc[nt][i], a1 = acc[nt + hb][i];
          acc[nt][i] = a0 + a1;
          acc[nt + hb][i] = a0 - a1;
        }
      }
#pragma unroll
    for (int m = 1; m <= 2; m <<= 1) {  // bits 1-2: q
      const bool upper = (q & m) != 0;
#pragma unroll
      for (int nt = 0; nt < 8; ++nt)
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const float other = __shfl_xor_sync(0xffffffffu, acc[nt][i], m);
          acc[nt][i] = upper ? other - acc[nt][i] : acc[nt][i] + other;
        }
    }
    const int64_t row = item / per_row;
    const int col0 = (item % per_row) * block;
    if (out_scale != nullptr && col0 != sv_col0) {
      // This thread's 32 columns of SV, the same for every row: loaded
      // again only when the item's block changes.
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int r = min(16 * warp + g + 8 * h, K - 1);
#pragma unroll
        for (int nt = 0; nt < 8; ++nt)
          sv[h][nt] = *reinterpret_cast<const float2*>(
              out_scale + col0 + r * kHk64P + 2 * q + 8 * nt);
      }
      sv_col0 = col0;
    }
#pragma unroll
    for (int h = 0; h < 2; ++h)
#pragma unroll
      for (int nt = 0; nt < 8; ++nt) {
        float v0 = acc[nt][2 * h] * mult, v1 = acc[nt][2 * h + 1] * mult;
        if (out_scale != nullptr) {
          v0 *= sv[h][nt].x;
          v1 *= sv[h][nt].y;
        }
        acc[nt][2 * h] = v0;
        acc[nt][2 * h + 1] = v1;
      }
    OutT* dst = y + row * n + col0;
    if constexpr (sizeof(OutT) == 2) {
      hk64_store_item(acc, smem + buf * kHk64BufBytes, dst, K, warp, g, q);
      __syncthreads();  // buf is refilled next
    } else {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int r = 16 * warp + g + 8 * h;
        if (r >= K) continue;
#pragma unroll
        for (int nt = 0; nt < 8; ++nt)
          *reinterpret_cast<float2*>(dst + r * kHk64P + 2 * q + 8 * nt) =
              make_float2(acc[nt][2 * h], acc[nt][2 * h + 1]);
      }
    }
  });
  asm volatile("cp.async.wait_group 0;" ::: "memory");
}

// The dense path's input side of the same blocks: x (rows, n) bf16 or fp16
// times SU (copies, n), the Sylvester part in fp32, scaled by mult_pre and
// rounded to fp16 (at x~'s own scale, as the cuBLAS route it replaces), then
// Hm on the fp16 tensor cores as above, times mult_post, fp16 out (copies,
// rows, n). Each item's raw row block is staged by cp.async one item ahead;
// the Sylvester part goes from there into the one X buffer.
constexpr int kHk64RawBytes = kHk64MaxKTiles * 16 * kHk64P * 2;
constexpr int kHk64InSmem = 2 * kHk64RawBytes + kHk64BufBytes;
// Rows (times copies) from which the input side takes it, on the fused path
// too: one CTA per row block, against several blocks per row that each
// reload the row and redo its Sylvester part (qtip_hadamard_kernel). One row
// of a whole-row block is the GEMM's own input.
constexpr int64_t kHk64InMinRows = 2;
// Rows from which the fused path's output side takes qtip_hk64_kernel with
// its split-K partials (one_pass_output).
constexpr int64_t kHk64OutMinRows = 2;

template <typename InT>
__global__ void __launch_bounds__(kHk64MaxKTiles * 32, 1)
    qtip_hk64_in_kernel(const InT* __restrict__ x,
                        const float* __restrict__ in_scale,
                        const float* __restrict__ had, __half* __restrict__ y,
                        int rows, int n, int K, int copies, bool transpose,
                        float mult_pre, float mult_post) {
  static_assert(sizeof(InT) == 2);
  extern __shared__ __align__(16) char smem[];
  char* X = smem + 2 * kHk64RawBytes;
  const int t = threadIdx.x, warp = t >> 5, lane = t & 31;
  const int g = lane >> 2, q = lane & 3;
  const int ktiles = (K + 15) / 16;  // = the warps
  const int block = K * kHk64P, per_row = n / block;
  const int per_copy = rows * per_row, items = copies * per_copy;
  allow_dependents();
  uint32_t a[kHk64MaxKTiles][4];
  hk64_load_a(a, had, K, transpose, warp, lane);
  hk64_zero_pad(X, K);
  const uint32_t smem_addr =
      static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  // Item i = (copy, row, block)'s raw values into raw buffer b, as they lie
  // in x (K rows of 128 bytes).
  auto stage = [&](int i, int b) {
    const int rem = i % per_copy;
    const InT* src = x + (int64_t)(rem / per_row) * n + (rem % per_row) * block;
    for (int c = t; c < K * 8; c += blockDim.x)
      asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(
                       smem_addr + b * kHk64RawBytes + c * 16),
                   "l"(src + c * 8));
    asm volatile("cp.async.commit_group;");
  };
  const uint32_t xb = smem_addr + 2 * kHk64RawBytes + hk64_lane_offset(lane);
  wait_for_producer();

  for_each_staged_item(items, stage, [&](int item, int buf) {
    const int copy = item / per_copy, rem = item % per_copy;
    const int row = rem / per_row, col0 = (rem % per_row) * block;

    // Sylvester over p = 8s + j of row k: task (k, s) holds j = 0..7 (bits
    // 0-2 in registers); the 8 tasks of a row are lanes 8m .. 8m + 7 of one
    // warp (bits 3-5 by shuffles). Lanes past the tasks take part in the
    // shuffles with zeros.
    const char* raw = smem + buf * kHk64RawBytes;
    const float* su = in_scale + (int64_t)copy * n + col0;
    for (int base = 0; base < K * 8; base += blockDim.x) {
      const int i = base + t, k = i >> 3, s = i & 7;
      const bool active = i < K * 8;
      float v[8] = {};
      if (active) {
        float sc[8];
        load8(reinterpret_cast<const InT*>(raw + i * 16), v);  // 16 bytes
        load8(su + i * 8, sc);
#pragma unroll
        for (int j = 0; j < 8; ++j) v[j] *= sc[j];
      }
      butterflies<8>(v);
#pragma unroll
      for (int m = 1; m < 8; m <<= 1) {
        const bool upper = (s & m) != 0;
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          const float other = __shfl_xor_sync(0xffffffffu, v[j], m);
          v[j] = upper ? other - v[j] : v[j] + other;
        }
      }
      if (active) {
        uint4 u;
        uint32_t* w = reinterpret_cast<uint32_t*>(&u);
#pragma unroll
        for (int j = 0; j < 4; ++j)
          w[j] = pack_half2(v[2 * j] * mult_pre, v[2 * j + 1] * mult_pre);
        *reinterpret_cast<uint4*>(X + k * (kHk64Stride * 2) + s * 16) = u;
      }
    }
    __syncthreads();

    float acc[8][4] = {};
    hk64_mma(acc, a, xb, ktiles);
#pragma unroll
    for (int nt = 0; nt < 8; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[nt][i] *= mult_post;
    __syncthreads();  // every warp is done with X: it takes the outputs
    hk64_store_item(acc, X, y + ((int64_t)copy * rows + row) * n + col0, K,
                    warp, g, q);
    __syncthreads();  // X and the raw buffer are refilled next
  });
  asm volatile("cp.async.wait_group 0;" ::: "memory");
}

}  // namespace kernels

namespace {

// Thread blocks of segment s (its len set): whole Hadamard blocks of b
// columns, up to about `target` columns each (at least one block). Sets its
// cta_cols and where the next segment's thread blocks start.
void set_cta_cols(kernels::HadSegments& segs, int s, int64_t b,
                  int64_t target) {
  const int64_t len = segs.len[s];
  const int64_t cta_cols = std::min(len / b, (target + b - 1) / b) * b;
  segs.cta_cols[s] = (int)cta_cols;
  segs.blk0[s + 1] = segs.blk0[s] + (int)((len + cta_cols - 1) / cta_cols);
}

// A per-column scale (n,); in_scale may also be (copies, n).
void check_scale(const std::optional<Tensor>& s, const char* name,
                 const Tensor& x, bool allow_copies) {
  if (!s.has_value()) return;
  const Tensor& t = *s;
  STD_TORCH_CHECK(t.is_cuda() && t.get_device_index() == x.get_device_index(),
                  "qtip_hadamard: ", name,
                  " must be on the device of x (cuda:", x.get_device_index(),
                  ")");
  STD_TORCH_CHECK(t.scalar_type() == ScalarType::Float, "qtip_hadamard: ", name,
                  " must be float32, got ", t.scalar_type());
  const bool ok =
      (t.dim() == 1 || (allow_copies && t.dim() == 2 && t.size(0) >= 1 &&
                        t.size(0) <= kMaxShards)) &&
      t.size(-1) == x.size(-1);
  STD_TORCH_CHECK(ok, "qtip_hadamard: ", name, " must have shape (", x.size(-1),
                  ",)", allow_copies ? " or (shards, n)" : "", ", got ",
                  shape(t));
  STD_TORCH_CHECK(t.is_contiguous(), "qtip_hadamard: ", name,
                  " must be contiguous");
  STD_TORCH_CHECK(reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0,
                  "qtip_hadamard: ", name, " data must be 16-byte aligned");
}

// Launch arguments shared by every dtype instantiation.
struct HadArgs {
  const void* x;
  const float* in_scale;
  const float* out_scale;
  const float* had;
  void* y;
  int copies, rows, n, K;
  kernels::HadSegments segs;
  bool transpose;
  int rchunk, p_splits, ksplit, threads, smem;
  int in_splits;
  bool presummed;
  bool sylvester4096;  // qtip_sylvester4096_kernel (see there)
  bool hk512;          // qtip_hk512_kernel (see there)
  bool hk64;           // qtip_hk64_kernel (see there)
};

// Launch shape of both K x 64 kernels over `items` row blocks: persistent,
// one CTA per SM (their 113-168 registers per thread leave room for one),
// one warp per 16 rows of H_K.
struct Hk64Shape {
  dim3 grid, threads;
};
Hk64Shape hk64_shape(int64_t items, int64_t K) {
  const int64_t grid =
      std::min<int64_t>(items, get_device_prop()->multiProcessorCount);
  return {dim3((unsigned)grid), dim3((unsigned)(32 * ((K + 15) / 16)))};
}

// qtip_hk64_kernel over rows x (n / (K * 64)) row blocks.
template <typename InT, typename OutT>
void launch_hk64(const InT* x, const float* out_scale, const float* had,
                 OutT* y, int rows, int n, int K, bool transpose, float mult,
                 int splits, cudaStream_t stream) {
  auto kernel = kernels::qtip_hk64_kernel<InT, OutT>;
  static DeviceFlags smem_set;
  ensure_max_dynamic_smem(kernel, smem_set);
  const int64_t items = (int64_t)rows * (n / (K * kernels::kHk64P));
  if (items == 0) return;
  const Hk64Shape shape = hk64_shape(items, K);
  launch_dependent(kernel, shape.grid, shape.threads, kernels::kHk64Smem,
                   stream, x, out_scale, had, y, rows, n, K, transpose, mult,
                   splits);
}

template <typename InT, typename OutT>
void launch_hadamard(const HadArgs& a, cudaStream_t stream) {
  if (a.sylvester4096) {
    launch_dependent(
        kernels::qtip_sylvester4096_kernel<InT, OutT>,
        dim3((unsigned)a.rows, (unsigned)(a.n / kernels::kSyl16Cols),
             (unsigned)a.copies),
        dim3(kernels::kSyl16Threads), 0, stream,
        reinterpret_cast<const InT*>(a.x), a.in_scale, a.out_scale,
        reinterpret_cast<OutT*>(a.y), a.rows, a.n, a.segs.mult[0]);
    return;
  }
  if (a.hk512) {
    auto kernel = kernels::qtip_hk512_kernel<InT, OutT>;
    static DeviceFlags smem_set;
    ensure_max_dynamic_smem(kernel, smem_set);
    launch_dependent(
        kernel,
        dim3((unsigned)a.rows, (unsigned)(a.n / (a.K * kernels::kHk512P)),
             (unsigned)a.copies),
        dim3(kernels::kHk512Threads), kernels::kHk512Smem, stream,
        reinterpret_cast<const InT*>(a.x), a.in_scale, a.out_scale, a.had,
        reinterpret_cast<OutT*>(a.y), a.rows, a.n, a.K, a.transpose,
        a.segs.mult[0], a.in_splits);
    return;
  }
  if constexpr (std::is_same_v<InT, __half>) {
    if (a.hk64) {
      launch_hk64(reinterpret_cast<const __half*>(a.x), a.out_scale, a.had,
                  reinterpret_cast<OutT*>(a.y), a.rows, a.n, a.K, a.transpose,
                  a.segs.mult[0], 1, stream);
      return;
    }
  }
  auto kernel = kernels::qtip_hadamard_kernel<InT, OutT>;
  static DeviceFlags smem_set;
  ensure_max_dynamic_smem(kernel, smem_set);
  const int rchunks = a.K > 1 ? (a.K + a.rchunk - 1) / a.rchunk : 1;
  dim3 grid((unsigned)((int64_t)a.copies * a.rows * a.segs.blk0[a.segs.count]),
            (unsigned)(rchunks * a.p_splits));
  launch_dependent(kernel, grid, dim3(a.threads), a.smem, stream,
                   reinterpret_cast<const InT*>(a.x), a.in_scale, a.out_scale,
                   a.had, reinterpret_cast<OutT*>(a.y), a.rows, a.n, a.segs,
                   a.K, a.transpose, a.rchunk, a.p_splits, a.ksplit,
                   a.in_splits, a.presummed);
}

template <typename InT>
void dispatch_out(ScalarType out_dtype, const HadArgs& a, cudaStream_t stream) {
  switch (out_dtype) {
    case ScalarType::Half:
      return launch_hadamard<InT, __half>(a, stream);
    case ScalarType::BFloat16:
      return launch_hadamard<InT, __nv_bfloat16>(a, stream);
    default:
      return launch_hadamard<InT, float>(a, stream);
  }
}

void dispatch(ScalarType in_dtype, ScalarType out_dtype, const HadArgs& a,
              cudaStream_t stream) {
  switch (in_dtype) {
    case ScalarType::Half:
      return dispatch_out<__half>(out_dtype, a, stream);
    case ScalarType::BFloat16:
      return dispatch_out<__nv_bfloat16>(out_dtype, a, stream);
    default:
      return dispatch_out<float>(out_dtype, a, stream);
  }
}

// Hadamard blocks of K x 64 with 32 < K <= 176 (the K x 64 kernels').
bool hk64_blocks(int64_t K, int64_t block) {
  return K >= kernels::kHk64MinK && K <= 16 * kernels::kHk64MaxKTiles &&
         block == K * kernels::kHk64P;
}

// Blocks of K x 512 with 1 < K <= 32 (Llama-3's 14336 = 28 x 512): the ones
// qtip_hk512_kernel transforms in one pass.
bool hk512_blocks(int64_t K, int64_t block) {
  return K > 1 && K <= kernels::kHk512MaxK && block == K * kernels::kHk512P;
}

}  // namespace

bool hadamard_one_pass(int64_t K, int64_t block, int64_t rows) {
  if (hk512_blocks(K, block)) return rows >= kernels::kHk512MinRows;
  // K x 64 blocks take it on the dense path's fp16 output, as the radix-16
  // kernel from the prefill GEMM's rows on.
  return hk64_blocks(K, block) && rows >= kernels::kSyl16MinRows;
}

bool output_one_pass(int64_t K, int64_t block, int64_t rows) {
  return hk64_blocks(K, block) && rows >= kernels::kHk64OutMinRows;
}

bool input_one_pass(int64_t K, int64_t block, int64_t rows) {
  if (hk64_blocks(K, block)) return rows >= kernels::kHk64InMinRows;
  return hk512_blocks(K, block) && rows >= kernels::kHk512InMinRows;
}

int64_t check_had_factor(const std::optional<Tensor>& had_k, const Tensor& x,
                         const char* op) {
  if (!had_k.has_value()) return 1;
  const Tensor& h = *had_k;
  STD_TORCH_CHECK(h.is_cuda() && h.get_device_index() == x.get_device_index(),
                  op, ": the H_K factor must be on the device of x (cuda:",
                  x.get_device_index(), ")");
  STD_TORCH_CHECK(h.scalar_type() == ScalarType::Float, op,
                  ": the H_K factor must be float32, got ", h.scalar_type());
  STD_TORCH_CHECK(h.dim() == 2 && h.size(0) == h.size(1) && h.size(0) > 1, op,
                  ": the H_K factor must be square (K, K), got ", shape(h));
  STD_TORCH_CHECK(h.is_contiguous(), op, ": the H_K factor must be contiguous");
  return h.size(0);
}

Tensor qtip_hadamard(const Tensor& x, const std::optional<Tensor>& in_scale,
                     const std::optional<Tensor>& out_scale,
                     const std::optional<Tensor>& had_k, bool transpose,
                     const std::vector<int64_t>& block_sizes,
                     const std::vector<int64_t>& segment_sizes, double factor,
                     ScalarType out_dtype) {
  STD_TORCH_CHECK(x.is_cuda(), "qtip_hadamard: x must be a CUDA tensor");
  const auto in_dtype = x.scalar_type();
  STD_TORCH_CHECK(
      in_dtype == ScalarType::Half || in_dtype == ScalarType::BFloat16 ||
          in_dtype == ScalarType::Float,
      "qtip_hadamard: x must be float16, bfloat16 or float32, got ", in_dtype);
  STD_TORCH_CHECK(out_dtype == ScalarType::Half ||
                      out_dtype == ScalarType::BFloat16 ||
                      out_dtype == ScalarType::Float,
                  "qtip_hadamard: out_dtype must be float16, bfloat16 or "
                  "float32, got ",
                  out_dtype);
  STD_TORCH_CHECK(
      x.dim() == 2 || (x.dim() == 3 && in_dtype == ScalarType::Float),
      "qtip_hadamard: x must be 2-D (rows, n), or float32 split-K "
      "partial sums (splits, rows, n), got ",
      in_dtype, " ", shape(x));
  STD_TORCH_CHECK(x.is_contiguous(), "qtip_hadamard: x must be contiguous");
  STD_TORCH_CHECK(reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0,
                  "qtip_hadamard: x data must be 16-byte aligned");
  check_device_capability(x, "qtip_hadamard");
  const int64_t n = x.size(-1);
  const int64_t in_splits = x.dim() == 3 ? x.size(0) : 1;
  STD_TORCH_CHECK(in_splits >= 1, "qtip_hadamard: x has no splits, shape ",
                  shape(x));
  const int64_t K = check_had_factor(had_k, x, "qtip_hadamard");
  const float* had = had_k ? had_k->const_data_ptr<float>() : nullptr;
  STD_TORCH_CHECK(
      !segment_sizes.empty() && (int64_t)segment_sizes.size() <= kMaxShards &&
          block_sizes.size() == segment_sizes.size(),
      "qtip_hadamard: block_sizes ", join(block_sizes), " and segment_sizes ",
      join(segment_sizes), " must have the same length, 1 to ", kMaxShards);
  const torch::stable::accelerator::DeviceGuard guard(x.get_device_index());
  const cudaDeviceProp* prop = get_device_prop();
  const int64_t smem_limit = (int64_t)prop->sharedMemPerBlockOptin;
  // One transformed copy of x per row of a 2-D in_scale (per shard).
  const bool copies_out = in_scale.has_value() && in_scale->dim() == 2;
  const int64_t copies = copies_out ? in_scale->size(0) : 1;
  const int64_t rows = x.size(-2);
  // With H_K, narrow blocks are grouped up to kHadHkMinCols columns per row of
  // H_K where the group and 8 rows of H_K fit in shared memory, from
  // kHadHkGroupMinRows rows on; below, one block per thread block keeps
  // enough thread blocks per row (K = 172 x 8 at one row: 32 against 6).
  const int64_t hk_target =
      copies * rows >= kernels::kHadHkGroupMinRows &&
              (K * kernels::kHadHkMinCols + 8 * K) * 4 <= smem_limit
          ? K * kernels::kHadHkMinCols
          : 0;
  kernels::HadSegments segs{};
  segs.count = (int)segment_sizes.size();
  int64_t col = 0, max_cols = 0, min_P = std::numeric_limits<int64_t>::max();
  for (int s = 0; s < segs.count; ++s) {
    const int64_t len = segment_sizes[s], b = block_sizes[s];
    STD_TORCH_CHECK(b > 0 && len > 0 && len % b == 0,
                    "qtip_hadamard: block_size=", b,
                    " must divide the segment size ", len, " (segment ", s,
                    " of the last dim of x)");
    STD_TORCH_CHECK(b % K == 0, "qtip_hadamard: block_size=", b,
                    " is not a multiple of the had_k size K=", K);
    const int64_t P = b / K;
    STD_TORCH_CHECK(P >= 8 && (P & (P - 1)) == 0,
                    "qtip_hadamard: block_size/K = ", b, "/", K, " = ", P,
                    " must be a power of two >= 8");
    int log2P = 0;
    while ((int64_t{1} << log2P) < P) ++log2P;
    segs.col[s] = (int)col;
    segs.len[s] = (int)len;
    // With H_K one block per thread block, or narrow ones grouped (see
    // kHadHkMinCols); powers of two: whole blocks up to kHadMinCtaCols
    // columns (a 64-column block alone would leave 56 of 64 threads idle).
    set_cta_cols(segs, s, b,
                 K > 1 ? std::max(b, hk_target) : kernels::kHadMinCtaCols);
    segs.log2P[s] = log2P;
    segs.mult[s] = (float)(factor / std::sqrt((double)b));
    col += len;
    max_cols = std::max<int64_t>(max_cols, segs.cta_cols[s]);
    min_P = std::min(min_P, P);
  }
  STD_TORCH_CHECK(col == n, "qtip_hadamard: segment_sizes ",
                  join(segment_sizes), " sum to ", col, ", but x has ", n,
                  " columns");
  check_scale(in_scale, "in_scale", x, true);
  check_scale(out_scale, "out_scale", x, false);

  const int sms = prop->multiProcessorCount;
  // Two launches where they measured faster (H200): K = 28 at 1-32 rows
  // (14336 columns, 16 rows: 14-26% faster layers). With K > 32 the one
  // launch already splits a row by rows of H_K, at most kHadMaxRowChunks
  // ways from 8 rows on, and two launches measured slower (K = 172, 16-32
  // rows: 18-48% slower layers).
  const bool two_launches = K > 1 && K <= kernels::kHadTwoLaunchMaxK &&
                            copies * rows <= kernels::kHadTwoLaunchMaxRows;
  // Rows of H_K per block: 32, or fewer when shared memory is tight. Every
  // block loads its row and redoes the Sylvester part, so for a large K,
  // once a few blocks per row fill the SMs, a row takes only as many
  // blocks as fill them, each with more rows of H_K (K = 172 at 64 rows:
  // two blocks of 88 rows instead of six of 32; ~30% faster layers), and
  // one block once the rows alone fill them (Llama-2's gate_up at 127 rows:
  // 254 row blocks, each loaded once instead of by six blocks of 32 rows).
  const int64_t row_blocks = copies * rows * segs.blk0[segs.count];
  int rchunk = 32;
  if (K > 32 && row_blocks > 0) {
    // From 8 rows on, at most 4 blocks per row: each one re-reads the row
    // (all its split-K partials on the output side), which costs more than
    // the H_K FMAs it shares out.
    const int64_t chunks = std::clamp<int64_t>(
        sms / row_blocks, 1, row_blocks >= 8 ? kernels::kHadMaxRowChunks : sms);
    const int64_t fat = ((K + chunks - 1) / chunks + 7) / 8 * 8;
    if (fat > rchunk && (max_cols + K * fat) * 4 <= smem_limit)
      rchunk = (int)fat;
  }
  if (K > kernels::kHadTwoLaunchMaxK && !transpose &&
      copies * rows <= kernels::kHadFewRowsMaxRows)
    rchunk = kernels::kHadFewRowsHkRows;
  while (K > 1 && rchunk > 8 && (max_cols + K * rchunk) * 4 > smem_limit)
    rchunk /= 2;
  const int64_t smem = (max_cols + (K > 1 ? K * rchunk : 0)) * 4;
  STD_TORCH_CHECK(smem <= smem_limit, "qtip_hadamard: a Hadamard block of ",
                  max_cols, " columns needs ", smem,
                  " bytes of shared memory, this GPU allows ", smem_limit);

  auto y = copies_out ? new_tensor({copies, rows, n}, out_dtype, x)
                      : new_tensor({rows, n}, out_dtype, x);
  if (rows == 0) return y;
  auto stream = get_current_cuda_stream();
  HadArgs a{};
  a.x = x.data_ptr();
  a.in_scale = in_scale ? in_scale->const_data_ptr<float>() : nullptr;
  a.out_scale = out_scale ? out_scale->const_data_ptr<float>() : nullptr;
  a.had = had;
  a.y = y.data_ptr();
  a.copies = (int)copies;
  a.rows = (int)rows;
  a.n = (int)n;
  a.K = (int)K;
  a.segs = segs;
  a.transpose = transpose;
  a.in_splits = (int)in_splits;
  // Whole rows in 4096-column blocks, K = 1, many rows: the radix-16 kernel.
  bool all_4096 = K == 1 && in_splits == 1 &&
                  (rows >= kernels::kSyl16MinRows ||
                   copies * rows >= kernels::kSyl16MinCopyRows);
  for (int s = 0; s < segs.count; ++s)
    all_4096 &= (1 << segs.log2P[s]) == kernels::kSyl16Cols;
  if (all_4096) {
    a.sylvester4096 = true;
    dispatch(in_dtype, out_dtype, a, stream);
    return y;
  }
  // Many rows (on the input side from two) in blocks of K x 512 with K <= 32
  // (every block of one size, so one mult): the one-pass kernel with H_K on
  // the tensor cores.
  bool all_hk512 = K <= kernels::kHk512MaxK;
  for (int s = 0; s < segs.count; ++s)
    all_hk512 &= transpose && in_splits == 1  // the input side
                     ? input_one_pass(K, K << segs.log2P[s], copies * rows)
                     : hadamard_one_pass(K, K << segs.log2P[s], copies * rows);
  if (all_hk512) {
    a.hk512 = true;
    dispatch(in_dtype, out_dtype, a, stream);
    return y;
  }
  // Many rows of fp16 in blocks of K x 64 with 32 < K <= 176 and no input
  // scale (the dense path's output side): qtip_hk64_kernel.
  bool all_hk64 = K > kernels::kHk512MaxK && in_dtype == ScalarType::Half &&
                  !in_scale.has_value() && in_splits == 1;
  for (int s = 0; s < segs.count; ++s)
    all_hk64 &= hadamard_one_pass(K, K << segs.log2P[s], rows);
  if (all_hk64) {
    a.hk64 = true;
    dispatch(in_dtype, out_dtype, a, stream);
    return y;
  }
  // A few rows with K > 1: the Sylvester part first, on its own (see the
  // kernel's comment), into one fp32 copy of x per copy.
  std::optional<Tensor> sylvester;
  if (two_launches) {
    HadArgs first = a;
    first.K = 1;
    first.had = nullptr;
    first.out_scale = nullptr;
    int64_t cols = 0;
    for (int s = 0; s < segs.count; ++s) {
      set_cta_cols(first.segs, s, int64_t{1} << segs.log2P[s],
                   kernels::kHadSylvesterCtaCols);
      first.segs.mult[s] = 1.f;
      cols = std::max<int64_t>(cols, first.segs.cta_cols[s]);
    }
    sylvester = new_tensor({copies, rows, n}, ScalarType::Float, x);
    first.y = sylvester->data_ptr();
    first.p_splits = 1;  // (rchunk and ksplit: K = 1 reads neither)
    first.threads = (int)std::clamp<int64_t>((cols / 8 + 31) / 32 * 32, 64,
                                             kernels::kHadMaxThreads);
    first.smem = (int)(cols * 4);
    first.presummed = false;
    dispatch(in_dtype, ScalarType::Float, first, stream);
    a.x = sylvester->data_ptr();
    a.in_scale = nullptr;
    a.in_splits = 1;
    a.presummed = true;
  }
  const int64_t max_P = max_cols / K;
  int p_splits = 1;
  if (K > 1) {
    // Spread the K*b FMAs of the H_K step over about two waves of blocks
    // (fattened row chunks above already make one). A block that redoes
    // the Sylvester part needs 32 columns to be worth it; after the first
    // launch, 8 (whole 16-byte loads).
    const int64_t base = row_blocks * ((K + rchunk - 1) / rchunk);
    const int64_t want = rchunk > 32 ? 1 : (2 * sms + base - 1) / base;
    p_splits = (int)std::clamp<int64_t>(
        want, 1, std::max<int64_t>(1, min_P / (two_launches ? 8 : 32)));
    // A power of two, so every CTA's column range (P / p_splits) is even.
    while (p_splits & (p_splits - 1)) p_splits &= p_splits - 1;
  }
  // H_K step: output groups of 8 rows x 1 column per CTA; with few of them
  // (small batches) several threads split each group's K-long sum.
  const int64_t items =
      K > 1 ? (rchunk / 8) * ((max_P + p_splits - 1) / p_splits) : 0;
  int ksplit = 1;
  while (K > 1 && items * ksplit * 2 <= kernels::kHadMaxThreads &&
         ksplit * 2 * 8 <= K && smem + ksplit * 2 * items * 8 * 4 <= smem_limit)
    ksplit *= 2;
  // Threads: the block's loads (8 values each; after the first launch 4,
  // of its own columns only) or its H_K outputs, whichever needs more.
  const int64_t loads =
      two_launches ? K * (max_P / p_splits) / 4 : max_cols / 8;
  const int64_t work = std::max<int64_t>(loads, items * ksplit);
  a.rchunk = rchunk;
  a.p_splits = p_splits;
  a.ksplit = ksplit;
  a.threads = (int)std::clamp<int64_t>((work + 31) / 32 * 32, 64,
                                       kernels::kHadMaxThreads);
  a.smem = (int)(smem + (ksplit - 1) * items * 8 * 4);
  dispatch(two_launches ? ScalarType::Float : in_dtype, out_dtype, a, stream);
  return y;
}

Tensor one_pass_input(const Tensor& x, const Tensor& su, const Tensor& had,
                      int64_t block) {
  const int64_t K = check_had_factor(had, x, "one_pass_input");
  STD_TORCH_CHECK(su.dim() == 2, "one_pass_input: SU must be (shards, n), got ",
                  shape(su));
  const int64_t rows = x.size(0), n = su.size(1), copies = su.size(0);
  STD_TORCH_CHECK(input_one_pass(K, block, copies * rows),
                  "one_pass_input: no one-pass transform of ", copies * rows,
                  " rows (times shards) in blocks of ", block, " with K=", K);
  if (K <= kernels::kHk512MaxK)
    return qtip_hadamard(x, su, std::nullopt, had, true, {block}, {n},
                         1.0 / 32.0, ScalarType::Half);
  STD_TORCH_CHECK(x.dim() == 2 && x.size(1) == n && x.is_contiguous() &&
                      (x.scalar_type() == ScalarType::Half ||
                       x.scalar_type() == ScalarType::BFloat16) &&
                      reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0,
                  "one_pass_input: x must be a contiguous, 16-byte "
                  "aligned (rows, ",
                  n, ") fp16 or bf16 tensor, got ", shape(x), " ",
                  x.scalar_type());
  STD_TORCH_CHECK(n % block == 0, "one_pass_input: block ", block,
                  " must divide n = ", n);
  check_scale(su, "SU", x, true);
  auto y = new_tensor({copies, rows, n}, ScalarType::Half, x);
  const torch::stable::accelerator::DeviceGuard guard(x.get_device_index());
  auto stream = get_current_cuda_stream();
  const int64_t items = copies * rows * (n / block);
  STD_TORCH_CHECK(items < INT32_MAX, "one_pass_input: ", items,
                  " row blocks are too many");
  const Hk64Shape shape = hk64_shape(items, K);
  // The cuBLAS route's scales: 1 / sqrt(P) / 32 before the fp16 rounding,
  // 1 / sqrt(K) after H_K.
  const float mult_pre =
      (float)(1.0 / 32.0 / std::sqrt((double)kernels::kHk64P));
  const float mult_post = (float)(1.0 / std::sqrt((double)K));
  auto run = [&](auto* typed_x) {
    using InT = std::remove_const_t<std::remove_pointer_t<decltype(typed_x)>>;
    auto kernel = kernels::qtip_hk64_in_kernel<InT>;
    static DeviceFlags smem_set;
    ensure_max_dynamic_smem(kernel, smem_set);
    launch_dependent(kernel, shape.grid, shape.threads, kernels::kHk64InSmem,
                     stream, typed_x, su.const_data_ptr<float>(),
                     had.const_data_ptr<float>(),
                     reinterpret_cast<__half*>(y.data_ptr()), (int)rows, (int)n,
                     (int)K, (int)copies, true, mult_pre, mult_post);
  };
  if (x.scalar_type() == ScalarType::Half)
    run(reinterpret_cast<const __half*>(x.const_data_ptr()));
  else
    run(reinterpret_cast<const __nv_bfloat16*>(x.const_data_ptr()));
  return y;
}

Tensor one_pass_output(const Tensor& partials, const Tensor& sv,
                       const Tensor& had, int64_t block, ScalarType out_dtype) {
  const int64_t K = check_had_factor(had, partials, "one_pass_output");
  STD_TORCH_CHECK(
      partials.dim() == 3 && partials.scalar_type() == ScalarType::Float &&
          partials.is_contiguous() &&
          reinterpret_cast<uintptr_t>(partials.data_ptr()) % 16 == 0,
      "one_pass_output: the partial sums must be a contiguous, 16-byte "
      "aligned float32 (splits, rows, m) tensor, got ",
      shape(partials), " ", partials.scalar_type());
  const int64_t splits = partials.size(0), rows = partials.size(1),
                m = partials.size(2);
  STD_TORCH_CHECK(output_one_pass(K, block, rows) && m % block == 0,
                  "one_pass_output: no one-pass transform of ", rows,
                  " rows of ", m, " columns in blocks of ", block,
                  " with K=", K);
  STD_TORCH_CHECK(
      out_dtype == ScalarType::Half || out_dtype == ScalarType::BFloat16,
      "one_pass_output: out_dtype must be float16 or bfloat16, got ",
      out_dtype);
  check_scale(sv, "SV", partials, false);
  STD_TORCH_CHECK(splits >= 1, "one_pass_output: no partial sums");
  STD_TORCH_CHECK((int64_t)rows * (m / block) < INT32_MAX && splits < 65536,
                  "one_pass_output: ", splits, " x ", rows, " x ", m,
                  " partial sums are too many");
  auto y = new_tensor({rows, m}, out_dtype, partials);
  const torch::stable::accelerator::DeviceGuard guard(
      partials.get_device_index());
  auto stream = get_current_cuda_stream();
  const float mult = (float)(32.0 / std::sqrt((double)block));
  auto run = [&](auto* typed_y) {
    launch_hk64(partials.const_data_ptr<float>(), sv.const_data_ptr<float>(),
                had.const_data_ptr<float>(), typed_y, (int)rows, (int)m, (int)K,
                false, mult, (int)splits, stream);
  };
  if (out_dtype == ScalarType::Half)
    run(reinterpret_cast<__half*>(y.data_ptr()));
  else
    run(reinterpret_cast<__nv_bfloat16*>(y.data_ptr()));
  return y;
}

}  // namespace qtip
}  // namespace vllm
