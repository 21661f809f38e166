// SPDX-License-Identifier: Apache-2.0
// SPDX-FileCopyrightText: Copyright contributors to the vLLM project
//
// Host entry points of vllm._qtip_C (registered in torch_bindings.cpp).
#pragma once

#include <torch/all.h>

#include <optional>

namespace vllm {
namespace qtip {

// Fused trellis decode + tensor-core GEMM: y (B, m) fp32 = x (B, n) fp16 @
// W_hat^T, W_hat decoded from trellis (m/32, n/32, 64K) int16 and tlut
// (512, 2) fp16.
torch::Tensor qtip_gemm(const torch::Tensor& x, const torch::Tensor& trellis,
                        const torch::Tensor& tlut);

// Decode the whole W_hat (m, n) in fp16.
torch::Tensor qtip_decode(const torch::Tensor& trellis,
                          const torch::Tensor& tlut);

// y = factor * out_scale * H_b(in_scale * x) along the last dim of x
// (rows, n), computed in fp32, H_b block-diagonal with blocks of size
// block_size, H_b = (H_K kron Sylvester) / sqrt(block_size) (H_K^T when
// transpose). had_k is H_K as float32 (K, K), None for powers of two.
torch::Tensor qtip_hadamard(const torch::Tensor& x,
                            const std::optional<torch::Tensor>& in_scale,
                            const std::optional<torch::Tensor>& out_scale,
                            const std::optional<torch::Tensor>& had_k,
                            bool transpose, int64_t block_size, double factor,
                            at::ScalarType out_dtype);

// One QTIP linear layer (see qtip_linear.cpp): fused GEMM below
// dense_min_rows rows, decode-to-dense + cuBLAS from there on.
torch::Tensor qtip_linear(const torch::Tensor& x, const torch::Tensor& trellis,
                          const torch::Tensor& tlut, const torch::Tensor& su,
                          const torch::Tensor& sv,
                          const std::optional<torch::Tensor>& had_in,
                          const std::optional<torch::Tensor>& had_out,
                          int64_t in_block, int64_t out_block,
                          int64_t dense_min_rows);

// Shared host helpers.
void check_device_capability(const torch::Tensor& t, const char* op);

}  // namespace qtip
}  // namespace vllm
