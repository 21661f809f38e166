// SPDX-License-Identifier: Apache-2.0
// SPDX-FileCopyrightText: Copyright contributors to the vLLM project
//
// Fused HYB trellis decode + tensor-core GEMM for small batches, and the
// decode-to-dense kernel for large batches. The byte layout and the decode
// tricks are described in qtip_codebook.cuh.
//
// Fused GEMM (y[B, m] = x[B, n] @ W_hat^T, B <= 32 per launch):
//  * Work unit of a warp = one 32x32 block (2x2 tiles) of W_hat. It loads its
//    4K bytes per lane, decodes the four tiles straight into mma A fragments
//    (W_hat rows = mma M, the reduction dimension = mma K) and multiplies them
//    by the activations as B fragments (batch = mma N: one n8 tile for B <= 8,
//    two for <= 16, four for <= 32). The decode is shared by all batch rows,
//    which is why batch 16 costs little more than batch 1.
//  * A thread block owns one 32-row block of W_hat and a contiguous range of
//    its column blocks (split-K); its warps interleave over that range, so a
//    block streams contiguous memory. Warp partial sums are reduced in shared
//    memory, then blocks of the same rows are combined with fp32 atomics
//    (plain stores when there is one split).
//  * The grid is sized from the SM count: the number of splits is the largest
//    with (m/32) * splits <= SMs * blocks/SM (one wave). Each block builds the
//    LUT once, so fewer, longer blocks amortize it.
//  * Trellis loads are 8/12/16-byte streaming loads (ld.global.cs), kept
//    kStages deep in registers so several blocks are in flight per warp;
//    activations are re-read through L1/L2 by every row block.
// fp32 accumulation throughout, as in the reference kernel.

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/all.h>

#include <algorithm>

#include "qtip_codebook.cuh"
#include "qtip_launch.cuh"
#include "qtip_ops.h"

namespace vllm {
namespace qtip {

namespace kernels {

constexpr int kGemmThreads = 256;
constexpr int kDecodeThreads = 256;
// LUT copies of every launch: 16 (64 KiB, fits 3 blocks per SM and GPUs
// with ~100 KiB of shared memory per block).
constexpr int kCopies = 16;

__device__ __forceinline__ uint32_t ldg_u32(const __half* p) {
  return __ldg(reinterpret_cast<const unsigned int*>(p));
}

// Blocks per SM the launch bounds aim at (the register budget follows).
template <int NB>
constexpr int gemm_blocks_per_sm() {
  return NB <= 2 ? 3 : 2;
}

template <int K, int NB, int kStages>
__global__ void __launch_bounds__(kGemmThreads, gemm_blocks_per_sm<NB>())
    qtip_gemm_kernel(const __half* __restrict__ x, int rows, int n,
                     int64_t x_shard_stride, ShardRows shards,
                     const uint8_t* __restrict__ trellis,
                     const __half* __restrict__ tlut, float* __restrict__ y,
                     int m, int splits, bool accumulate) {
  using Lut = SignedLut<kCopies>;
  using Blk = TrellisBlock<K>;
  constexpr int kWarps = kGemmThreads / 32;
  constexpr int kCols = NB * 8;  // batch columns of the mma

  extern __shared__ __align__(16) char smem[];
  char* lut = smem;
  float* red = reinterpret_cast<float*>(smem + Lut::kBytes);  // [kCols][32]

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int split = blockIdx.x, bi = blockIdx.y;
  const int nblk = n / 32;
  // The shard of this row block: its activations (x * SU_s, transformed)
  // and its table.
  const int shard = shards.shard_of(bi);
  x += shard * x_shard_stride;
  tlut += shard * kTlutRows * 2;
  const int c0 = (int)((int64_t)split * nblk / splits);
  const int c1 = (int)((int64_t)(split + 1) * nblk / splits);

  // Issue the first trellis loads before building the LUT, so their latency
  // overlaps the shared-memory fill.
  const uint8_t* row_ptr = trellis + (size_t)bi * nblk * Blk::kBytes +
                           lane * Blk::kLaneBytes;
  const int g = lane >> 2, q = lane & 3;
  const __half* xrow[NB];
  bool xvalid[NB];
#pragma unroll
  for (int nb = 0; nb < NB; ++nb) {
    const int r = nb * 8 + g;
    xvalid[nb] = r < rows;
    xrow[nb] = x + (size_t)(xvalid[nb] ? r : 0) * n + 2 * q;
  }

  uint32_t w[kStages][K];
  uint32_t bf[kStages][2][NB][2];
  auto load = [&](int cb, uint32_t(&ws)[K], uint32_t(&bs)[2][NB][2]) {
    load_lane<K>(row_ptr + (size_t)cb * Blk::kBytes, ws);
#pragma unroll
    for (int kc = 0; kc < 2; ++kc)
#pragma unroll
      for (int nb = 0; nb < NB; ++nb) {
        const __half* p = xrow[nb] + cb * 32 + kc * 16;
        bs[kc][nb][0] = xvalid[nb] ? ldg_u32(p) : 0u;
        bs[kc][nb][1] = xvalid[nb] ? ldg_u32(p + 8) : 0u;
      }
  };
#pragma unroll
  for (int st = 0; st < kStages; ++st) {
    const int cb = c0 + warp + st * kWarps;
    if (cb < c1) load(cb, w[st], bf[st]);
  }

  Lut::fill(reinterpret_cast<uint32_t*>(lut), tlut, tid, kGemmThreads);
  for (int i = tid; i < kCols * 32; i += kGemmThreads) red[i] = 0.f;
  __syncthreads();

  const uint32_t lane_term = Lut::lane_term(lane);
  float acc[2][NB][4];
#pragma unroll
  for (int mr = 0; mr < 2; ++mr)
#pragma unroll
    for (int nb = 0; nb < NB; ++nb)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[mr][nb][i] = 0.f;

  for (int base = c0 + warp; base < c1; base += kStages * kWarps) {
#pragma unroll
    for (int st = 0; st < kStages; ++st) {
      const int cb = base + st * kWarps;
      if (cb < c1) {  // warp-uniform
        uint32_t frag[4][4];
        decode_block<K, kCopies>(w[st], lut, lane_term, lane, frag);
#pragma unroll
        for (int kc = 0; kc < 2; ++kc)
#pragma unroll
          for (int mr = 0; mr < 2; ++mr)
#pragma unroll
            for (int nb = 0; nb < NB; ++nb)
              mma_16816(acc[mr][nb], frag[kc * 2 + mr], bf[st][kc][nb][0],
                        bf[st][kc][nb][1]);
        const int nx = cb + kStages * kWarps;
        if (nx < c1) load(nx, w[st], bf[st]);
      }
    }
  }

  // C fragment: c0 (row g, col 2q), c1 (g, 2q+1), c2 (g+8, 2q), c3 (g+8,
  // 2q+1); rows are W_hat rows, columns batch rows.
#pragma unroll
  for (int mr = 0; mr < 2; ++mr)
#pragma unroll
    for (int nb = 0; nb < NB; ++nb)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int col = nb * 8 + 2 * q + (i & 1);
        const int r = mr * 16 + g + 8 * (i >> 1);
        if (col < rows) atomicAdd(&red[col * 32 + r], acc[mr][nb][i]);
      }
  __syncthreads();
  const int nout = 32 * min(rows, kCols);
  for (int i = tid; i < nout; i += kGemmThreads) {
    const int col = i >> 5, r = i & 31;
    float* dst = y + (size_t)col * m + bi * 32 + r;
    if (!accumulate)
      *dst = red[i];
    else
      atomicAdd(dst, red[i]);
  }
}

template <int K>
__global__ void __launch_bounds__(kDecodeThreads)
    qtip_decode_kernel(const uint8_t* __restrict__ trellis,
                       const __half* __restrict__ tlut, __half* __restrict__ w,
                       int n, ShardRows shards) {
  using Lut = SignedLut<kCopies>;
  using Blk = TrellisBlock<K>;
  constexpr int kWarps = kDecodeThreads / 32;
  extern __shared__ __align__(16) char smem[];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  // blockIdx.y is the shard: one table per block.
  const int shard = blockIdx.y;
  Lut::fill(reinterpret_cast<uint32_t*>(smem), tlut + shard * kTlutRows * 2,
            tid, kDecodeThreads);
  __syncthreads();
  const uint32_t lane_term = Lut::lane_term(lane);
  const int g = lane >> 2, q = lane & 3;
  const int nblk = n / 32;
  const int64_t first = (int64_t)shards.rb0[shard] * nblk;
  const int64_t total = (int64_t)shards.rb0[shard + 1] * nblk;
  for (int64_t t = first + (int64_t)blockIdx.x * kWarps + warp; t < total;
       t += (int64_t)gridDim.x * kWarps) {
    uint32_t ws[K];
    load_lane<K>(trellis + t * Blk::kBytes + lane * Blk::kLaneBytes, ws);
    uint32_t frag[4][4];
    decode_block<K, kCopies>(ws, smem, lane_term, lane, frag);
    const int bi = (int)(t / nblk), bj = (int)(t % nblk);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int mr = i & 1, kc = i >> 1;
      __half* p = w + (size_t)(bi * 32 + mr * 16 + g) * n + bj * 32 + kc * 16 +
                  2 * q;
      // a0 (g, 2q), a1 (g+8, 2q), a2 (g, 2q+8), a3 (g+8, 2q+8)
      *reinterpret_cast<uint32_t*>(p) = frag[i][0];
      *reinterpret_cast<uint32_t*>(p + 8 * (size_t)n) = frag[i][1];
      *reinterpret_cast<uint32_t*>(p + 8) = frag[i][2];
      *reinterpret_cast<uint32_t*>(p + 8 * (size_t)n + 8) = frag[i][3];
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

TrellisShape check_trellis(const torch::Tensor& trellis, const char* op) {
  TORCH_CHECK(trellis.is_cuda(), op, ": trellis must be a CUDA tensor");
  TORCH_CHECK(trellis.scalar_type() == at::kShort, op,
              ": trellis must be int16, got ", trellis.scalar_type());
  TORCH_CHECK(trellis.dim() == 3, op,
              ": trellis must be 3-D (m/32, n/32, 64*K), got shape ",
              trellis.sizes());
  TORCH_CHECK(trellis.is_contiguous(), op, ": trellis must be contiguous");
  const int64_t last = trellis.size(2);
  TORCH_CHECK(last == 128 || last == 192 || last == 256, op,
              ": trellis last dim must be 64*K for K in {2, 3, 4}, got ", last);
  TORCH_CHECK(trellis.size(0) > 0 && trellis.size(1) > 0, op,
              ": trellis is empty, shape ", trellis.sizes());
  TORCH_CHECK(reinterpret_cast<uintptr_t>(trellis.data_ptr()) % 16 == 0, op,
              ": trellis data must be 16-byte aligned");
  check_device_capability(trellis, op);
  return {trellis.size(0) * 32, trellis.size(1) * 32, (int)(last / 64)};
}

// At most one wave: the most splits with (m/32) * splits <= SMs * blocks per
// SM, each warp keeping at least two column blocks. Short
// blocks pay the LUT build and the epilogue (fp32 atomics) again, and a
// second, partly filled wave idles SMs (H100 measurements in NOTES.md).
int gemm_splits(const cudaDeviceProp& prop, const TrellisShape& s, int nb) {
  const int64_t rb = s.m / 32, cb = s.n / 32;
  const int smem = SignedLut<kCopies>::kBytes + nb * 8 * 32 * 4;
  const int bounds = nb <= 2 ? gemm_blocks_per_sm<1>() : gemm_blocks_per_sm<4>();
  const int per_sm = std::max<int>(
      1, std::min<int>(bounds, (int)(prop.sharedMemPerMultiprocessor /
                                     (smem + 1024))));
  const int64_t target = (int64_t)prop.multiProcessorCount * per_sm;
  const int64_t max_splits = std::max<int64_t>(1, cb / (kGemmThreads / 32 * 2));
  return (int)std::clamp<int64_t>(target / rb, 1, max_splits);
}

// Arguments of one fused GEMM launch (one chunk of at most 32 batch rows).
struct GemmArgs {
  const __half* x;
  int rows;
  int64_t x_shard_stride;
  ShardRows shards;
  const uint8_t* trellis;
  const __half* tlut;
  float* y;
  int splits;
  bool accumulate;
};

template <int K, int NB>
void launch_gemm(const GemmArgs& a, const TrellisShape& s,
                 cudaStream_t stream) {
  constexpr int kStages = NB <= 2 ? 3 : 2;
  auto kernel = qtip_gemm_kernel<K, NB, kStages>;
  const int smem = SignedLut<kCopies>::kBytes + NB * 8 * 32 * 4;
  static DeviceFlags smem_set;
  ensure_max_dynamic_smem(kernel, smem_set);
  dim3 grid(a.splits, (unsigned)(s.m / 32));
  kernel<<<grid, kGemmThreads, smem, stream>>>(
      a.x, a.rows, (int)s.n, a.x_shard_stride, a.shards, a.trellis, a.tlut,
      a.y, (int)s.m, a.splits, a.accumulate);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <int K>
void gemm_dispatch_nb(const GemmArgs& a, const TrellisShape& s,
                      cudaStream_t stream) {
  if (a.rows <= 8)
    launch_gemm<K, 1>(a, s, stream);
  else if (a.rows <= 16)
    launch_gemm<K, 2>(a, s, stream);
  else
    launch_gemm<K, 4>(a, s, stream);
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

// tlut: (512, 2) for one shard or (shards, 512, 2).
void check_tlut(const torch::Tensor& tlut, const torch::Tensor& trellis,
                int64_t shards, const char* op) {
  TORCH_CHECK(tlut.is_cuda() && tlut.device() == trellis.device(), op,
              ": tlut must be on the trellis device ", trellis.device());
  TORCH_CHECK(tlut.scalar_type() == at::kHalf, op,
              ": tlut must be float16, got ", tlut.scalar_type());
  const bool one = tlut.dim() == 2 && shards == 1;
  const bool stacked = tlut.dim() == 3 && tlut.size(0) == shards;
  TORCH_CHECK((one || stacked) && tlut.size(-2) == kTlutRows &&
                  tlut.size(-1) == 2,
              op, ": tlut must have shape (", shards,
              ", 512, 2) (or (512, 2) for one shard), got ", tlut.sizes());
  TORCH_CHECK(tlut.is_contiguous(), op, ": tlut must be contiguous");
  TORCH_CHECK(reinterpret_cast<uintptr_t>(tlut.data_ptr()) % 4 == 0, op,
              ": tlut data must be 4-byte aligned");
}

}  // namespace

void check_device_capability(const torch::Tensor& t, const char* op) {
  // Device properties are cached by PyTorch: no driver query per call.
  const cudaDeviceProp* prop =
      at::cuda::getDeviceProperties(t.device().index());
  TORCH_CHECK(prop->major >= 8, op,
              ": the QTIP kernels need compute capability >= 8.0 "
              "(mma.sync m16n8k16), got ",
              prop->major, ".", prop->minor);
}

torch::Tensor qtip_gemm(const torch::Tensor& x, const torch::Tensor& trellis,
                        const torch::Tensor& tlut,
                        c10::IntArrayRef shard_rows) {
  const TrellisShape s = check_trellis(trellis, "qtip_gemm");
  const ShardRows shards = make_shard_rows(shard_rows, s.m, "qtip_gemm");
  check_tlut(tlut, trellis, shards.count, "qtip_gemm");
  TORCH_CHECK(x.is_cuda() && x.device() == trellis.device(),
              "qtip_gemm: x must be on the trellis device ", trellis.device());
  TORCH_CHECK(x.scalar_type() == at::kHalf,
              "qtip_gemm: x must be float16 (the Hadamard-domain "
              "activations), got ",
              x.scalar_type());
  const bool per_shard = x.dim() == 3;
  TORCH_CHECK(((x.dim() == 2 && shards.count == 1) ||
               (per_shard && x.size(0) == shards.count)) &&
                  x.size(-1) == s.n,
              "qtip_gemm: x must have shape (", shards.count,
              ", B, n) (or (B, n) for one shard) with n = 32 * "
              "trellis.size(1) = ",
              s.n, ", got ", x.sizes());
  TORCH_CHECK(x.is_contiguous(), "qtip_gemm: x must be contiguous");
  TORCH_CHECK(reinterpret_cast<uintptr_t>(x.data_ptr()) % 4 == 0,
              "qtip_gemm: x data must be 4-byte aligned");
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t rows = x.size(-2);
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  const int nb_first = rows <= 8 ? 1 : rows <= 16 ? 2 : 4;
  const int splits = gemm_splits(*prop, s, nb_first);
  // Chunks of 32 rows write disjoint rows of y; splits add into them.
  const bool accumulate = splits > 1;
  auto y = accumulate
               ? torch::zeros({rows, s.m}, x.options().dtype(at::kFloat))
               : torch::empty({rows, s.m}, x.options().dtype(at::kFloat));
  if (rows == 0) return y;
  auto stream = at::cuda::getCurrentCUDAStream();
  GemmArgs a{};
  a.x_shard_stride = rows * s.n;
  a.shards = shards;
  a.trellis = reinterpret_cast<const uint8_t*>(trellis.data_ptr());
  a.tlut = reinterpret_cast<const __half*>(tlut.data_ptr());
  a.splits = splits;
  a.accumulate = accumulate;
  // Batches above 32 rows run in chunks of 32 (each re-decodes W_hat).
  for (int64_t r0 = 0; r0 < rows; r0 += 32) {
    a.rows = (int)std::min<int64_t>(32, rows - r0);
    a.x = reinterpret_cast<const __half*>(x.data_ptr()) + r0 * s.n;
    a.y = y.data_ptr<float>() + r0 * s.m;
    switch (s.K) {
      case 2:
        gemm_dispatch_nb<2>(a, s, stream);
        break;
      case 3:
        gemm_dispatch_nb<3>(a, s, stream);
        break;
      default:
        gemm_dispatch_nb<4>(a, s, stream);
    }
  }
  return y;
}

torch::Tensor qtip_decode(const torch::Tensor& trellis,
                          const torch::Tensor& tlut,
                          c10::IntArrayRef shard_rows) {
  const TrellisShape s = check_trellis(trellis, "qtip_decode");
  const ShardRows shards = make_shard_rows(shard_rows, s.m, "qtip_decode");
  check_tlut(tlut, trellis, shards.count, "qtip_decode");
  const c10::cuda::CUDAGuard guard(trellis.device());
  auto w = torch::empty({s.m, s.n}, trellis.options().dtype(at::kHalf));
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  const int smem = SignedLut<kCopies>::kBytes;
  const int per_sm = std::max<int>(
      1, std::min<int>(prop->maxThreadsPerMultiProcessor / kDecodeThreads,
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
  auto stream = at::cuda::getCurrentCUDAStream();
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
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return w;
}

}  // namespace qtip
}  // namespace vllm
