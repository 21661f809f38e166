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

#include <vector>

#include "qtip_ops.h"

namespace vllm {
namespace qtip {

Tensor qtip_linear(const Tensor& x, const Tensor& trellis, const Tensor& tlut,
                   const Tensor& su, const Tensor& sv,
                   const std::optional<Tensor>& had_in,
                   const std::optional<Tensor>& had_out, int64_t in_block,
                   const std::vector<int64_t>& out_blocks,
                   const std::vector<int64_t>& shard_rows,
                   int64_t dense_min_rows) {
  STD_TORCH_CHECK(x.scalar_type() == ScalarType::Half ||
                      x.scalar_type() == ScalarType::BFloat16,
                  "qtip_linear: x must be float16 or bfloat16, got ",
                  x.scalar_type());
  STD_TORCH_CHECK(x.dim() == 2, "qtip_linear: x must be 2-D (rows, n), got ",
                  shape(x));
  const int64_t shards = (int64_t)shard_rows.size();
  STD_TORCH_CHECK(su.dim() == 2 && su.size(0) == shards && sv.dim() == 1,
                  "qtip_linear: SU must be (shards, n) with shards = ", shards,
                  " (len(shard_rows)) and SV 1-D, got ", shape(su), " and ",
                  shape(sv));
  STD_TORCH_CHECK(trellis.dim() == 3 && trellis.size(0) * 32 == sv.size(0) &&
                      trellis.size(1) * 32 == su.size(1),
                  "qtip_linear: trellis ", shape(trellis),
                  " must be (m/32, n/32, 64K) with m = len(SV) = ", sv.size(0),
                  " and n = SU.size(1) = ", su.size(1));
  // x * SU_s, Hn^T, / 32, fp16: one copy per shard, (shards, rows, n).
  const int64_t n = su.size(1);
  const bool fused = x.size(0) < dense_min_rows;
  Tensor xh =
      qtip_hadamard_impl(x, su, std::nullopt, had_in, true, {in_block}, {n},
                         1.0 / 32.0, ScalarType::Half, /*fragment_out=*/fused);
  Tensor acc;
  if (fused) {
    acc = qtip_mma(xh, x.size(0), trellis, tlut, shard_rows);
  } else {
    Tensor w = qtip_decode(trellis, tlut, shard_rows);
    acc = new_tensor({x.size(0), sv.size(0)}, ScalarType::Half, x);
    int64_t row = 0;
    for (int64_t s = 0; s < shards; ++s) {
      const Tensor w_s = torch::stable::narrow(w, 0, row, shard_rows[s]);
      Tensor out_s = torch::stable::narrow(acc, 1, row, shard_rows[s]);
      torch::stable::copy_(
          out_s, torch::stable::matmul(torch::stable::select(xh, 0, s),
                                       torch::stable::transpose(w_s, 0, 1)));
      row += shard_rows[s];
    }
  }
  // (Split sums,) Hm per shard, * SV * 32, x's dtype.
  return qtip_hadamard(acc, std::nullopt, sv, had_out, false, out_blocks,
                       shard_rows, 32.0, x.scalar_type());
}

}  // namespace qtip
}  // namespace vllm
