// SPDX-License-Identifier: Apache-2.0
// SPDX-FileCopyrightText: Copyright contributors to the vLLM project
//
// Host entry points of the QTIP ops (registered in torch_bindings.cpp), on
// the stable libtorch ABI, and the host helpers they share.
#pragma once

#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>

#include <cuda_runtime.h>

#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include "libtorch_stable/torch_utils.h"

namespace vllm {
namespace qtip {

using Tensor = torch::stable::Tensor;
using ScalarType = torch::headeronly::ScalarType;

// "(d0, d1, ...)" for error messages.
inline std::string shape(const Tensor& t) {
  std::ostringstream out;
  out << "(";
  for (int64_t d = 0; d < t.dim(); ++d) out << (d ? ", " : "") << t.size(d);
  out << ")";
  return out.str();
}

inline std::string join(const std::vector<int64_t>& v) {
  std::ostringstream out;
  out << "[";
  for (size_t i = 0; i < v.size(); ++i) out << (i ? ", " : "") << v[i];
  out << "]";
  return out.str();
}

inline void check_cuda(cudaError_t err) {
  STD_TORCH_CHECK(err == cudaSuccess, "CUDA error: ", cudaGetErrorString(err));
}

inline void check_launch() { check_cuda(cudaGetLastError()); }

// An uninitialized tensor of `dtype` on the device of `like`.
inline Tensor new_tensor(std::vector<int64_t> sizes, ScalarType dtype,
                         const Tensor& like) {
  return torch::stable::empty(sizes, dtype, std::nullopt, like.device());
}

// An aten op that returns one tensor, through the stable dispatcher (for
// the ops torch 2.11 has no stable wrapper for). Arguments in schema order,
// keyword-only ones included; int lists as IntHeaderOnlyArrayRef.
template <typename... Args>
Tensor call_aten(const char* op, const char* overload, const Args&... args) {
  std::array<StableIValue, sizeof...(Args)> stack{
      torch::stable::detail::from(args)...};
  TORCH_ERROR_CODE_CHECK(
      torch_call_dispatcher(op, overload, stack.data(), TORCH_ABI_VERSION));
  return torch::stable::detail::to<Tensor>(stack[0]);
}

// The trellis ops take one or several shards of a fused layer (q/k/v,
// gate/up): their trellises back to back along m, shard_rows their row
// counts, tlut (512, 2) or (shards, 512, 2), one per shard.

// Fused trellis decode + tensor-core GEMM: y (B, m) fp32 = x @ W_hat^T,
// W_hat decoded from trellis (m/32, n/32, 64K) int16; x (B, n) fp16, or
// (shards, B, n) with one input per shard.
Tensor qtip_gemm(const Tensor& x, const Tensor& trellis, const Tensor& tlut,
                 const std::vector<int64_t>& shard_rows);

// The fused GEMM on x~ (shards, rows, n_x) fp16, row-major and 16-byte
// aligned (qtip_hadamard's output): fp32 split-K partial sums (splits,
// rows, m), to be added in split order (qtip_hadamard does it as it loads
// them). The trellis (n columns) covers x~'s columns col0 .. col0 + n - 1
// (col0 a multiple of 32; col0 = 0 and n_x = n for a whole layer).
Tensor qtip_mma(const Tensor& xt, const Tensor& trellis, const Tensor& tlut,
                const std::vector<int64_t>& shard_rows, int64_t col0);

// The same from x (rows, n) itself, for one row and power-of-two input
// Hadamard blocks, or one block of the whole row with an H_K factor: the
// GEMM makes its x~ = fp16(Hn^T (SU_s * x) / 32) in shared memory (the input
// transform of qtip_linear, one launch fewer); nullopt when the call does
// not qualify. had_in must have passed check_had_factor.
std::optional<Tensor> qtip_mma_own_input(
    const Tensor& x, const Tensor& su, const std::optional<Tensor>& had_in,
    int64_t in_block, const Tensor& trellis, const Tensor& tlut,
    const std::vector<int64_t>& shard_rows);

// Decode the whole W_hat (m, n) in fp16.
Tensor qtip_decode(const Tensor& trellis, const Tensor& tlut,
                   const std::vector<int64_t>& shard_rows);

// y = factor * out_scale * H(in_scale * x) along the last dim of x (rows, n),
// computed in fp32; x may also be float32 split-K partial sums (splits,
// rows, n), added in order first. The columns are split into segments of
// segment_sizes, each transformed block-diagonally with blocks of its
// block_sizes entry, H_b = (H_K kron Sylvester) / sqrt(b) (H_K^T when
// transpose); had_k is H_K as float32 (K, K), None for powers of two. in_scale
// (shards, n) gives one output copy per shard: y (shards, rows, n).
Tensor qtip_hadamard(const Tensor& x, const std::optional<Tensor>& in_scale,
                     const std::optional<Tensor>& out_scale,
                     const std::optional<Tensor>& had_k, bool transpose,
                     const std::vector<int64_t>& block_sizes,
                     const std::vector<int64_t>& segment_sizes, double factor,
                     ScalarType out_dtype);

// Whether `rows` rows (times copies) in blocks of `block` columns with an H_K
// of size K are transformed in one pass on the tensor cores: K x 512 with
// K <= 32 from 33 rows (qtip_hk512_kernel, split-K partials included), K x 64
// with 32 < K <= 176 from 128 rows (qtip_hk64_kernel for fp16 input without
// an input scale, the dense path's output side). Then the dense path leaves
// H_K to them rather than to cuBLAS.
bool hadamard_one_pass(int64_t K, int64_t block, int64_t rows);
// The same for the input side of either path (qtip_hadamard with
// transpose, no partials): K x 64 blocks from kHk64InMinRows rows
// (qtip_hk64_in_kernel), K x 512 ones from kHk512InMinRows.
bool input_one_pass(int64_t K, int64_t block, int64_t rows);
// The input transform of such blocks: x * SU_s, Hn^T, / 32, fp16 (shards,
// rows, n). For K x 64 blocks the Sylvester part is rounded to fp16 at x~'s
// scale before H_K, as on the dense path's cuBLAS route.
Tensor one_pass_input(const Tensor& x, const Tensor& su, const Tensor& had,
                      int64_t block);
// Whether the fused path's output side (split-K partials) of `rows` rows in
// blocks of `block` columns takes one_pass_output: K x 64 blocks from
// kHk64OutMinRows rows.
bool output_one_pass(int64_t K, int64_t block, int64_t rows);
// The fused path's output transform of such blocks: the partials (splits,
// rows, m) fp32 added in split order and rounded to fp16 (the dense path's
// numerics, as cuBLAS's fp16 output: above 65504 it overflows, as there),
// Hm on the fp16 tensor cores, * SV * 32, out_dtype (fp16 or bf16; rows,
// m). One row (the GEMM's own input) stays fp32 throughout.
Tensor one_pass_output(const Tensor& partials, const Tensor& sv,
                       const Tensor& had, int64_t block, ScalarType out_dtype);

// Rows from which Hopper's prefill GEMM takes over from the fused GEMM
// (prefill_gemm_splits); the transforms around it follow the same bound.
constexpr int64_t kPrefillGemmMinRows = 49;

// Hopper's prefill GEMM (sm_90a builds, compute capability 9.0): out (rows,
// m) fp16 = x~[shard] (columns col0 onwards) @ W_hat^T for every shard, W_hat
// decoded tile by tile into wgmma's register operand (qtip_prefill.cu).
// prefill_gemm_splits: 0 where it does not run (or, with against_fused, below
// kPrefillGemmMinRows, where the fused GEMM wins), else its number of k splits.
// out is fp16 (rows, m), or fp32 split-K partials (splits, rows, m) for the
// output transform to add in order.
int64_t prefill_gemm_splits(const Tensor& trellis,
                            const std::vector<int64_t>& shard_rows,
                            int64_t rows, bool against_fused);
void qtip_prefill_gemm(const Tensor& xt, int64_t col0, const Tensor& trellis,
                       const Tensor& tlut,
                       const std::vector<int64_t>& shard_rows, Tensor& out);

// One QTIP linear layer with all its shards (see qtip_linear.cpp): the
// prefill GEMM where prefill_gemm_splits > 0; otherwise the fused GEMM below
// dense_min_rows rows, decode-to-dense + cuBLAS from there on.
// The trellis may cover only x~'s columns in_offset .. in_offset + n_trellis
// (a row-parallel rank's slice of a whole-matrix checkpoint, whose input
// transform spans SU's n >= n_trellis columns).
Tensor qtip_linear(const Tensor& x, const Tensor& trellis, const Tensor& tlut,
                   const Tensor& su, const Tensor& sv,
                   const std::optional<Tensor>& had_in,
                   const std::optional<Tensor>& had_out, int64_t in_block,
                   const std::vector<int64_t>& out_blocks,
                   const std::vector<int64_t>& shard_rows,
                   int64_t dense_min_rows, int64_t in_offset);

// Shared host helpers.
void check_device_capability(const Tensor& t, const char* op);
// K of an H_K factor (float32 (K, K), K > 1, on x's device), 1 for none.
int64_t check_had_factor(const std::optional<Tensor>& had_k, const Tensor& x,
                         const char* op);

}  // namespace qtip
}  // namespace vllm
