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
//  * on Hopper, from 49 rows, wherever prefill_gemm_splits finds that it
//    can run, the prefill GEMM, which decodes W_hat tile by tile into the
//    tensor cores' register operand (split over k into fp32 partials where
//    whole tiles would leave SMs idle, added as on the fused path below);
//  * otherwise, rows < dense_min_rows: the input transform writes x~
//    row-major, one copy per shard (for one row, with power-of-two blocks or
//    one H_K block of the whole row, the GEMM kernel does it itself, in
//    shared memory; K x 64 blocks from two rows on in one pass, as on the
//    dense path below),
//    the fused trellis-decode GEMM (qtip_mma) writes split-K partial sums,
//    and the output transform adds them in order (K x 64 blocks from two
//    rows in one pass, rounded to fp16 first, as on the dense path);
//  * otherwise W_hat decoded to fp16 once (qtip_decode), then cuBLAS. This
//    and the unsplit prefill GEMM round fp32 sums to fp16, the
//    reference's fallback-GEMM numerics (the split form's partials are
//    summed in fp32 by the output transform, within 1e-4 of that). Blocks of
//    K x 512 columns with K <= 32 (Llama-3's 14336) and K x 64 with
//    32 < K <= 176 (Llama-2's 11008) are transformed in one pass with H_K on
//    the tensor cores (hadamard_one_pass). Any other H_K factor is applied
//    by cuBLAS, as one batched (K, K) x (K, P) product over the Hadamard
//    blocks, and the transform kernel does only the Sylvester part and the
//    scales: its own H_K step costs K FMAs per value on the CUDA cores,
//    which at prefill sizes is most of the layer. On the input side both the
//    K x 64 kernel (on the fused path too) and cuBLAS round x~ to fp16 once
//    more (after the Sylvester part), at x~'s scale.

#include <torch/csrc/inductor/aoti_torch/generated/c_shim_cuda.h>

#include <cmath>
#include <vector>

#include "qtip_ops.h"

namespace vllm {
namespace qtip {

namespace {

Tensor expand(const Tensor& self, std::vector<int64_t> sizes) {
  return call_aten("aten::expand", "", self,
                   torch::headeronly::IntHeaderOnlyArrayRef(sizes),
                   /*implicit=*/false);
}

// fp16 operands, fp32 accumulation and fp32 result.
Tensor bmm_fp32_out(const Tensor& a, const Tensor& b) {
  return call_aten("aten::bmm", "dtype", a, b, ScalarType::Float);
}

// out = alpha * a @ b, batched, fp16 with fp32 accumulation and alpha applied
// before the one rounding to fp16. Through the AOTI C shim: the stable
// dispatcher cannot pass baddbmm's Scalar alpha.
void bmm_scaled_out(Tensor& out, const Tensor& a, const Tensor& b,
                    double alpha) {
  TORCH_ERROR_CODE_CHECK(aoti_torch_cuda_baddbmm_out(
      out.get(), out.get(), a.get(), b.get(), /*beta=*/0.0, alpha));
}

// out = a @ b, fp16, into out as it is: cuBLAS writes a row-major column
// window of a wider matrix with the full row as its leading dimension, so a
// fused layer's shards need no copy into their columns.
void mm_out(Tensor& out, const Tensor& a, const Tensor& b) {
  TORCH_ERROR_CODE_CHECK(aoti_torch_cuda_mm_out(out.get(), a.get(), b.get()));
}

// H_K (H_K^T if transpose) in fp16, exact since its entries are +-1, as the
// left factor of `blocks` (K, P) matrices (a stride-0 view, no copies).
Tensor had_factor(const Tensor& had, bool transpose, int64_t blocks) {
  const int64_t K = had.size(0);
  Tensor h = torch::stable::to(had, ScalarType::Half);
  if (transpose)
    h = torch::stable::contiguous(torch::stable::transpose(h, 0, 1));
  return expand(h, {blocks, K, K});
}

// K * P columns per Hadamard block with P a power of two >= 8 (the
// transform kernel checks P).
int64_t sylvester_size(int64_t block, int64_t K, const char* side) {
  STD_TORCH_CHECK(block > 0 && block % K == 0, "qtip_linear: ", side,
                  " Hadamard block size ", block,
                  " is not a multiple of its H_K size K=", K);
  return block / K;
}

// Fused path, x (rows, n) -> x~ (shards, rows, n) fp16: x * SU_s, Hn^T,
// / 32, one row-major copy per shard, which the GEMM reads as it is.
Tensor fused_input_transform(const Tensor& x, const Tensor& su,
                             const std::optional<Tensor>& had_in,
                             int64_t in_block) {
  if (had_in.has_value() &&
      input_one_pass(had_in->size(0), in_block, su.size(0) * x.size(0)))
    return one_pass_input(x, su, *had_in, in_block);
  return qtip_hadamard(x, su, std::nullopt, had_in, true, {in_block},
                       {su.size(1)}, 1.0 / 32.0, ScalarType::Half);
}

// Fused path, split-K partials (splits, rows, m) -> y: the splits added in
// order, Hm per shard, * SV * 32, out_dtype.
Tensor fused_output_transform(const Tensor& acc, const Tensor& sv,
                              const std::optional<Tensor>& had_out,
                              const std::vector<int64_t>& out_blocks,
                              const std::vector<int64_t>& shard_rows,
                              ScalarType out_dtype) {
  bool one_pass = had_out.has_value() &&
                  output_one_pass(had_out->size(0), out_blocks[0], acc.size(1));
  for (size_t s = 0; s < out_blocks.size(); ++s)
    one_pass &=
        out_blocks[s] == out_blocks[0] && shard_rows[s] % out_blocks[0] == 0;
  if (one_pass)
    return one_pass_output(acc, sv, *had_out, out_blocks[0], out_dtype);
  return qtip_hadamard(acc, std::nullopt, sv, had_out, false, out_blocks,
                       shard_rows, 32.0, out_dtype);
}

// Dense path, x (rows, n) -> x~ (shards, rows, n) fp16: x * SU_s, Hn^T, / 32.
Tensor dense_input_transform(const Tensor& x, const Tensor& su,
                             const std::optional<Tensor>& had_in,
                             int64_t in_block) {
  const int64_t n = su.size(1);
  if (!had_in.has_value())
    return qtip_hadamard(x, su, std::nullopt, std::nullopt, true, {in_block},
                         {n}, 1.0 / 32.0, ScalarType::Half);
  if (input_one_pass(had_in->size(0), in_block, su.size(0) * x.size(0)))
    return one_pass_input(x, su, *had_in, in_block);
  // Sylvester part with SU, / 32 and its 1/sqrt(P) in the kernel, rounded
  // to fp16 for the tensor cores at x~'s own magnitude (so no subnormals
  // beyond the reference's); then H_K^T / sqrt(K) per block, accumulated in
  // fp32 and rounded once more.
  const int64_t K = had_in->size(0);
  const int64_t P = sylvester_size(in_block, K, "input");
  Tensor t = qtip_hadamard(x, su, std::nullopt, std::nullopt, true, {P}, {n},
                           1.0 / 32.0, ScalarType::Half);
  const int64_t blocks = t.numel() / in_block;
  Tensor xh = new_tensor({su.size(0), x.size(0), n}, ScalarType::Half, x);
  Tensor xh_blocks = torch::stable::view(xh, {blocks, K, P});
  bmm_scaled_out(xh_blocks, had_factor(*had_in, true, blocks),
                 torch::stable::view(t, {blocks, K, P}),
                 1.0 / std::sqrt((double)K));
  return xh;
}

// Dense path, acc (rows, m) fp16 -> y: Hm per shard, * SV * 32, out_dtype.
Tensor dense_output_transform(const Tensor& acc, const Tensor& sv,
                              const std::optional<Tensor>& had_out,
                              const std::vector<int64_t>& out_blocks,
                              const std::vector<int64_t>& shard_rows,
                              ScalarType out_dtype) {
  bool one_block_size = true;
  for (int64_t b : out_blocks) one_block_size &= b == out_blocks[0];
  if (!had_out.has_value() || !one_block_size ||
      hadamard_one_pass(had_out->size(0), out_blocks[0], acc.size(0)))
    return qtip_hadamard(acc, std::nullopt, sv, had_out, false, out_blocks,
                         shard_rows, 32.0, out_dtype);
  // H_K per block on the fp16 products (exact inputs, fp32 sums), then the
  // Sylvester part, SV and the whole scale (1/sqrt(P) in the kernel).
  const int64_t K = had_out->size(0);
  const int64_t P = sylvester_size(out_blocks[0], K, "output");
  const int64_t blocks = acc.numel() / out_blocks[0];
  Tensor u = bmm_fp32_out(had_factor(*had_out, false, blocks),
                          torch::stable::view(acc, {blocks, K, P}));
  return qtip_hadamard(torch::stable::view(u, {acc.size(0), acc.size(1)}),
                       std::nullopt, sv, std::nullopt, false,
                       std::vector<int64_t>(out_blocks.size(), P), shard_rows,
                       32.0 / std::sqrt((double)K), out_dtype);
}

}  // namespace

Tensor qtip_linear(const Tensor& x, const Tensor& trellis, const Tensor& tlut,
                   const Tensor& su, const Tensor& sv,
                   const std::optional<Tensor>& had_in,
                   const std::optional<Tensor>& had_out, int64_t in_block,
                   const std::vector<int64_t>& out_blocks,
                   const std::vector<int64_t>& shard_rows,
                   int64_t dense_min_rows, int64_t in_offset) {
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
                      in_offset >= 0 && in_offset % 32 == 0 &&
                      in_offset + trellis.size(1) * 32 <= su.size(1),
                  "qtip_linear: trellis ", shape(trellis),
                  " must be (m/32, n/32, 64K) with m = len(SV) = ", sv.size(0),
                  " and its n columns of x~ from in_offset = ", in_offset,
                  " (a multiple of 32) within SU.size(1) = ", su.size(1));
  STD_TORCH_CHECK(out_blocks.size() == shard_rows.size(),
                  "qtip_linear: out_blocks ", join(out_blocks),
                  " must have one entry per shard of shard_rows ",
                  join(shard_rows));
  check_had_factor(had_in, x, "qtip_linear (had_in)");
  check_had_factor(had_out, x, "qtip_linear (had_out)");
  const bool fused_rows = x.size(0) < dense_min_rows;
  const int64_t splits =
      prefill_gemm_splits(trellis, shard_rows, x.size(0), fused_rows);
  if (fused_rows && splits == 0) {
    // The GEMM's own input transform has no column window: a call with
    // in_offset != 0 takes the separate transform (and qtip_mma_own_input
    // itself turns down a trellis narrower than SU, a window at offset 0).
    std::optional<Tensor> own;
    if (in_offset == 0)
      own = qtip_mma_own_input(x, su, had_in, in_block, trellis, tlut,
                               shard_rows);
    // Otherwise x~ of all n columns by its own kernel; the GEMM reads the
    // trellis's window of it.
    Tensor acc = own.has_value()
                     ? *own
                     : qtip_mma(fused_input_transform(x, su, had_in, in_block),
                                trellis, tlut, shard_rows, in_offset);
    return fused_output_transform(acc, sv, had_out, out_blocks, shard_rows,
                                  x.scalar_type());
  }
  Tensor xh = dense_input_transform(x, su, had_in, in_block);
  if (splits > 1) {
    // k split over the SMs: fp32 partials, added in order by the fused
    // path's output transform.
    Tensor partials =
        new_tensor({splits, x.size(0), sv.size(0)}, ScalarType::Float, x);
    qtip_prefill_gemm(xh, in_offset, trellis, tlut, shard_rows, partials);
    return fused_output_transform(partials, sv, had_out, out_blocks, shard_rows,
                                  x.scalar_type());
  }
  Tensor acc = new_tensor({x.size(0), sv.size(0)}, ScalarType::Half, x);
  if (splits == 1) {
    qtip_prefill_gemm(xh, in_offset, trellis, tlut, shard_rows, acc);
  } else {  // W_hat is freed before the output transform allocates.
    Tensor w = qtip_decode(trellis, tlut, shard_rows);
    int64_t row = 0;
    for (int64_t s = 0; s < shards; ++s) {
      const Tensor w_s = torch::stable::narrow(w, 0, row, shard_rows[s]);
      Tensor out_s = torch::stable::narrow(acc, 1, row, shard_rows[s]);
      Tensor xh_s = torch::stable::select(xh, 0, s);
      mm_out(out_s,
             torch::stable::narrow(xh_s, 1, in_offset, trellis.size(1) * 32),
             torch::stable::transpose(w_s, 0, 1));
      row += shard_rows[s];
    }
  }
  return dense_output_transform(acc, sv, had_out, out_blocks, shard_rows,
                                x.scalar_type());
}

}  // namespace qtip
}  // namespace vllm
