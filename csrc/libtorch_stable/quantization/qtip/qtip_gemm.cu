// SPDX-License-Identifier: Apache-2.0
// SPDX-FileCopyrightText: Copyright contributors to the vLLM project
//
// Fused HYB trellis decode + tensor-core GEMM (qtip_mma_kernel), and the
// decode-to-dense kernel for large batches. The byte layout and the decode
// tricks are described in qtip_codebook.cuh.
//
// Trellis decode is integer-issue bound on Hopper (about 5 ALU/FMA ops and
// one shared-memory lookup per state of two weights), so the GEMM is built
// to decode every weight once per call, whatever the batch, and to keep
// everything else off the decode's critical path:
//  * Persistent grid: one CTA per SM, which builds its 32-copy sign-folded
//    LUT (128 KiB, one bank per lane: no conflicts) once, and again only
//    when its work moves to another shard of a fused layer.
//  * Work unit = (shard, group of 32-row tiles, k-split). kq warps share a
//    tile (kq = 1..16, so a unit has 16 / kq tiles): warp share j takes
//    the unit's 32x32 trellis blocks j, j + kq, ... It decodes a block into
//    four mma A fragments (W_hat rows = mma M) and multiplies them with
//    every batch n8 tile of the pass (batch = mma N, up to 64 rows per
//    pass), so a decoded weight serves all rows. The kq sums of a tile are
//    added in shared memory, in share order, before one store: a unit then
//    spans kq times the k range, and the same grid needs kq times fewer
//    split-K partials for the output transform to read. Trellis words
//    stream into a register ring kStages blocks deep (ld.global.cs).
//  * Activations: the input transform writes x~ row-major (coalesced 16-byte
//    stores); cp.async stages each batch row's k range of a chunk,
//    double-buffered, in shared memory for the whole CTA (per 32-column
//    block, its rows of 64 bytes; see stage_offset), and a warp loads its B
//    fragments with one ldmatrix.x4 per block and n8 tile.
//  * Deterministic split-K: every unit writes its fp32 partial sums to its
//    own slot of a workspace (splits, rows, m): no atomics, no zero fill.
//    The output transform (qtip_hadamard) adds the splits in a fixed order
//    as it loads them, so the same input gives the same bits on every run.
//  * The number of splits comes from the shape, the batch and the SM count
//    (a cost model of waves vs. partial-sum traffic), never from timing.

#include <torch/csrc/stable/accelerator.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>

#include "qtip_codebook.cuh"
#include "qtip_hadamard.cuh"
#include "qtip_launch.cuh"
#include "qtip_ops.h"

namespace vllm {
namespace qtip {

namespace kernels {

constexpr int kDecodeThreads = 256;
// Warps per mma CTA = 32-row tiles per work unit, at every batch: 4 per
// scheduler hide the lookups' and the mma chain's latencies. With 4 and 8
// n8 tiles ptxas then caps the kernel at 128 registers (NB=8: 8 bytes of
// stack, outside the main loop); against 8 warps it took the GEMM at 64
// rows from 50.6 to 40.6 us (4096x11008, H200).
constexpr int kMmaWarps = 16;
constexpr int kLog2MmaWarps = 4;
static_assert(kMmaWarps == 1 << kLog2MmaWarps);
// x~ staging in shared memory, per 32-column block: its 8 * nb batch rows of
// 64 bytes, then 16 bytes of padding (one row's consecutive blocks then
// start 4 banks apart, so cp.async's stores of a row use every bank).
constexpr int stage_block_bytes(int nb) { return nb * 512 + 16; }
// Staging slot of block i of a staged k range whose blocks are shared by
// kq = 2^log2kq warps (warp share j takes blocks j, j + kq, ...): slot
// (i % kq) * per_share + i / kq, so every share's blocks are consecutive
// (its ring addresses stay constant offsets). kq = 1: slot i.
struct BlockSlots {
  int log2kq, per_share;
  __device__ __forceinline__ int operator()(int i) const {
    return (i & ((1 << log2kq) - 1)) * per_share + (i >> log2kq);
  }
};

// Byte offset of row r, 16-byte piece p (columns 8p..8p+7) within a block:
// the pieces of a row are XOR-swizzled by bits 1-2 of r, so the 8 row
// addresses of an ldmatrix phase (rows r0..r0+7, one p) hit distinct banks.
__device__ __forceinline__ int stage_offset(int r, int p) {
  return r * 64 + ((p ^ (r >> 1)) & 3) * 16;
}

// Trellis blocks in flight per warp (register ring): 8 with one n8 tile
// (batch <= 8: a warp's whole k range is often only ~8-20 blocks, so its
// refills would wait on DRAM; with a single n8 tile's accumulators the
// deeper ring fits, 108-127 registers and no spills), 4 otherwise.
constexpr int kStages = 4;
constexpr int ring_depth(int nb) { return nb == 1 ? 8 : kStages; }

// Where the work units of one launch come from (host-computed, passed by
// value). Units are numbered shard by shard, then k-split, then row group.
struct MmaPlan {
  int shards;
  int splits;
  int units;
  int unit0[kMaxShards + 1];  // first unit of shard s
  int rt0[kMaxShards];        // first 32-row tile of shard s (global)
  int row_tiles[kMaxShards];  // 32-row tiles of shard s
  int groups[kMaxShards];     // row groups of shard s (16 / kq tiles each)
  int log2kq;                 // kq = 2^log2kq warps share a tile's k range
  int red_offset;  // kq > 1: byte offset in the staging area of the sums
};

// The input transform done by the GEMM itself, for one row whose Hadamard
// blocks are a power of two, or one block of the whole row with an H_K
// factor: x (1, n) is the previous kernel's output. At one row every CTA can
// afford the whole row's transform (n values, a few barriers, and for H_K
// about K FMAs per column of its own k range), and that saves a launch and
// the x~ round trip through global memory. (An earlier form, up to 8 rows
// and x~ through global memory, lost at 8 rows on the H200: BENCHMARKS.md
// "fifth run".)
constexpr int kOwnInputMaxRows = 1;
// Threads that split one column quad's K-long sum of the H_K step, at most.
constexpr int kHadMaxKSplit = 8;
struct InputTransform {
  const void* x;     // (1, n), the activation dtype
  const float* su;   // (shards, n)
  const float* had;  // H_K (hk, hk) fp32, hk > 1 only
  int hk;            // K of the H_K factor, 1 for none
  int log2P;         // Sylvester block size 2^log2P (n = hk 2^log2P if hk > 1)
  // hk > 1: float offsets into the staging buffers of the unit's rows of
  // H_K and of the H_K step's partial sums (own_input_staging).
  int had_offset;
  int partial_offset;
  float mult;  // 1 / (32 sqrt(hk 2^log2P))
};

// X (fp32, n values) = Sylvester(SU_s * x) of the one row, blocks of
// 2^log2P, by the whole CTA: the same operations in the same order as
// qtip_hadamard_kernel, so without an H_K factor x~ gets the same bits (the
// H_K step sums in another order than that kernel). Ends with a barrier.
template <typename InT>
__device__ void transform_row(const InputTransform& in, int s, int n,
                              float* X) {
  // That kernel's own load and Sylvester step (one split, SU as in_scale).
  load_sylvester</*kLoads=*/1>(static_cast<const InT*>(in.x),
                               /*in_splits=*/1, /*split_stride=*/0,
                               in.su + (int64_t)s * n, X, n, in.log2P);
}

// Group g (columns 8g..8g+7) of a staged k range of x~, as row 0 of its block
// (in slot(g / 4)) of a one-n8-tile staging buffer at xs.
__device__ __forceinline__ void store_slice8(char* xs, BlockSlots slot, int g,
                                             const float (&v)[8]) {
  store8(reinterpret_cast<__half*>(xs + slot(g >> 2) * stage_block_bytes(1) +
                                   stage_offset(0, g & 3)),
         v);
}

// x~ = fp16(mult * X) of the columns [32 k0, 32 k1) as row 0 of the blocks
// of a one-n8-tile staging buffer at xs, block k0 + i in slot(i) (the other
// rows are never stored: they only feed discarded batch columns). Ends with
// a barrier.
__device__ void stage_row_slice(const float* X, float mult, int k0, int k1,
                                char* xs, BlockSlots slot) {
  for (int g = threadIdx.x; g < (k1 - k0) * 4; g += blockDim.x) {
    float v[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) v[i] = X[k0 * 32 + g * 8 + i] * mult;
    store_slice8(xs, slot, g, v);
  }
  __syncthreads();
}

// Rows [first, first + count) of H_K that the columns [32 k0, 32 k1) of the
// H_K step need (column c = r * P + p).
struct HadRows {
  int first, count;
};
__device__ __forceinline__ HadRows had_rows(int k0, int k1, int log2P) {
  const int first = (k0 * 32) >> log2P;
  return {first, ((k1 * 32 - 1) >> log2P) + 1 - first};
}

// Hs[k][r - first] = H_K[k][r] (y = H_K^T X) for the rows of the columns
// [32 k0, 32 k1), all k. H_K is a weight, never the previous kernel's
// output: the first unit loads it before waiting for that kernel. A later
// barrier publishes it.
__device__ void load_had_rows(const InputTransform& in, int k0, int k1,
                              float* Hs) {
  const HadRows rows = had_rows(k0, k1, in.log2P);
  for (int i = threadIdx.x; i < in.hk * rows.count; i += blockDim.x) {
    const int k = i / rows.count, r = rows.first + i % rows.count;
    Hs[i] = in.had[k * in.hk + r];
  }
}

// With H_K (one block of n = K * P): x~[c] = fp16(mult * sum_k H_K[k][r]
// X[k P + p]), c = r P + p, for the columns [32 k0, 32 k1), stored as
// stage_row_slice does (row 0 of the blocks at xs). Hs holds the rows of H_K
// they need (load_had_rows, already published). Each thread sums four columns
// (one LDS.128 of X per k, lanes on consecutive quads: no bank conflicts) over
// a k range; with few quads ksplit threads share a quad, so the dependent chain
// is K / ksplit long, and the partial sums are added in k-range order (the same
// bits every run). Ends with a barrier.
__device__ void stage_row_slice_had(const InputTransform& in, const float* X,
                                    const float* Hs, float* partial, int k0,
                                    int k1, char* xs, BlockSlots slot) {
  const int P = 1 << in.log2P, K = in.hk;
  const HadRows rows = had_rows(k0, k1, in.log2P);
  const int cols = (k1 - k0) * 32, quads = cols / 4;
  const int ksplit =
      max(1, min(min(kHadMaxKSplit, K), (int)blockDim.x / quads));
  for (int item = threadIdx.x; item < quads * ksplit; item += blockDim.x) {
    const int ks = item / quads;
    const int c = k0 * 32 + (item - ks * quads) * 4;
    const float4* x4 = reinterpret_cast<const float4*>(X + (c & (P - 1)));
    const float* h = Hs + (c >> in.log2P) - rows.first;
    float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll 4
    for (int k = K * ks / ksplit; k < K * (ks + 1) / ksplit; ++k) {
      const float4 v = x4[k * (P / 4)];
      const float coef = h[k * rows.count];
      acc.x += coef * v.x, acc.y += coef * v.y;
      acc.z += coef * v.z, acc.w += coef * v.w;
    }
    // partial[ks][column - 32 k0]
    reinterpret_cast<float4*>(partial)[item] = acc;
  }
  __syncthreads();
  for (int g = threadIdx.x; g < cols / 8; g += blockDim.x) {
    float v[8];
    load8(partial + g * 8, v);
    // One split at a time: a few more cycles, no register peak for the ring.
#pragma unroll 1
    for (int ks = 1; ks < ksplit; ++ks) {
      float p[8];
      load8(partial + ks * cols + g * 8, p);
#pragma unroll
      for (int i = 0; i < 8; ++i) v[i] += p[i];
    }
#pragma unroll
    for (int i = 0; i < 8; ++i) v[i] *= in.mult;
    store_slice8(xs, slot, g, v);
  }
  __syncthreads();
}

__device__ __forceinline__ void cp_async16(uint32_t smem_addr,
                                           const void* gmem) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(smem_addr),
               "l"(gmem));
}
// Registers 0..3 = 8x8 matrices 0..3 (lanes 8j..8j+7 give matrix j's row
// addresses); lane l gets row l / 4, elements 2 (l % 4) and 2 (l % 4) + 1.
__device__ __forceinline__ void ldmatrix_x4(uint32_t smem_addr,
                                            uint32_t (&r)[4]) {
  asm volatile(
      "ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
      : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
      : "r"(smem_addr));
}
__device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;");
}
__device__ __forceinline__ void cp_async_wait_one() {
  asm volatile("cp.async.wait_group 1;" ::: "memory");
}

// y partials (splits, rows, m) fp32 = x~ @ W_hat^T for every shard, W_hat
// decoded on the fly. xt: x~ row-major fp16, (shards, rows, n + 8 x_extra),
// in 16-byte vectors, already offset to the first of the n = 32 nblk
// columns the trellis covers (x_extra = 0 for a whole layer; a column
// window, a row-parallel rank's slice of a whole-matrix layer, has rows
// x_extra vectors wider than the window); the batch is covered by
// nbt = ceil(rows / 8) n8 tiles. With InT (the activation dtype; one row)
// the kernel makes x~ itself from in.x instead, in shared memory (xt
// unused): the staging buffers hold the row's transform X (fp32), behind it
// the unit's k range of x~ as row 0 of a staging tile and, with H_K, the
// unit's rows of H_K and the H_K step's partial sums (the host checks that
// they fit; for H_K it may give the launch more shared memory). kShares:
// plan.log2kq > 0 (warp shares); the kq = 1 kernels are instantiated apart,
// so none of the shares' index math or reduction is in their code.
template <int K, int NB, int kCopies, typename InT, bool kShares>
__global__ void __launch_bounds__(kMmaWarps * 32, 1)
    qtip_mma_kernel(const uint8_t* __restrict__ trellis,
                    const __half* __restrict__ tlut,
                    const uint4* __restrict__ xt, float* __restrict__ part,
                    int m, int nblk, int rows, int nbt, int chunk_blocks,
                    MmaPlan plan, InputTransform in, int x_extra) {
  constexpr bool kOwnInput = !std::is_void_v<InT>;
  static_assert(!kOwnInput || NB == 1);
  using Lut = SignedLut<kCopies>;
  using Blk = TrellisBlock<K>;
  constexpr int kThreads = kMmaWarps * 32;

  extern __shared__ __align__(128) char smem[];
  char* lut = smem;
  char* stage = smem + Lut::kBytes;
  // One staging buffer: chunk_blocks blocks of the pass's 8 * NB rows.
  constexpr int kBlockBytes = stage_block_bytes(NB);
  const int buf_bytes = chunk_blocks * kBlockBytes;
  // 16-byte vectors per row of x~. (This form, the window as an addend
  // passed last, compiles to the same registers and main loop as the whole
  // layer's nblk * 4 on sm_90; a row stride parameter of its own made the
  // compiler spill in the NB = 8 main loops.)
  const int row_vecs = nblk * 4 + x_extra;

  const int tid = threadIdx.x, lane = tid & 31;
  // Read through a shuffle from lane 0 so the compiler knows it is
  // warp-uniform: the per-warp branches below then need no divergence
  // guards and the LUT base stays in a uniform register.
  const int warp = __shfl_sync(0xffffffffu, tid >> 5, 0);
  // Warp share kj of the tile tile_in_unit (see the file comment).
  static_assert(!kShares || NB <= 4,
                "NB = 6 and 8 take kq = 1 (max_chunk_log2kq)");
  const int log2kq = kShares ? plan.log2kq : 0, kq = 1 << log2kq;
  const int log2tpu = kLog2MmaWarps - log2kq;
  const int kj = (warp & (kMmaWarps - 1)) >> log2tpu;  // 0 when kq = 1
  const int tile_in_unit = warp & ((1 << log2tpu) - 1);
  const int g = lane >> 2, q = lane & 3;
  const uint32_t lane_term = Lut::lane_term(lane);
  const uint32_t stage_addr =
      static_cast<uint32_t>(__cvta_generic_to_shared(stage));
  // ldmatrix matrix j of an n8 tile: its rows 0..7 (their addresses from
  // lanes 8j..8j+7) at columns 8j..8j+7 of the block. Register j of lane
  // g*4+q then holds x~[row g][8j + 2q + {0, 1}]: B[k][n] of the mma for
  // k-tile j / 2, register j % 2 (b0b1, b2b3).
  const uint32_t lane_offset = stage_offset(lane & 7, lane >> 3);
  const int passes = (nbt + NB - 1) / NB;

  // 32-bit products: mma_plan keeps units * grid and nblk * splits < 2^31.
  const int u_begin = plan.units * (int)blockIdx.x / (int)gridDim.x;
  const int u_end = plan.units * ((int)blockIdx.x + 1) / (int)gridDim.x;
  int lut_shard = -1;
  int x_shard = -1;  // the shard whose transformed row X holds
  int x_unit = -1;   // shard * splits + split of the x~ slice behind X

  for (int u = u_begin; u < u_end; ++u) {
    // Resolve the unit (uniform across the CTA).
    int s = 0;
    while (s + 1 < plan.shards && u >= plan.unit0[s + 1]) ++s;
    const int local = u - plan.unit0[s];
    const int split = local / plan.groups[s];
    const int group = local % plan.groups[s];
    const int tile = (group << log2tpu) + tile_in_unit;  // row tile in s
    const bool active = tile < plan.row_tiles[s];
    const int grt = plan.rt0[s] + tile;
    const int k0 = nblk * split / plan.splits;
    const int k1 = nblk * (split + 1) / plan.splits;
    const int nchunks = (k1 - k0 + chunk_blocks - 1) / chunk_blocks;
    // This warp's blocks: k0 + kj + i * kq, i < nw.
    const int nw = (k1 - k0 - kj + kq - 1) >> log2kq;
    const uint8_t* wrow =
        trellis + ((size_t)grt * nblk) * Blk::kBytes + lane * Blk::kLaneBytes;
    const uint8_t* wptr = wrow + (k0 + kj) * Blk::kBytes;
    const int wstride = Blk::kBytes << log2kq;
    auto block_ptr = [&](int i) {
      // kq = 1: the address form of the kernel before warp shares (at
      // NB = 8, on the 128-register cap, it keeps the main loop free of
      // spills; nvcc 13.0).
      if constexpr (!kShares)
        return wrow + (size_t)(k0 + i) * Blk::kBytes;
      else
        return wptr + i * wstride;
    };
    for (int pass = 0; pass < passes; ++pass) {
      const int nb0 = pass * NB;
      const int nbp = min(NB, nbt - nb0);
      // Only the pass's real batch rows are staged: the tile's other rows
      // hold stale data, which only feeds batch columns never stored.
      const int pass_rows = min(8 * NB, rows - nb0 * 8);
      const uint4* xs = xt + ((size_t)s * rows + nb0 * 8) * row_vecs;
      // Stages chunk c of this pass into buffer c & 1 (all threads): each
      // row's 16-byte vectors of the chunk, consecutive in x~ (coalesced),
      // block i of the chunk in slot(i).
      const int chunk_share = chunk_blocks >> log2kq;  // blocks per share
      const BlockSlots chunk_slot{log2kq, chunk_share};
      auto stage_chunk = [&](int c) {
        const int cb0 = k0 + c * chunk_blocks;
        const int ncb = min(chunk_blocks, k1 - cb0);
        if (ncb <= 0) return;
        const int vecs = ncb * 4;  // per row
        const uint32_t base = stage_addr + (c & 1) * buf_bytes;
        // Vector i = row * vecs + v, walked by a precomputed step of
        // kThreads vectors: no division per vector.
        const int drow = kThreads / vecs, dv = kThreads % vecs;
        int row = tid / vecs, v = tid % vecs;
        while (row < pass_rows) {
          cp_async16(
              base + chunk_slot(v >> 2) * kBlockBytes + stage_offset(row, v),
              xs + (size_t)row * row_vecs + cb0 * 4 + v);
          row += drow;
          v += dv;
          if (v >= vecs) {
            v -= vecs;
            ++row;
          }
        }
      };

      // Trellis ring: this warp's blocks 0 .. kStagesNB - 1.
      constexpr int kStagesNB = ring_depth(NB);
      uint32_t w[kStagesNB][K];
      if (active) {
#pragma unroll
        for (int st = 0; st < kStagesNB; ++st)
          if (st < nw) load_lane<K>(block_ptr(st), w[st]);
      }
      if constexpr (kOwnInput) {
        // This unit's rows of H_K, into free staging space (as below).
        if (in.hk > 1 && s * plan.splits + split != x_unit)
          load_had_rows(in, k0, k1,
                        reinterpret_cast<float*>(stage) + in.had_offset);
      }
      if (s != lut_shard) {
        // Every warp left the previous unit's last barrier, so nobody
        // reads the old table any more; the next barrier below (the first
        // chunk's, or the input transform's) publishes the new one.
        Lut::template fill<kThreads>(reinterpret_cast<uint32_t*>(lut),
                                     tlut + s * kTlutRows * 2, tid);
        if (lut_shard < 0) {
          // Table and trellis loads overlapped the input transform; x~ is
          // its output.
          allow_dependents();
          wait_for_producer();
        }
        lut_shard = s;
      }
      float acc[2][NB][4];
#pragma unroll
      for (int mr = 0; mr < 2; ++mr)
#pragma unroll
        for (int nb = 0; nb < NB; ++nb)
#pragma unroll
          for (int i = 0; i < 4; ++i) acc[mr][nb][i] = 0.f;

      // Multiplies this warp's blocks [i0, i1) with the staged x~ blocks
      // from shared address xb (block i0) on.
      auto run_range = [&](const int i0, const int i1, const uint32_t xb) {
        // Block cb (ring slot st): decode, refill the slot, multiply with
        // all NB tiles. Tiles past nbp and rows past the batch read stale
        // staging data: they only feed batch columns never stored, and
        // with no per-tile branch the MMAs of a block (and the decode of
        // the next) form one basic block the compiler can interleave.
        // bp: this lane's ldmatrix address in the block's n8 tile 0.
        auto step = [&](const int st, const int i, const uint32_t bp) {
          uint32_t frag[4][4];
          decode_block<K, kCopies>(w[st], lut, lane_term, lane, frag);
          if (i + kStagesNB < nw) load_lane<K>(block_ptr(i + kStagesNB), w[st]);
          uint32_t b[NB][4];
#pragma unroll
          for (int nb = 0; nb < NB; ++nb) ldmatrix_x4(bp + nb * 512, b[nb]);
          // frag[kc * 2 + mr]; b[.][0..1]: k-tile 0, b[.][2..3]: 1. k-tile
          // outside the n8 tiles: the two MMAs into one accumulator are
          // 2 * NB apart, not 2 (each waits on the previous one's result).
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
        };
        if (!active) return;
        // i0 is a ring-slot-0 block (0, or a chunk start: chunk_share is a
        // multiple of the ring depth), so the ring index stays a constant.
        // Whole rings first (no per-block check), then the last partial one.
        // One address per ring, constant offsets within it.
        int base = i0;
        uint32_t ring = xb + lane_offset;
        for (; base + kStagesNB <= i1;
             base += kStagesNB, ring += kStagesNB * kBlockBytes) {
#pragma unroll
          for (int st = 0; st < kStagesNB; ++st)
            step(st, base + st, ring + st * kBlockBytes);
        }
        if (base < i1) {
#pragma unroll
          for (int st = 0; st < kStagesNB; ++st)
            if (base + st < i1)  // warp-uniform
              step(st, base + st, ring + st * kBlockBytes);
        }
      };

      if constexpr (kOwnInput) {
        // The staging buffers are free here (the last unit's final barrier).
        float* X = reinterpret_cast<float*>(stage);
        const int n = nblk * 32;
        const int slice = n * 4;  // behind X: k1 - k0 staged blocks
        const BlockSlots slot{log2kq, (k1 - k0 + kq - 1) >> log2kq};
        if (s * plan.splits + split != x_unit) {
          if (s != x_shard) {
            transform_row<InT>(in, s, n, X);  // its barriers publish Hs too
            x_shard = s;
          } else if (in.hk > 1) {
            __syncthreads();  // publishes Hs
          }
          if (in.hk > 1)
            stage_row_slice_had(in, X, X + in.had_offset, X + in.partial_offset,
                                k0, k1, stage + slice, slot);
          else
            stage_row_slice(X, in.mult, k0, k1, stage + slice, slot);
          x_unit = s * plan.splits + split;
        }
        run_range(0, nw,
                  stage_addr + slice + kj * slot.per_share * kBlockBytes);
        __syncthreads();  // the next unit may rewrite the slice and X
      } else {
        stage_chunk(0);
        cp_async_commit();
        for (int c = 0; c < nchunks; ++c) {
          if (c + 1 < nchunks) stage_chunk(c + 1);
          cp_async_commit();
          cp_async_wait_one();
          __syncthreads();
          const int i0 = c * chunk_share;
          run_range(i0, min(nw, i0 + chunk_share),
                    stage_addr + (c & 1) * buf_bytes +
                        kj * chunk_share * kBlockBytes);
          __syncthreads();
        }
      }

      if (kq > 1) {
        // The tile's kq partial sums meet in shared memory (lane-minor: no
        // bank conflicts) behind the staging data, which every warp is done
        // with (the barrier above); share 0 adds them in share order, so
        // the same input gives the same bits on every run.
        constexpr int kAcc = 2 * NB * 4;
        float* red = reinterpret_cast<float*>(stage + plan.red_offset) + lane;
        auto red_at = [&](int share, int e) -> float& {
          const int slot = ((share - 1) << log2tpu) | tile_in_unit;
          return red[(slot * kAcc + e) * 32];
        };
        float* sums = &acc[0][0][0];  // e = (mr * NB + nb) * 4 + i
        if (active && kj > 0) {
#pragma unroll
          for (int e = 0; e < kAcc; ++e) red_at(kj, e) = sums[e];
        }
        __syncthreads();
        if (active && kj == 0) {
          for (int share = 1; share < kq; ++share)
#pragma unroll
            for (int e = 0; e < kAcc; ++e) sums[e] += red_at(share, e);
        }
      }

      // C fragment: c0 (row g, col 2q), c1 (g, 2q+1), c2 (g+8, 2q),
      // c3 (g+8, 2q+1); rows are W_hat rows, columns batch rows.
      if (active && kj == 0) {
        float* dst = part + (size_t)split * rows * m + (size_t)grt * 32 +
                     (size_t)(nb0 * 8 + 2 * q) * m + g;
        // A pass whose NB tiles hold only real batch rows stores without
        // a check per element.
        const bool full = (nb0 + NB) * 8 <= rows;
#pragma unroll
        for (int mr = 0; mr < 2; ++mr)
#pragma unroll
          for (int nb = 0; nb < NB; ++nb)
#pragma unroll
            for (int i = 0; i < 4; ++i) {
              const int col = (nb0 + nb) * 8 + 2 * q + (i & 1);
              if (full || (nb < nbp && col < rows))
                dst[(size_t)(nb * 8 + (i & 1)) * m + mr * 16 + 8 * (i >> 1)] =
                    acc[mr][nb][i];
            }
      }
      // The sums lie in the staging buffers, which the next pass or unit
      // refills at once (own input keeps them apart: see own_input_staging).
      if (!kOwnInput && kq > 1) __syncthreads();
    }
  }
}

// Row stride, in 32-bit words, of a warp's staging tile in the decode
// kernel: 16 words of data + 4 of padding, so that both the fragment writes
// (8 rows x 4 words per instruction) and the 16-byte row reads (8 rows per
// phase) hit 32 distinct banks.
constexpr int kStageWords = 20;

// Shared memory of the decode kernel: the 16-copy LUT and one 16x32 staging
// tile per warp (74 KiB: three blocks per SM on Hopper, and within the
// 99 KiB of sm_86/89).
constexpr int decode_smem_bytes() {
  return SignedLut<16>::kBytes + kDecodeThreads / 32 * 16 * kStageWords * 4;
}

// W_hat (m, n) fp16 for every shard. Each warp walks its blocks with the
// next block's trellis words already in flight, and writes a decoded block
// through a shared-memory tile as whole 64-byte row segments (the A
// fragments' own layout would be 16-byte pieces of 8 rows per store).
template <int K>
__global__ void __launch_bounds__(kDecodeThreads)
    qtip_decode_kernel(const uint8_t* __restrict__ trellis,
                       const __half* __restrict__ tlut, __half* __restrict__ w,
                       int n, ShardRows shards) {
  // 16 copies (64 KiB): several blocks per SM; this kernel streams W_hat
  // out, so its table lookups are not what bounds it.
  constexpr int kCopies = 16;
  using Lut = SignedLut<kCopies>;
  using Blk = TrellisBlock<K>;
  constexpr int kWarps = kDecodeThreads / 32;
  extern __shared__ __align__(16) char smem[];
  const int tid = threadIdx.x, lane = tid & 31;
  const int warp = __shfl_sync(0xffffffffu, tid >> 5, 0);
  uint32_t* tile =
      reinterpret_cast<uint32_t*>(smem + Lut::kBytes) + warp * 16 * kStageWords;
  // blockIdx.y is the shard: one table per block.
  const int shard = blockIdx.y;
  Lut::template fill<kDecodeThreads>(reinterpret_cast<uint32_t*>(smem),
                                     tlut + shard * kTlutRows * 2, tid);
  __syncthreads();
  const uint32_t lane_term = Lut::lane_term(lane);
  const int g = lane >> 2, q = lane & 3;
  const int nblk = n / 32;
  // Block indices fit in 32 bits (the host checks m/32 * n/32 < 2^31).
  const int total = shards.rb0[shard + 1] * nblk;
  const int stride = gridDim.x * kWarps;
  const uint8_t* lane_src = trellis + lane * Blk::kLaneBytes;
  int t = shards.rb0[shard] * nblk + blockIdx.x * kWarps + warp;
  uint32_t next[K];
  if (t < total) load_lane<K>(lane_src + (size_t)t * Blk::kBytes, next);
  for (; t < total; t += stride) {
    uint32_t ws[K];
#pragma unroll
    for (int i = 0; i < K; ++i) ws[i] = next[i];
    if (t + stride < total)
      load_lane<K>(lane_src + (size_t)(t + stride) * Blk::kBytes, next);
    uint32_t frag[4][4];
    decode_block<K, kCopies>(ws, smem, lane_term, lane, frag);
    const int bi = t / nblk, bj = t % nblk;
    const int c = lane >> 3;  // this lane's 16-byte piece of a 64-byte row
#pragma unroll
    for (int mr = 0; mr < 2; ++mr) {
      // a0 (g, 2q), a1 (g+8, 2q), a2 (g, 2q+8), a3 (g+8, 2q+8) of tiles
      // (mr, kc = 0, 1), as 32-bit words of the row-major 16x32 tile.
#pragma unroll
      for (int kc = 0; kc < 2; ++kc) {
        const uint32_t (&a)[4] = frag[kc * 2 + mr];
        uint32_t* p = tile + g * kStageWords + kc * 8 + q;
        p[0] = a[0];
        p[8 * kStageWords] = a[1];
        p[4] = a[2];
        p[8 * kStageWords + 4] = a[3];
      }
      __syncwarp();
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const int r = (lane & 7) + 8 * j;
        *reinterpret_cast<uint4*>(w + (size_t)(bi * 32 + mr * 16 + r) * n +
                                  bj * 32 + c * 8) =
            *reinterpret_cast<const uint4*>(tile + r * kStageWords + c * 4);
      }
      __syncwarp();
    }
  }
}

}  // namespace kernels

namespace {

using namespace kernels;

struct TrellisShape {
  int64_t m, n;
  int K;
};

TrellisShape check_trellis(const Tensor& trellis, const char* op) {
  STD_TORCH_CHECK(trellis.is_cuda(), op, ": trellis must be a CUDA tensor");
  STD_TORCH_CHECK(trellis.scalar_type() == ScalarType::Short, op,
                  ": trellis must be int16, got ", trellis.scalar_type());
  STD_TORCH_CHECK(trellis.dim() == 3, op,
                  ": trellis must be 3-D (m/32, n/32, 64*K), got shape ",
                  shape(trellis));
  STD_TORCH_CHECK(trellis.is_contiguous(), op, ": trellis must be contiguous");
  const int64_t last = trellis.size(2);
  STD_TORCH_CHECK(last == 128 || last == 192 || last == 256, op,
                  ": trellis last dim must be 64*K for K in {2, 3, 4}, got ",
                  last);
  STD_TORCH_CHECK(trellis.size(0) > 0 && trellis.size(1) > 0, op,
                  ": trellis is empty, shape ", shape(trellis));
  STD_TORCH_CHECK(reinterpret_cast<uintptr_t>(trellis.data_ptr()) % 16 == 0, op,
                  ": trellis data must be 16-byte aligned");
  STD_TORCH_CHECK(
      trellis.size(0) * trellis.size(1) < std::numeric_limits<int32_t>::max(),
      op, ": trellis ", shape(trellis),
      " has more 32x32 blocks than the kernels index (2^31)");
  check_device_capability(trellis, op);
  return {trellis.size(0) * 32, trellis.size(1) * 32, (int)(last / 64)};
}

// tlut: (512, 2) for one shard or (shards, 512, 2).
void check_tlut(const Tensor& tlut, const Tensor& trellis, int64_t shards,
                const char* op) {
  STD_TORCH_CHECK(
      tlut.is_cuda() && tlut.get_device_index() == trellis.get_device_index(),
      op,
      ": tlut must be on the trellis device cuda:", trellis.get_device_index());
  STD_TORCH_CHECK(tlut.scalar_type() == ScalarType::Half, op,
                  ": tlut must be float16, got ", tlut.scalar_type());
  const bool one = tlut.dim() == 2 && shards == 1;
  const bool stacked = tlut.dim() == 3 && tlut.size(0) == shards;
  STD_TORCH_CHECK(
      (one || stacked) && tlut.size(-2) == kTlutRows && tlut.size(-1) == 2, op,
      ": tlut must have shape (", shards,
      ", 512, 2) (or (512, 2) for one shard), got ", shape(tlut));
  STD_TORCH_CHECK(tlut.is_contiguous(), op, ": tlut must be contiguous");
  STD_TORCH_CHECK(reinterpret_cast<uintptr_t>(tlut.data_ptr()) % 4 == 0, op,
                  ": tlut data must be 4-byte aligned");
}

// A layer's weight (trellis, shard rows, codebook), checked once per op call.
struct Weight {
  TrellisShape s;
  ShardRows shards;
};

Weight check_weight(const Tensor& trellis, const Tensor& tlut,
                    const std::vector<int64_t>& shard_rows, const char* op) {
  const TrellisShape s = check_trellis(trellis, op);
  const ShardRows shards = make_shard_rows(shard_rows, s.m, op);
  check_tlut(tlut, trellis, shards.count, op);
  return {s, shards};
}

// Launch shape of one qtip_mma_kernel call.
struct MmaConfig {
  int nb;      // n8 batch tiles per pass (1, 2, 4, 6, 8)
  int copies;  // LUT copies (32: conflict-free; 16 where smem is short)
  int chunk_blocks;
  int smem;
};

// Two staging buffers of chunk_blocks blocks.
int stage_bytes(int nb, int chunk_blocks) {
  return 2 * chunk_blocks * stage_block_bytes(nb);
}

// n8 tiles per pass: up to 4 tiles the next power of two; above, 6 when the
// passes that 8 would need hold no more than 6 tiles each (33-48 rows in
// one pass, 65-96 in two, 129-144 in three): the same number of passes,
// each weight decoded as often, and a quarter fewer MMAs per block.
int pass_tiles(int64_t nbt) {
  if (nbt <= 4) return nbt <= 1 ? 1 : nbt <= 2 ? 2 : 4;
  const int64_t passes = (nbt + 7) / 8;
  return (nbt + passes - 1) / passes <= 6 ? 6 : 8;
}

MmaConfig mma_config(const cudaDeviceProp& prop, int64_t nbt) {
  MmaConfig c{};
  c.nb = pass_tiles(nbt);
  const int limit = (int)prop.sharedMemPerBlockOptin;
  const int ring = ring_depth(c.nb);
  c.copies = SignedLut<32>::kBytes + stage_bytes(c.nb, ring) <= limit ? 32 : 16;
  const int lut =
      c.copies == 32 ? SignedLut<32>::kBytes : SignedLut<16>::kBytes;
  // At most ~96 KiB of x~ (plus the blocks' padding), in whole rings.
  int blocks =
      std::min(64, std::min(limit - lut, 96 * 1024) / (2 * c.nb * 512));
  c.chunk_blocks = std::max(ring, blocks / ring * ring);
  while (c.chunk_blocks > ring &&
         lut + stage_bytes(c.nb, c.chunk_blocks) > limit)
    c.chunk_blocks -= ring;
  c.smem = lut + stage_bytes(c.nb, c.chunk_blocks);
  STD_TORCH_CHECK(c.smem <= limit, "qtip_gemm: needs ", c.smem,
                  " bytes of shared memory per block, this GPU allows ", limit);
  return c;
}

// Bytes of the kq > 1 partial sums in shared memory: every warp share but
// the first, 2 * nb * 4 floats per lane.
int red_bytes(int log2kq, int nb) {
  const int shares = (1 << log2kq) - 1;
  return shares * (kMmaWarps >> log2kq) * 32 * 2 * nb * 4 * 4;
}

// The largest log2(kq) the chunked staging allows: each share's part of a
// chunk is whole rings, and the sums fit the staging buffers they reuse.
// NB = 6 and 8 take kq = 1 (NB = 8's chunks are too short for two shares on
// every GPU; NB = 6 with shares spills; the kernel relies on it).
int max_chunk_log2kq(const MmaConfig& c) {
  int log2kq = 0;
  while (c.nb <= 4 && log2kq < kLog2MmaWarps &&
         c.chunk_blocks % ((2 << log2kq) * ring_depth(c.nb)) == 0 &&
         red_bytes(log2kq + 1, c.nb) <= stage_bytes(c.nb, c.chunk_blocks))
    ++log2kq;
  return log2kq;
}

// Warp shares per tile (kq) and splits of the k dimension: enough units to
// fill the SMs, weighed against what each split adds. A cost model in SM
// clocks: decode ~32 weights/clk/SM or the tensor cores' ~1024 FMA/clk
// (mma.sync), whichever bounds; per unit its x~ staging at ~20 bytes/clk;
// the partial sums written and re-read at ~20 bytes/clk/SM; and their reads
// by the output transform, which at a few rows has one CTA per row and
// shard reading all of that row's splits at ~60 bytes/clk (H200, 4096
// columns: ~0.14 us per split). Warp shares (kq > 1) only in plans of one
// wave: every unit first fills its trellis ring (~1 us of HBM latency), and
// kq = 8 or 16 plans of several waves of small units measured 20-55% slower
// than kq = 1 on the H200; and only with a split of k: a unit of the whole
// row (kq = 2 or 4, Llama-3.1 gate_up and 14336x4096 at 2 rows) measured
// 3-9% slower than kq = 1 though the model prices it lower. Ties go to the
// smaller kq.

MmaPlan mma_plan(const ShardRows& shards, int64_t nblk, int64_t rows,
                 int64_t nbt, int sms, int max_log2kq) {
  MmaPlan p{};
  p.shards = shards.count;
  const int64_t m = (int64_t)shards.rb0[shards.count] * 32;
  const double rate = std::min(32.0, 1024.0 / (double)(nbt * 8));
  const double out_ctas =
      (double)std::clamp<int64_t>(rows * shards.count, 1, sms);
  const double unit_x_bytes = (double)rows * nblk * 32 * 2;
  double best = 0;
  int best_splits = 1, best_log2kq = 0;
  int64_t best_groups = 0;
  for (int log2kq = 0; log2kq <= max_log2kq; ++log2kq) {
    const int64_t tpu = kMmaWarps >> log2kq;  // tiles per unit
    int64_t groups = 0;
    for (int s = 0; s < shards.count; ++s)
      groups += (shards.rb0[s + 1] - shards.rb0[s] + tpu - 1) / tpu;
    const double unit_weights = (double)tpu * 32 * nblk * 32;
    const int64_t max_splits =
        std::max<int64_t>(1, nblk / ((int64_t)kStages << log2kq));
    for (int64_t s = log2kq > 0 ? 2 : 1; s <= max_splits; ++s) {
      const int64_t waves = (groups * s + sms - 1) / sms;
      if (log2kq > 0 && waves > 1) break;
      const double t = (double)waves *
                           (unit_weights / rate + unit_x_bytes / 20.0) /
                           (double)s +
                       (double)s * rows * m * 8.0 / ((double)sms * 20.0) +
                       (double)s * rows * m * 4.0 / (out_ctas * 60.0);
      if (best_groups == 0 || t < best) {
        best = t;
        best_splits = (int)s;
        best_log2kq = log2kq;
        best_groups = groups;
      }
    }
  }
  // The kernel resolves units and splits, and a warp's trellis offsets
  // within a row (up to nblk + 8 * kMmaWarps blocks of <= 512 bytes), in
  // 32-bit arithmetic.
  STD_TORCH_CHECK(best_groups * best_splits * sms < INT32_MAX &&
                      nblk * best_splits < INT32_MAX &&
                      (nblk + 8 * kMmaWarps) * 512 < INT32_MAX,
                  "qtip_gemm: ", m, " x ", nblk * 32,
                  " is too large for the fused GEMM's 32-bit work units");
  const int64_t tpu = kMmaWarps >> best_log2kq;
  p.log2kq = best_log2kq;
  p.splits = best_splits;
  p.units = (int)(best_groups * best_splits);
  int u = 0;
  for (int s = 0; s < shards.count; ++s) {
    p.rt0[s] = shards.rb0[s];
    p.row_tiles[s] = shards.rb0[s + 1] - shards.rb0[s];
    p.groups[s] = (int)((p.row_tiles[s] + tpu - 1) / tpu);
    p.unit0[s] = u;
    u += p.groups[s] * best_splits;
  }
  p.unit0[shards.count] = u;
  return p;
}

// One qtip_mma_kernel launch's arguments.
struct MmaArgs {
  const uint8_t* trellis;
  const __half* tlut;
  const uint4* xt;  // at the window's first column
  float* part;
  int m, nblk, rows, nbt;
  int x_extra;  // 16-byte vectors per row of x~ beyond the nblk * 4 read
  MmaConfig config;
  MmaPlan plan;
  int grid;
  InputTransform in;  // in.x == nullptr: x~ is already in xt
};

template <int K, int NB, int kCopies, typename InT, bool kShares>
void launch_mma(const MmaArgs& a, cudaStream_t stream) {
  auto kernel = qtip_mma_kernel<K, NB, kCopies, InT, kShares>;
  static DeviceFlags smem_set;
  ensure_max_dynamic_smem(kernel, smem_set);
  launch_dependent(kernel, dim3(a.grid), dim3(kMmaWarps * 32), a.config.smem,
                   stream, a.trellis, a.tlut, a.xt, a.part, a.m, a.nblk, a.rows,
                   a.nbt, a.config.chunk_blocks, a.plan, a.in, a.x_extra);
}

// in_dtype: the activation dtype when the kernel transforms x itself.
template <int K, int kCopies, int NB, typename InT>
void dispatch_shares(const MmaArgs& a, cudaStream_t stream) {
  if constexpr (NB <= 4) {
    if (a.plan.log2kq > 0)
      return launch_mma<K, NB, kCopies, InT, true>(a, stream);
  }
  launch_mma<K, NB, kCopies, InT, false>(a, stream);
}

template <int K, int kCopies>
void dispatch_nb(const MmaArgs& a, std::optional<ScalarType> in_dtype,
                 cudaStream_t stream) {
  if (in_dtype == ScalarType::Half)
    return dispatch_shares<K, kCopies, 1, __half>(a, stream);
  if (in_dtype == ScalarType::BFloat16)
    return dispatch_shares<K, kCopies, 1, __nv_bfloat16>(a, stream);
  switch (a.config.nb) {
    case 1:
      return dispatch_shares<K, kCopies, 1, void>(a, stream);
    case 2:
      return dispatch_shares<K, kCopies, 2, void>(a, stream);
    case 4:
      return dispatch_shares<K, kCopies, 4, void>(a, stream);
    case 6:
      return dispatch_shares<K, kCopies, 6, void>(a, stream);
    case 8:
      return dispatch_shares<K, kCopies, 8, void>(a, stream);
    default:
      STD_TORCH_CHECK(false, "qtip_gemm: no kernel for ", a.config.nb,
                      " n8 tiles per pass");
  }
}

template <int K>
void launch_decode(const uint8_t* trellis, const __half* tlut, __half* w,
                   const TrellisShape& s, const ShardRows& shards, int grid,
                   int smem, cudaStream_t stream) {
  static DeviceFlags smem_set;
  ensure_max_dynamic_smem(qtip_decode_kernel<K>, smem_set);
  dim3 blocks((unsigned)grid, (unsigned)shards.count);
  qtip_decode_kernel<K><<<blocks, kDecodeThreads, smem, stream>>>(
      trellis, tlut, w, (int)s.n, shards);
}

}  // namespace

void check_device_capability(const Tensor& t, const char* op) {
  // Device properties are cached (vLLM's get_device_prop): no driver query
  // per call.
  const torch::stable::accelerator::DeviceGuard guard(t.get_device_index());
  const cudaDeviceProp* prop = get_device_prop();
  STD_TORCH_CHECK(prop->major >= 8, op,
                  ": the QTIP kernels need compute capability >= 8.0 "
                  "(mma.sync m16n8k16), got ",
                  prop->major, ".", prop->minor);
}

namespace {

// Bytes of the staging buffers that the kernel's own input transform uses:
// X (n fp32), behind it the widest unit's x~ tile (row 0 of its blocks of
// stage_block_bytes(1), padding included, each warp share's blocks rounded
// up to the same count) and, with H_K, the unit's rows of H_K (for the unit
// that needs the most) and the H_K step's partial sums (ksplit * quads <=
// threads, or one per column with ksplit = 1); with kq > 1 last the warp
// shares' sums (apart from the rest: X and the slice outlive the unit).
// Sets in's and plan's offsets.
int64_t own_input_staging(InputTransform& in, MmaPlan& plan, int64_t n) {
  const int64_t nblk = n / 32, splits = plan.splits;
  const int64_t kq = int64_t{1} << plan.log2kq;
  const int64_t widest = (nblk + splits - 1) / splits;
  static_assert(stage_block_bytes(1) % 16 == 0, "H_K rows 16-byte aligned");
  int64_t floats = n + (widest + kq - 1) / kq * kq * (stage_block_bytes(1) / 4);
  if (in.hk > 1) {
    int64_t rows = 0;
    for (int64_t sp = 0; sp < splits; ++sp) {
      const int64_t c0 = nblk * sp / splits * 32;
      const int64_t c1 = nblk * (sp + 1) / splits * 32;
      rows = std::max(rows, ((c1 - 1) >> in.log2P) - (c0 >> in.log2P) + 1);
    }
    in.had_offset = (int)floats;
    floats += (in.hk * rows + 3) / 4 * 4;  // partials 16-byte aligned
    in.partial_offset = (int)floats;
    floats += std::max<int64_t>(4 * kMmaWarps * 32, widest * 32);
  }
  plan.red_offset = (int)(floats * 4);
  if (plan.log2kq > 0) floats += red_bytes(plan.log2kq, 1) / 4;
  return floats * 4;
}

// The fused GEMM's launch: x~ already in *xt (in == nullptr; the trellis
// covers its columns xt_col0 onwards), or made by the kernel itself from
// in->x (one row; xt unused, xt_col0 0). nullopt when in is
// given but what its transform keeps in shared memory does not fit the
// staging buffers (with H_K: the device's shared memory).
std::optional<Tensor> run_mma(const Tensor* xt, int64_t xt_col0, int64_t rows,
                              const Tensor& trellis, const Tensor& tlut,
                              const Weight& weight, const InputTransform* in,
                              std::optional<ScalarType> in_dtype) {
  const TrellisShape& s = weight.s;
  const ShardRows& shards = weight.shards;
  const int64_t nbt = (rows + 7) / 8;
  const torch::stable::accelerator::DeviceGuard guard(
      trellis.get_device_index());
  const cudaDeviceProp* prop = get_device_prop();
  MmaArgs a{};
  a.config = mma_config(*prop, nbt);
  const int sms = prop->multiProcessorCount;
  // Own input with H_K: the H_K step of a unit's columns is the CTA's own
  // work, so warp shares (kq times the columns per unit) would multiply it.
  const int max_log2kq = in == nullptr ? max_chunk_log2kq(a.config)
                         : in->hk > 1  ? 0
                                       : kLog2MmaWarps;
  a.plan = mma_plan(shards, s.n / 32, rows, nbt, sms, max_log2kq);
  if (in != nullptr) {
    a.in = *in;
    const int64_t staging = stage_bytes(a.config.nb, a.config.chunk_blocks);
    int64_t need = own_input_staging(a.in, a.plan, s.n);
    while (need > staging && a.plan.log2kq > 0) {
      // With fewer warp shares the unit's x~ and the sums may fit.
      a.plan = mma_plan(shards, s.n / 32, rows, nbt, sms, a.plan.log2kq - 1);
      need = own_input_staging(a.in, a.plan, s.n);
    }
    if (need > staging) {
      // With H_K (e.g. n = 14336) the launch may take more shared memory.
      if (a.in.hk == 1 || a.config.smem + need - staging >
                              (int64_t)prop->sharedMemPerBlockOptin)
        return std::nullopt;
      a.config.smem += (int)(need - staging);
    }
  }
  Tensor part =
      new_tensor({a.plan.splits, rows, s.m}, ScalarType::Float, trellis);
  if (rows == 0) return part;
  a.grid = std::min(sms, a.plan.units);
  a.trellis = reinterpret_cast<const uint8_t*>(trellis.data_ptr());
  a.tlut = reinterpret_cast<const __half*>(tlut.data_ptr());
  // 8 halves per 16-byte vector (the caller checks the alignment).
  a.xt = xt == nullptr
             ? nullptr
             : reinterpret_cast<const uint4*>(xt->data_ptr()) + xt_col0 / 8;
  a.part = part.mutable_data_ptr<float>();
  a.m = (int)s.m;
  a.nblk = (int)(s.n / 32);
  a.x_extra = xt == nullptr ? 0 : (int)((xt->size(2) - s.n) / 8);
  a.rows = (int)rows;
  a.nbt = (int)nbt;
  auto stream = get_current_cuda_stream();
  auto run = [&](auto k_tag) {
    constexpr int K = decltype(k_tag)::value;
    if (a.config.copies == 32)
      dispatch_nb<K, 32>(a, in_dtype, stream);
    else
      dispatch_nb<K, 16>(a, in_dtype, stream);
  };
  switch (s.K) {
    case 2:
      run(std::integral_constant<int, 2>{});
      break;
    case 3:
      run(std::integral_constant<int, 3>{});
      break;
    default:
      run(std::integral_constant<int, 4>{});
  }
  return part;
}

// The split-K partial sums of x~ (shards, rows, >= col0 + n) times the
// checked weight, whose columns are x~'s col0 onwards.
Tensor mma_partials(const Tensor& xt, int64_t col0, const Tensor& trellis,
                    const Tensor& tlut, const Weight& weight) {
  const int64_t shards = weight.shards.count, n = weight.s.n;
  // Rows of whole 16-byte vectors and a window start on a 32-column block
  // (64 bytes): every staged vector is 16-byte aligned.
  STD_TORCH_CHECK(
      xt.is_cuda() && xt.get_device_index() == trellis.get_device_index() &&
          xt.scalar_type() == ScalarType::Half && xt.is_contiguous() &&
          xt.dim() == 3 && xt.size(0) == shards && xt.size(2) % 8 == 0 &&
          col0 >= 0 && col0 % 32 == 0 && xt.size(2) >= col0 + n &&
          xt.size(2) / 8 < std::numeric_limits<int32_t>::max(),
      "qtip_gemm: x~ must be contiguous float16 (", shards, ", rows, >= ", col0,
      " + ", n, ", a multiple of 8) on cuda:", trellis.get_device_index(),
      " with a column offset that is a multiple of 32, got ", xt.scalar_type(),
      " ", shape(xt), " and offset ", col0);
  STD_TORCH_CHECK(reinterpret_cast<uintptr_t>(xt.data_ptr()) % 16 == 0,
                  "qtip_gemm: x~ data must be 16-byte aligned");
  return *run_mma(&xt, col0, xt.size(1), trellis, tlut, weight, nullptr,
                  std::nullopt);
}

}  // namespace

Tensor qtip_mma(const Tensor& xt, const Tensor& trellis, const Tensor& tlut,
                const std::vector<int64_t>& shard_rows, int64_t col0) {
  return mma_partials(xt, col0, trellis, tlut,
                      check_weight(trellis, tlut, shard_rows, "qtip_gemm"));
}

std::optional<Tensor> qtip_mma_own_input(
    const Tensor& x, const Tensor& su, const std::optional<Tensor>& had_in,
    int64_t in_block, const Tensor& trellis, const Tensor& tlut,
    const std::vector<int64_t>& shard_rows) {
  // Anything else takes the separate input transform, which also says
  // what is wrong with bad arguments.
  const bool activation = x.scalar_type() == ScalarType::Half ||
                          x.scalar_type() == ScalarType::BFloat16;
  if (!activation || x.dim() != 2 || su.dim() != 2 ||
      su.size(0) != (int64_t)shard_rows.size())
    return std::nullopt;
  const int64_t rows = x.size(0), n = su.size(1);
  // had_in as check_had_factor accepted it (float32, square, K > 1, on x's
  // device). With H_K: one block of the whole row, K * P with P a power of
  // two.
  const int64_t hk = had_in.has_value() ? had_in->size(0) : 1;
  if (hk > 1 && (reinterpret_cast<uintptr_t>(had_in->data_ptr()) % 16 != 0 ||
                 in_block != n || n % hk != 0))
    return std::nullopt;
  const int64_t P = in_block / hk;
  if (rows < 1 || rows > kOwnInputMaxRows || !x.is_contiguous() ||
      reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 != 0 ||
      x.get_device_index() != trellis.get_device_index() ||
      su.scalar_type() != ScalarType::Float || !su.is_contiguous() ||
      reinterpret_cast<uintptr_t>(su.data_ptr()) % 16 != 0 ||
      su.get_device_index() != trellis.get_device_index() || x.size(1) != n ||
      trellis.size(1) * 32 != n || (P & (P - 1)) != 0 || P < 8 ||
      n % in_block != 0)
    return std::nullopt;
  InputTransform in{};
  in.x = x.data_ptr();
  in.su = su.const_data_ptr<float>();
  in.had = hk > 1 ? had_in->const_data_ptr<float>() : nullptr;
  in.hk = (int)hk;
  in.log2P = 0;
  while ((int64_t{1} << in.log2P) < P) ++in.log2P;
  in.mult = (float)(1.0 / 32.0 / std::sqrt((double)in_block));
  return run_mma(nullptr, 0, rows, trellis, tlut,
                 check_weight(trellis, tlut, shard_rows, "qtip_gemm"), &in,
                 x.scalar_type());
}

Tensor qtip_gemm(const Tensor& x, const Tensor& trellis, const Tensor& tlut,
                 const std::vector<int64_t>& shard_rows) {
  STD_TORCH_CHECK(
      x.is_cuda() && x.get_device_index() == trellis.get_device_index(),
      "qtip_gemm: x must be on the trellis device cuda:",
      trellis.get_device_index());
  STD_TORCH_CHECK(x.scalar_type() == ScalarType::Half,
                  "qtip_gemm: x must be float16 (the Hadamard-domain "
                  "activations), got ",
                  x.scalar_type());
  const Weight weight = check_weight(trellis, tlut, shard_rows, "qtip_gemm");
  const int64_t shards = weight.shards.count, n = weight.s.n;
  STD_TORCH_CHECK(((x.dim() == 2 && shards == 1) ||
                   (x.dim() == 3 && x.size(0) == shards)) &&
                      x.size(-1) == n,
                  "qtip_gemm: x must have shape (", shards,
                  ", B, n) (or (B, n) for one shard) with n = 32 * "
                  "trellis.size(1) = ",
                  n, ", got ", shape(x));
  Tensor xt = torch::stable::contiguous(
      torch::stable::reshape(x, {shards, x.size(-2), n}));
  // The kernel stages x~ in 16-byte pieces (a view may start anywhere).
  if (reinterpret_cast<uintptr_t>(xt.data_ptr()) % 16 != 0)
    xt = torch::stable::clone(xt);
  return torch::stable::sum(mma_partials(xt, 0, trellis, tlut, weight),
                            std::vector<int64_t>{0});
}

Tensor qtip_decode(const Tensor& trellis, const Tensor& tlut,
                   const std::vector<int64_t>& shard_rows) {
  const auto [s, shards] =
      check_weight(trellis, tlut, shard_rows, "qtip_decode");
  const torch::stable::accelerator::DeviceGuard guard(
      trellis.get_device_index());
  Tensor w = new_tensor({s.m, s.n}, ScalarType::Half, trellis);
  const cudaDeviceProp* prop = get_device_prop();
  const int smem = decode_smem_bytes();
  const int per_sm = std::max<int>(
      1,
      std::min<int>(prop->maxThreadsPerMultiProcessor / kDecodeThreads,
                    (int)(prop->sharedMemPerMultiprocessor / (smem + 1024))));
  // About one wave over all shards: grid.y is the shard and every shard
  // gets the same grid.x, sized for the largest shard (smaller ones finish
  // early).
  int64_t max_rb = 0;
  for (int i = 0; i < shards.count; ++i)
    max_rb = std::max<int64_t>(max_rb, shards.rb0[i + 1] - shards.rb0[i]);
  const int64_t blocks_needed = max_rb * (s.n / 32) / (kDecodeThreads / 32) + 1;
  const int64_t wave = (int64_t)prop->multiProcessorCount * per_sm;
  const int grid = (int)std::max<int64_t>(
      1, std::min<int64_t>(blocks_needed, wave / shards.count));
  auto stream = get_current_cuda_stream();
  const auto* tr = reinterpret_cast<const uint8_t*>(trellis.data_ptr());
  const auto* tl = reinterpret_cast<const __half*>(tlut.data_ptr());
  auto* wp = reinterpret_cast<__half*>(w.data_ptr());
  switch (s.K) {
    case 2:
      launch_decode<2>(tr, tl, wp, s, shards, grid, smem, stream);
      break;
    case 3:
      launch_decode<3>(tr, tl, wp, s, shards, grid, smem, stream);
      break;
    default:
      launch_decode<4>(tr, tl, wp, s, shards, grid, smem, stream);
  }
  check_launch();
  return w;
}

}  // namespace qtip
}  // namespace vllm
