// SPDX-License-Identifier: Apache-2.0
// SPDX-FileCopyrightText: Copyright contributors to the vLLM project
//
// QTIP HYB trellis code (decode_mode "quantlut_sym", L=16, V=2, tlut_bits=9,
// 16x16 tiles, K = 2, 3 or 4 bits per weight): the codebook math and the
// trellis byte layout, shared by every kernel in this directory.
//
// ---------------------------------------------------------------------------
// Memory layout of the trellis (the layout of every published checkpoint)
// ---------------------------------------------------------------------------
// The Hadamard-domain weight W_hat (m x n, m = out_features) is cut into
// 16x16 tiles. Each tile is one tail-biting bitstream of 256*K bits; state t
// (t = 0..127) is the 16-bit window starting at stream bit 2*K*t (circular)
// and decodes to the two weights of one half2.
//
// The in-tile order was chosen so that a decoded tile IS an mma.m16n8k16 A
// fragment: "lane" l owns states 4l..4l+3, which land in its four A
// registers a0..a3 (rows g and g+8, column pairs 2q and 2q+8, g = l/4,
// q = l%4). The 256K-bit stream is cut into 32 lane segments of 8K bits; a
// state window that runs past the end of lane l's segment continues into
// lane l+1's (lane 31 wraps to lane 0), so each lane needs the first 16 bits
// of its neighbour's segment: one warp shuffle per 32-bit word.
//
// Bytes in memory: for each 32x32 block (row block bi over m/32, then column
// block bj over n/32, row-major), for each lane l = 0..31, for (kc, mr) in
// (0,0), (0,1), (1,0), (1,1): K bytes, the lane segment of tile
// (row tile 2bi+mr, column tile 2bj+kc) as a little-endian integer whose
// MSB is the first stream bit. So a lane reads its 4K bytes of a block with
// one vector load (8/12/16 bytes), a warp reads 128K contiguous bytes per
// block, and the blocks of one row block are contiguous along k, which is
// what a warp walking along the reduction dimension wants.
// As a tensor: int16 (m/32, n/32, 64K); column slices (TP) stay whole blocks.
//
// ---------------------------------------------------------------------------
// HYB decode and the shared-memory LUT
// ---------------------------------------------------------------------------
// v = s*(s+1) (only its low 16 bits matter, so garbage above the 16-bit
// window is harmless and no masking is needed); idx = v bits 6..14,
// sign = v bit 15; weights (sign ? -tlut[idx][0] : tlut[idx][0],
// tlut[idx][1]).
// Tricks, each one instruction saved per state (decode is instruction-bound
// on Hopper, not memory-bound):
//  * The sign is folded into a 1024-entry LUT indexed by v bits 6..15, so no
//    XOR after the load.
//  * Entries are kCopies*4 bytes apart with kCopies copies of each entry, one
//    per lane group, so a warp's 32 random lookups hit distinct banks.
//    With 16 copies the byte address is (v & 0xFFC0) | lane_term: a single
//    LOP3 (64 KiB; lanes l and l+16 may still collide, ~2 wavefronts).
//    With 32 copies (128 KiB) every lookup is conflict-free at the cost of
//    one shift.
//  * Window extraction is one SHF or PRMT per state: per tile, a PRMT builds
//    a 32-bit register holding the lane segment followed by the neighbour's
//    leading bits, and each state is a constant right shift of it.
#pragma once

#include <cuda_fp16.h>
#include <stdint.h>

namespace vllm {
namespace qtip {

constexpr int kLutEntries = 1024;  // 512 tlut rows x sign bit
constexpr int kTlutRows = 512;

// Bytes of one trellis 32x32 block / of one lane's share of it.
template <int K>
struct TrellisBlock {
  static constexpr int kBytes = 128 * K;
  static constexpr int kLaneBytes = 4 * K;
  static constexpr int kLaneWords = K;
};

template <int kCopies>
struct SignedLut {
  static_assert(kCopies == 16 || kCopies == 32, "16 or 32 LUT copies");
  static constexpr int kBytes = kLutEntries * kCopies * 4;

  // Fills the replicated, sign-folded LUT from tlut (512 x 2 fp16, 4-byte
  // aligned rows) with kThreads threads. Thread t writes the 16-byte vectors
  // t + p * kThreads (4 copies of one entry each): one tlut load per pass
  // serves entry e and its negated twin e + 512, all loads are issued
  // before the stores, and every address is a constant offset from the
  // thread's base (no index arithmetic in the loop).
  template <int kThreads>
  __device__ __forceinline__ static void fill(uint32_t* lut,
                                              const __half* __restrict__ tlut,
                                              int tid) {
    constexpr int kVecPerEntry = kCopies / 4;
    constexpr int kEntriesPerPass = kThreads / kVecPerEntry;
    static_assert(
        kThreads % kVecPerEntry == 0 && kTlutRows % kEntriesPerPass == 0,
        "fill: thread count must tile the table");
    constexpr int kPasses = kTlutRows / kEntriesPerPass;
    const uint32_t* rows =
        reinterpret_cast<const uint32_t*>(tlut) + tid / kVecPerEntry;
    uint4* out = reinterpret_cast<uint4*>(lut) + tid;
    uint32_t val[kPasses];
#pragma unroll
    for (int p = 0; p < kPasses; ++p)
      val[p] = __ldg(rows + p * kEntriesPerPass);
#pragma unroll
    for (int p = 0; p < kPasses; ++p) {
      // half2 (w0 low, w1 high); entries 512.. negate w0.
      const uint32_t neg = val[p] ^ (1u << 15);
      out[p * kThreads] = make_uint4(val[p], val[p], val[p], val[p]);
      out[p * kThreads + kTlutRows * kVecPerEntry] =
          make_uint4(neg, neg, neg, neg);
    }
  }

  __device__ __forceinline__ static uint32_t lane_term(int lane) {
    return kCopies == 16 ? (uint32_t)(lane & 15) << 2 : (uint32_t)lane << 2;
  }

  // State (16-bit window in the low bits, garbage above) -> half2 bits.
  __device__ __forceinline__ static uint32_t lookup(const char* lut, uint32_t s,
                                                    uint32_t lane_term) {
    uint32_t v = s * s + s;
    uint32_t addr = kCopies == 16 ? ((v & 0xFFC0u) | lane_term)
                                  : (((v << 1) & 0x1FF80u) | lane_term);
    return *reinterpret_cast<const uint32_t*>(lut + addr);
  }
};

// Streaming 4K-byte load of one lane's share of a block (read once, do not
// keep in L1).
template <int K>
__device__ __forceinline__ void load_lane(const uint8_t* p, uint32_t (&w)[K]) {
  if constexpr (K == 2) {
    asm volatile("ld.global.cs.v2.u32 {%0,%1}, [%2];"
                 : "=r"(w[0]), "=r"(w[1])
                 : "l"(p));
  } else if constexpr (K == 4) {
    asm volatile("ld.global.cs.v4.u32 {%0,%1,%2,%3}, [%4];"
                 : "=r"(w[0]), "=r"(w[1]), "=r"(w[2]), "=r"(w[3])
                 : "l"(p));
  } else {
    // 12 bytes at a 4-byte aligned address.
    asm volatile(
        "ld.global.cs.u32 %0, [%3];\n\t"
        "ld.global.cs.u32 %1, [%3+4];\n\t"
        "ld.global.cs.u32 %2, [%3+8];"
        : "=r"(w[0]), "=r"(w[1]), "=r"(w[2])
        : "l"(p));
  }
}

// Decodes one lane's share of a 32x32 block into the A fragments of its four
// 16x16 tiles: frag[kc*2 + mr][0..3] = a0..a3 of tile (mr, kc). All lanes of
// the warp must call it together (it shuffles).
template <int K, int kCopies>
__device__ __forceinline__ void decode_block(const uint32_t (&w)[K],
                                             const char* lut,
                                             uint32_t lane_term, int lane,
                                             uint32_t (&frag)[4][4]) {
  using Lut = SignedLut<kCopies>;
  const int src = (lane + 1) & 31;
  if constexpr (K == 2) {
    // Segments are 16 bits: tiles 0/1 in w0 low/high, tiles 2/3 in w1.
    uint32_t n0 = __shfl_sync(0xffffffffu, w[0], src);
    uint32_t n1 = __shfl_sync(0xffffffffu, w[1], src);
    uint32_t hi[4] = {
        __byte_perm(w[0], n0, 0x1054), __byte_perm(w[0], n0, 0x3276),
        __byte_perm(w[1], n1, 0x1054), __byte_perm(w[1], n1, 0x3276)};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      // hi = segment << 16 | next segment; state j at stream bit 4j. The
      // first window of tiles 0 and 2 is a word's low half as it stands
      // (bits above the window are harmless): no shift.
      frag[i][0] = Lut::lookup(lut, i & 1 ? hi[i] >> 16 : w[i >> 1], lane_term);
#pragma unroll
      for (int j = 1; j < 4; ++j)
        frag[i][j] = Lut::lookup(lut, hi[i] >> (16 - 4 * j), lane_term);
    }
  } else if constexpr (K == 3) {
    // Normalize the four 24-bit segments into bytes 0..2 of S[i].
    uint32_t S[4] = {w[0], __byte_perm(w[0], w[1], 0x0543),
                     __byte_perm(w[1], w[2], 0x0432), w[2] >> 8};
    // The neighbour's two leading bytes (segment bytes 2 and 1) per tile.
    uint32_t q0 = __byte_perm(S[0], S[1], 0x6521);
    uint32_t q1 = __byte_perm(S[2], S[3], 0x6521);
    uint32_t n[2] = {__shfl_sync(0xffffffffu, q0, src),
                     __shfl_sync(0xffffffffu, q1, src)};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const uint32_t o = 2 * (i & 1);
      // hi = [next b2 | seg b0 | seg b1 | seg b2]: stream bits 0..31.
      uint32_t hi = __byte_perm(S[i], n[i >> 1], 0x2100 | (5 + o));
      // g = [next b1 | next b2 | seg b0]: stream bits 18..33 at g >> 6.
      uint32_t g = __byte_perm(S[i], n[i >> 1], ((5 + o) << 4) | (4 + o));
      frag[i][0] = Lut::lookup(lut, hi >> 16, lane_term);
      frag[i][1] = Lut::lookup(lut, hi >> 10, lane_term);
      frag[i][2] = Lut::lookup(lut, hi >> 4, lane_term);
      frag[i][3] = Lut::lookup(lut, g >> 6, lane_term);
    }
  } else {
    static_assert(K == 4, "K must be 2, 3 or 4");
    // Only the neighbour's top byte per tile is needed: pack four into one
    // word so a single shuffle serves all four tiles.
    uint32_t a = __byte_perm(w[0], w[1], 0x0073);
    uint32_t b = __byte_perm(w[2], w[3], 0x0073);
    uint32_t np = __shfl_sync(0xffffffffu, __byte_perm(a, b, 0x5410), src);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      frag[i][0] = Lut::lookup(lut, w[i] >> 16, lane_term);
      frag[i][1] = Lut::lookup(lut, w[i] >> 8, lane_term);
      frag[i][2] = Lut::lookup(lut, w[i], lane_term);
      frag[i][3] =
          Lut::lookup(lut, __byte_perm(w[i], np, 0x2104 + i), lane_term);
    }
  }
}

// Decodes half of a lane's share of a 32x32 block: the two tiles of 16-row
// half mr (warp-uniform, 0 or 1), frag[kc] = a0..a3 of tile (mr, kc), the
// tiles that decode_block puts in frag[kc * 2 + mr], by the same math (the
// tile's bytes picked at run time instead of unrolled over all four). All
// lanes of the warp must call it together (it shuffles).
template <int K, int kCopies>
__device__ __forceinline__ void decode_half(const uint32_t (&w)[K], int mr,
                                            const char* lut, uint32_t lane_term,
                                            int lane, uint32_t (&frag)[2][4]) {
  using Lut = SignedLut<kCopies>;
  const int src = (lane + 1) & 31;
  if constexpr (K == 2) {
    const uint32_t n0 = __shfl_sync(0xffffffffu, w[0], src);
    const uint32_t n1 = __shfl_sync(0xffffffffu, w[1], src);
    const uint32_t sel = mr ? 0x3276u : 0x1054u;
    // hi = segment << 16 | next segment; state j at stream bit 4j.
    const uint32_t hi[2] = {__byte_perm(w[0], n0, sel),
                            __byte_perm(w[1], n1, sel)};
#pragma unroll
    for (int kc = 0; kc < 2; ++kc)
#pragma unroll
      for (int j = 0; j < 4; ++j)
        frag[kc][j] = Lut::lookup(lut, hi[kc] >> (16 - 4 * j), lane_term);
  } else if constexpr (K == 3) {
    const uint32_t S[4] = {w[0], __byte_perm(w[0], w[1], 0x0543),
                           __byte_perm(w[1], w[2], 0x0432), w[2] >> 8};
    const uint32_t q0 = __byte_perm(S[0], S[1], 0x6521);
    const uint32_t q1 = __byte_perm(S[2], S[3], 0x6521);
    const uint32_t n[2] = {__shfl_sync(0xffffffffu, q0, src),
                           __shfl_sync(0xffffffffu, q1, src)};
    const uint32_t o = 2 * mr;
#pragma unroll
    for (int kc = 0; kc < 2; ++kc) {
      const uint32_t seg = mr ? S[2 * kc + 1] : S[2 * kc];
      const uint32_t hi = __byte_perm(seg, n[kc], 0x2100 | (5 + o));
      const uint32_t g = __byte_perm(seg, n[kc], ((5 + o) << 4) | (4 + o));
      frag[kc][0] = Lut::lookup(lut, hi >> 16, lane_term);
      frag[kc][1] = Lut::lookup(lut, hi >> 10, lane_term);
      frag[kc][2] = Lut::lookup(lut, hi >> 4, lane_term);
      frag[kc][3] = Lut::lookup(lut, g >> 6, lane_term);
    }
  } else {
    static_assert(K == 4, "K must be 2, 3 or 4");
    const uint32_t a = __byte_perm(w[0], w[1], 0x0073);
    const uint32_t b = __byte_perm(w[2], w[3], 0x0073);
    const uint32_t np =
        __shfl_sync(0xffffffffu, __byte_perm(a, b, 0x5410), src);
#pragma unroll
    for (int kc = 0; kc < 2; ++kc) {
      const int i = 2 * kc + mr;
      const uint32_t seg = mr ? w[2 * kc + 1] : w[2 * kc];
      frag[kc][0] = Lut::lookup(lut, seg >> 16, lane_term);
      frag[kc][1] = Lut::lookup(lut, seg >> 8, lane_term);
      frag[kc][2] = Lut::lookup(lut, seg, lane_term);
      frag[kc][3] =
          Lut::lookup(lut, __byte_perm(seg, np, 0x2104 + i), lane_term);
    }
  }
}

// D (16x8 fp32) += A (16x16 fp16, row) * B (16x8 fp16, col).
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4],
                                          uint32_t b0, uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
      "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#else
  __trap();
#endif
}

}  // namespace qtip
}  // namespace vllm
