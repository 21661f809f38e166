// SPDX-License-Identifier: Apache-2.0
// SPDX-FileCopyrightText: Copyright contributors to the vLLM project
//
// Host entry points of vllm._qtip_C (registered in torch_bindings.cpp).
#pragma once

#include <torch/all.h>

#include <optional>

namespace vllm {
namespace qtip {

// The trellis ops take one or several shards of a fused layer (q/k/v,
// gate/up): their trellises back to back along m, shard_rows their row
// counts, tlut (512, 2) or (shards, 512, 2), one per shard.

// Fused trellis decode + tensor-core GEMM: y (B, m) fp32 = x @ W_hat^T,
// W_hat decoded from trellis (m/32, n/32, 64K) int16; x (B, n) fp16, or
// (shards, B, n) with one input per shard.
torch::Tensor qtip_gemm(const torch::Tensor& x, const torch::Tensor& trellis,
                        const torch::Tensor& tlut, c10::IntArrayRef shard_rows);

// The fused GEMM on x~ already in mma B-fragment order (see
// qtip_fragment_layout): fp32 split-K partial sums (splits, rows, m), to be
// added in split order (qtip_hadamard does it as it loads them).
torch::Tensor qtip_mma(const torch::Tensor& xf, int64_t rows,
                       const torch::Tensor& trellis, const torch::Tensor& tlut,
                       c10::IntArrayRef shard_rows);

// x (copies, rows, n) -> (copies, ceil(rows/8)*8, n) in B-fragment order.
torch::Tensor qtip_fragment_layout(const torch::Tensor& x);

// Decode the whole W_hat (m, n) in fp16.
torch::Tensor qtip_decode(const torch::Tensor& trellis,
                          const torch::Tensor& tlut,
                          c10::IntArrayRef shard_rows);

// y = factor * out_scale * H(in_scale * x) along the last dim of x (rows, n),
// computed in fp32; x may also be float32 split-K partial sums (splits,
// rows, n), added in order first. The columns are split into segments of
// segment_sizes, each transformed block-diagonally with blocks of its
// block_sizes entry, H_b = (H_K kron Sylvester) / sqrt(b) (H_K^T when
// transpose); had_k is H_K as float32 (K, K), None for powers of two. in_scale
// (shards, n) gives one output copy per shard: y (shards, rows, n).
torch::Tensor qtip_hadamard(const torch::Tensor& x,
                            const std::optional<torch::Tensor>& in_scale,
                            const std::optional<torch::Tensor>& out_scale,
                            const std::optional<torch::Tensor>& had_k,
                            bool transpose, c10::IntArrayRef block_sizes,
                            c10::IntArrayRef segment_sizes, double factor,
                            at::ScalarType out_dtype);
// The same, optionally writing (copies, ceil(rows/8)*8, n) in the GEMM's
// B-fragment order (the input transform of qtip_linear).
torch::Tensor qtip_hadamard_impl(const torch::Tensor& x,
                                 const std::optional<torch::Tensor>& in_scale,
                                 const std::optional<torch::Tensor>& out_scale,
                                 const std::optional<torch::Tensor>& had_k,
                                 bool transpose, c10::IntArrayRef block_sizes,
                                 c10::IntArrayRef segment_sizes, double factor,
                                 at::ScalarType out_dtype, bool fragment_out);

// One QTIP linear layer with all its shards (see qtip_linear.cpp): fused
// GEMM below dense_min_rows rows, decode-to-dense + cuBLAS from there on.
torch::Tensor qtip_linear(const torch::Tensor& x, const torch::Tensor& trellis,
                          const torch::Tensor& tlut, const torch::Tensor& su,
                          const torch::Tensor& sv,
                          const std::optional<torch::Tensor>& had_in,
                          const std::optional<torch::Tensor>& had_out,
                          int64_t in_block, c10::IntArrayRef out_blocks,
                          c10::IntArrayRef shard_rows, int64_t dense_min_rows);

// Shared host helpers.
void check_device_capability(const torch::Tensor& t, const char* op);

}  // namespace qtip
}  // namespace vllm
