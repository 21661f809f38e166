// SPDX-License-Identifier: Apache-2.0
// SPDX-FileCopyrightText: Copyright contributors to the vLLM project
//
// One QTIP linear layer, y = SV ⊙ Hm · W_hat · Hn^T · (SU ⊙ x) for each of
// its shards (q/k/v, gate/up: one launch per step for all of them), with the
// reference numerics: x * SU and Hn^T in fp32, / 32 and rounded to fp16,
// times W_hat with fp32 accumulation, Hm in fp32, * SV * 32, cast to x's
// dtype.
//
// The batch dispatch lives here, inside one opaque op, so torch.compile
// never guards on the number of rows:
//  * rows < dense_min_rows: the input transform writes x~ in the GEMM's
//    B-fragment order, the fused trellis-decode GEMM (qtip_mma) writes
//    split-K partial sums, and the output transform adds them in order;
//  * otherwise: W_hat decoded to fp16 once (qtip_decode), then cuBLAS. Its
//    fp16 output is the reference's fallback-GEMM numerics.

#include <torch/all.h>

#include <vector>

#include "qtip_ops.h"

namespace vllm {
namespace qtip {

torch::Tensor qtip_linear(const torch::Tensor& x, const torch::Tensor& trellis,
                          const torch::Tensor& tlut, const torch::Tensor& su,
                          const torch::Tensor& sv,
                          const std::optional<torch::Tensor>& had_in,
                          const std::optional<torch::Tensor>& had_out,
                          int64_t in_block, c10::IntArrayRef out_blocks,
                          c10::IntArrayRef shard_rows, int64_t dense_min_rows) {
  TORCH_CHECK(x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16,
              "qtip_linear: x must be float16 or bfloat16, got ",
              x.scalar_type());
  TORCH_CHECK(x.dim() == 2, "qtip_linear: x must be 2-D (rows, n), got ",
              x.sizes());
  const int64_t shards = (int64_t)shard_rows.size();
  TORCH_CHECK(su.dim() == 2 && su.size(0) == shards && sv.dim() == 1,
              "qtip_linear: SU must be (shards, n) with shards = ", shards,
              " (len(shard_rows)) and SV 1-D, got ", su.sizes(), " and ",
              sv.sizes());
  TORCH_CHECK(trellis.dim() == 3 && trellis.size(0) * 32 == sv.size(0) &&
                  trellis.size(1) * 32 == su.size(1),
              "qtip_linear: trellis ", trellis.sizes(),
              " must be (m/32, n/32, 64K) with m = len(SV) = ", sv.size(0),
              " and n = SU.size(1) = ", su.size(1));
  // x * SU_s, Hn^T, / 32, fp16: one copy per shard, (shards, rows, n).
  const int64_t n = su.size(1);
  const bool fused = x.size(0) < dense_min_rows;
  torch::Tensor xh =
      qtip_hadamard_impl(x, su, std::nullopt, had_in, true, {in_block}, {n},
                         1.0 / 32.0, at::kHalf, /*fragment_out=*/fused);
  torch::Tensor acc;
  if (fused) {
    acc = qtip_mma(xh, x.size(0), trellis, tlut, shard_rows);
  } else {
    const torch::Tensor w = qtip_decode(trellis, tlut, shard_rows);
    std::vector<torch::Tensor> parts;
    int64_t row = 0;
    for (int64_t s = 0; s < shards; ++s) {
      parts.push_back(at::matmul(xh[s], w.narrow(0, row, shard_rows[s]).t()));
      row += shard_rows[s];
    }
    acc = shards == 1 ? parts[0] : at::cat(parts, 1);
  }
  // (Split sums,) Hm per shard, * SV * 32, x's dtype.
  return qtip_hadamard(acc, std::nullopt, sv, had_out, false, out_blocks,
                       shard_rows, 32.0, x.scalar_type());
}

}  // namespace qtip
}  // namespace vllm
