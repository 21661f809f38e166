# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""QTIP layers of whole-matrix (rcp = 0) checkpoints under tensor parallelism.

A checkpoint quantized without ``split_for_tp`` has Hadamard transforms over
whole matrices: Hm mixes all m outputs of a column-parallel layer and Hn all n
inputs of a row-parallel one. Every rank still holds only its slice of the
trellis, in whole 32 x 32 blocks (its rows of a column-parallel layer, its
columns of a row-parallel one), and one all-gather brings the full vector in
front of the transform that spans it:

* column-parallel (q/k/v, gate/up), :data:`GATHER_OUTPUT`: the input
  transform (every rank has the full input), this rank's rows of the W_hat
  product, **all-gather** of the products, the full output transform, then
  this rank's rows times SV. KV heads replicated over ranks (GQA with fewer
  KV heads than ranks) are gathered once per replica group.
* row-parallel (o, down), :data:`GATHER_INPUT`: **all-gather** of the input
  shards, the full input transform, this rank's columns of the W_hat
  product, the output transform times SV; RowParallelLinear then all-reduces
  the partial outputs as for any layer (Hm and SV are linear).

The products are gathered in fp32, so a column-parallel layer rounds nothing
that it does not round at TP=1. Every step has static shapes and no host
sync, and vLLM's collectives are custom ops, so the forward is CUDA-graph and
torch.compile safe. The three steps, :func:`input_transform`,
:func:`hat_product` and :func:`output_transform`, run the CUDA kernels or the
reference codec with the reference numerics (fp16 GEMM input, fp32 products).
"""

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from vllm import _qtip_ops as qtip_ops
from vllm.distributed import tensor_model_parallel_all_gather
from vllm.model_executor.layers.quantization.utils.qtip_utils import (
    FORWARD_SCALE,
    decode_weight,
    hadamard_transform,
)
from vllm.utils.torch_utils import direct_register_custom_op

if TYPE_CHECKING:
    from vllm.model_executor.layers.quantization.qtip import (
        QTIPShard,
        QTIPTransform,
    )

# layer.qtip_gather: which side of a rcp=0 layer is all-gathered at TP > 1.
GATHER_INPUT = "input"
GATHER_OUTPUT = "output"


def _qtip_hat_product(
    xh: torch.Tensor, trellis: torch.Tensor, tlut: torch.Tensor, m: int, K: int
) -> torch.Tensor:
    # The W_hat product of qtip_matmul on its own, with its batch dispatch
    # inside one op so that torch.compile sees no branch on the number of
    # rows. A GEMM-only kernel op would replace it.
    if xh.shape[0] < qtip_ops.QTIP_DENSE_MIN_ROWS:
        return qtip_ops.qtip_gemm(xh, trellis, tlut, m, K)
    w_hat = qtip_ops.qtip_decode(trellis, tlut, m, xh.shape[1], K)
    return torch.mm(xh, w_hat.t()).float()


def _qtip_hat_product_fake(
    xh: torch.Tensor, trellis: torch.Tensor, tlut: torch.Tensor, m: int, K: int
) -> torch.Tensor:
    return xh.new_empty((xh.shape[0], m), dtype=torch.float32)


direct_register_custom_op(
    "qtip_hat_product", _qtip_hat_product, fake_impl=_qtip_hat_product_fake
)


def input_transform(
    layer: torch.nn.Module,
    x: torch.Tensor,
    shard: "QTIPShard",
    transform: "QTIPTransform",
) -> torch.Tensor:
    """Hn^T (SU * x) / 32 of a quantized shard in fp16: its GEMM input.

    x (rows, n) holds every input feature the transform spans.
    """
    su = layer.SU[shard.index]
    had = getattr(layer, f"qtip_had_in_{shard.index}")
    if layer.qtip_use_kernels:
        return qtip_ops.qtip_hadamard(
            x,
            had,
            transpose=True,
            block_size=transform.in_block,
            in_scale=su,
            factor=1.0 / FORWARD_SCALE,
            out_dtype=torch.float16,
        )
    xf = hadamard_transform(
        x.float() * su, transpose=True, block_size=transform.in_block, had_k=had
    )
    return (xf / FORWARD_SCALE).half()


def hat_product(
    layer: torch.nn.Module, xh: torch.Tensor, shard: "QTIPShard"
) -> torch.Tensor:
    """xh (rows, n) fp16 times this rank's W_hat^T of a shard: fp32 (rows, m)."""
    assert shard.params is not None
    n = xh.shape[-1]
    trellis = layer.trellis.narrow(0, shard.word_offset, shard.num_words(n))
    tlut = layer.tlut[shard.index] if shard.params.uses_tlut else None
    if layer.qtip_use_kernels:
        return torch.ops.vllm.qtip_hat_product(
            xh, trellis, tlut, shard.out_size, shard.params.K
        )
    w_hat = decode_weight(trellis, tlut, shard.out_size, n, shard.params)
    return xh.float() @ w_hat.T


def output_transform(
    layer: torch.nn.Module,
    acc: torch.Tensor,
    shard: "QTIPShard",
    transform: "QTIPTransform",
) -> torch.Tensor:
    """Hm acc of a quantized shard in fp32 (no scales)."""
    had = getattr(layer, f"qtip_had_out_{shard.index}")
    if layer.qtip_use_kernels:
        return qtip_ops.qtip_hadamard(
            acc, had, block_size=transform.out_block, out_dtype=torch.float32
        )
    return hadamard_transform(acc, block_size=transform.out_block, had_k=had)


def _scale_output(
    y: torch.Tensor, sv: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    return (y * (sv * FORWARD_SCALE)).to(dtype)


def qtip_gathered_apply(
    layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """Forward of a rcp=0 QTIP layer at TP > 1 (layer.qtip_gather is set)."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if layer.qtip_gather == GATHER_INPUT:
        y = _row_parallel_forward(layer, x2)
    else:
        y = _column_parallel_forward(layer, x2)
    if bias is not None:
        y = y + bias
    return y.reshape(*lead, y.shape[-1])


def _row_parallel_forward(layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """This rank's partial output; RowParallelLinear all-reduces it."""
    (shard,) = layer.qtip_shards
    (transform,) = layer.qtip_transforms
    n = layer.qtip_in_size
    x_full = tensor_model_parallel_all_gather(x.contiguous(), dim=-1)
    xh = input_transform(layer, x_full, shard, transform)
    xh = xh.narrow(-1, layer.qtip_in_rank * n, n).contiguous()
    acc = hat_product(layer, xh, shard)
    y = output_transform(layer, acc, shard, transform)
    return _scale_output(y, layer.SV, x.dtype)


def _column_parallel_forward(layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """This rank's output columns of every shard, side by side."""
    quantized = [sh for sh in layer.qtip_shards if sh.params is not None]
    accs = [
        hat_product(layer, input_transform(layer, x, sh, t), sh)
        for sh, t in zip(quantized, layer.qtip_transforms)
    ]
    acc = accs[0] if len(accs) == 1 else torch.cat(accs, dim=-1)
    # (ranks, rows, this rank's outputs of the quantized shards).
    tp_size = layer.tp_size
    gathered = tensor_model_parallel_all_gather(acc, dim=0).view(tp_size, *acc.shape)
    outputs = []
    col = 0
    for shard in layer.qtip_shards:
        rows = slice(shard.row_offset, shard.row_offset + shard.out_size)
        if shard.params is None:
            outputs.append(F.linear(x, layer.weight[rows]))
            continue
        # Ranks holding the same rows (replicated KV heads) come in groups
        # of `replicas` consecutive ranks; take one of each group.
        replicas = tp_size * shard.out_size // shard.out_full
        full = gathered[::replicas, :, col : col + shard.out_size]
        full = full.transpose(0, 1).reshape(x.shape[0], shard.out_full)
        col += shard.out_size
        y = output_transform(layer, full, shard, layer.qtip_transforms[shard.index])
        y = y.narrow(-1, shard.out_rank * shard.out_size, shard.out_size)
        outputs.append(_scale_output(y, layer.SV[rows], x.dtype))
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=-1)
