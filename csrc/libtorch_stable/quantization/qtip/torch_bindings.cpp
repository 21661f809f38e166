// SPDX-License-Identifier: Apache-2.0
// SPDX-FileCopyrightText: Copyright contributors to the vLLM project
//
// torch.ops._qtip_C: QTIP trellis kernels, on the stable libtorch ABI.
// In vLLM's own build these sources are part of _C_stable_libtorch; a
// standalone build (the qtip-vllm project's CMakeLists.txt, on a precompiled
// vLLM wheel) makes them the extension vllm._qtip_C.

#include <torch/csrc/stable/library.h>

#include "core/registration.h"
#include "qtip_ops.h"

STABLE_TORCH_LIBRARY(_qtip_C, m) {
  // The trellis ops take every shard of a fused layer (q/k/v, gate/up) at
  // once: trellises back to back along m (published kernel layout, int16
  // (m/32, n/32, 64K)), shard_rows their row counts, one HYB table per
  // shard (512, 2) fp16, stacked (shards, 512, 2).

  // y (B, m) fp32 = x @ W_hat^T, W_hat decoded on the fly; x (B, n) fp16,
  // or (shards, B, n): one input per shard.
  m.def(
      "qtip_gemm(Tensor x, Tensor trellis, Tensor tlut, int[] shard_rows) "
      "-> Tensor");

  // W_hat (m, n) fp16, for the dense (large batch) path.
  m.def("qtip_decode(Tensor trellis, Tensor tlut, int[] shard_rows) -> Tensor");

  // factor * out_scale * H(in_scale * x) along the last dim of x (rows, n),
  // block-diagonal H = (H_K kron Sylvester) / sqrt(b) over column segments
  // with their own block sizes; in_scale (shards, n) makes one copy per
  // shard, (shards, rows, n).
  m.def(
      "qtip_hadamard(Tensor x, Tensor? in_scale, Tensor? out_scale, "
      "Tensor? had_k, bool transpose, int[] block_sizes, int[] segment_sizes, "
      "float factor, ScalarType out_dtype) -> Tensor");

  // A whole QTIP linear with all its shards, y (rows, m) in x's dtype, x
  // (rows, n) fp16/bf16, SU (shards, n), SV (m,): the input transforms, the
  // fused GEMM (rows < dense_min_rows) or decode + cuBLAS, and the output
  // transforms: three launches for a fused layer. With in_offset the
  // trellis covers only x~'s columns from there (a row-parallel rank's slice
  // of a whole-matrix checkpoint).
  m.def(
      "qtip_linear(Tensor x, Tensor trellis, Tensor tlut, Tensor SU, "
      "Tensor SV, Tensor? had_in, Tensor? had_out, int in_block, "
      "int[] out_blocks, int[] shard_rows, int dense_min_rows, "
      "int in_offset=0) -> Tensor");
}

STABLE_TORCH_LIBRARY_IMPL(_qtip_C, CUDA, m) {
  m.impl("qtip_gemm", TORCH_BOX(&vllm::qtip::qtip_gemm));
  m.impl("qtip_decode", TORCH_BOX(&vllm::qtip::qtip_decode));
  m.impl("qtip_hadamard", TORCH_BOX(&vllm::qtip::qtip_hadamard));
  m.impl("qtip_linear", TORCH_BOX(&vllm::qtip::qtip_linear));
}

#ifdef QTIP_STANDALONE_EXTENSION
REGISTER_EXTENSION(_qtip_C)
#endif
