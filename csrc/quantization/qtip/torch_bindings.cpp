// SPDX-License-Identifier: Apache-2.0
// SPDX-FileCopyrightText: Copyright contributors to the vLLM project
//
// torch.ops._qtip_C: QTIP trellis kernels (legacy ATen ops, like _qutlass_C).

#include <torch/all.h>
#include <torch/library.h>

#include "core/registration.h"
#include "qtip_ops.h"

TORCH_LIBRARY_EXPAND(TORCH_EXTENSION_NAME, m) {
  // The trellis ops take every shard of a fused layer (q/k/v, gate/up) at
  // once: trellises back to back along m (published kernel layout, int16
  // (m/32, n/32, 64K)), shard_rows their row counts, one HYB table per
  // shard (512, 2) fp16, stacked (shards, 512, 2).

  // y (B, m) fp32 = x @ W_hat^T, W_hat decoded on the fly; x (B, n) fp16,
  // or (shards, B, n): one input per shard.
  m.def(
      "qtip_gemm(Tensor x, Tensor trellis, Tensor tlut, int[] shard_rows) "
      "-> Tensor");
  m.impl("qtip_gemm", torch::kCUDA, &vllm::qtip::qtip_gemm);

  // W_hat (m, n) fp16, for the dense (large batch) path.
  m.def("qtip_decode(Tensor trellis, Tensor tlut, int[] shard_rows) -> Tensor");
  m.impl("qtip_decode", torch::kCUDA, &vllm::qtip::qtip_decode);

  // factor * out_scale * H(in_scale * x) along the last dim of x (rows, n),
  // block-diagonal H = (H_K kron Sylvester) / sqrt(b) over column segments
  // with their own block sizes; in_scale (shards, n) makes one copy per
  // shard, (shards, rows, n).
  m.def(
      "qtip_hadamard(Tensor x, Tensor? in_scale, Tensor? out_scale, "
      "Tensor? had_k, bool transpose, int[] block_sizes, int[] segment_sizes, "
      "float factor, ScalarType out_dtype) -> Tensor");
  m.impl("qtip_hadamard", torch::kCUDA, &vllm::qtip::qtip_hadamard);

  // A whole QTIP linear with all its shards, y (rows, m) in x's dtype, x
  // (rows, n) fp16/bf16, SU (shards, n), SV (m,): the input transforms, the
  // fused GEMM (rows < dense_min_rows) or decode + cuBLAS, and the output
  // transforms: three launches for a fused layer.
  m.def(
      "qtip_linear(Tensor x, Tensor trellis, Tensor tlut, Tensor SU, "
      "Tensor SV, Tensor? had_in, Tensor? had_out, int in_block, "
      "int[] out_blocks, int[] shard_rows, int dense_min_rows) -> Tensor");
  m.impl("qtip_linear", torch::kCUDA, &vllm::qtip::qtip_linear);
}

REGISTER_EXTENSION(TORCH_EXTENSION_NAME)
