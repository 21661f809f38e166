// SPDX-License-Identifier: Apache-2.0
// SPDX-FileCopyrightText: Copyright contributors to the vLLM project
//
// torch.ops._qtip_C: QTIP trellis kernels (legacy ATen ops, like _qutlass_C).

#include <torch/all.h>
#include <torch/library.h>

#include "core/registration.h"
#include "qtip_ops.h"

TORCH_LIBRARY_EXPAND(TORCH_EXTENSION_NAME, m) {
  // y (B, m) fp32 = x (B, n) fp16 @ W_hat^T, W_hat decoded on the fly from
  // the trellis (m/32, n/32, 64K) int16 (published kernel layout) and the
  // HYB table tlut (512, 2) fp16.
  m.def("qtip_gemm(Tensor x, Tensor trellis, Tensor tlut) -> Tensor");
  m.impl("qtip_gemm", torch::kCUDA, &vllm::qtip::qtip_gemm);

  // W_hat (m, n) fp16, for the dense (large batch) path.
  m.def("qtip_decode(Tensor trellis, Tensor tlut) -> Tensor");
  m.impl("qtip_decode", torch::kCUDA, &vllm::qtip::qtip_decode);

  // factor * out_scale * H(in_scale * x) along the last dim of x (rows, n),
  // H = (H_K kron Sylvester) / sqrt(block_size), block-diagonal.
  m.def(
      "qtip_hadamard(Tensor x, Tensor? in_scale, Tensor? out_scale, "
      "Tensor? had_k, bool transpose, int block_size, float factor, "
      "ScalarType out_dtype) -> Tensor");
  m.impl("qtip_hadamard", torch::kCUDA, &vllm::qtip::qtip_hadamard);

  // A whole QTIP linear, y (rows, m) in x's dtype, x (rows, n) fp16/bf16:
  // the input transform, the fused GEMM (rows < dense_min_rows) or decode +
  // cuBLAS, and the output transform.
  m.def(
      "qtip_linear(Tensor x, Tensor trellis, Tensor tlut, Tensor SU, "
      "Tensor SV, Tensor? had_in, Tensor? had_out, int in_block, "
      "int out_block, int dense_min_rows) -> Tensor");
  m.impl("qtip_linear", torch::kCUDA, &vllm::qtip::qtip_linear);
}

REGISTER_EXTENSION(TORCH_EXTENSION_NAME)
