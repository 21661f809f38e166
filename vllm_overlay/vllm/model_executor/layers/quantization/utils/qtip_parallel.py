# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""QTIP layers of whole-matrix (rcp = 0) checkpoints under tensor parallelism.

A checkpoint quantized without ``split_for_tp`` has Hadamard transforms over
whole matrices: Hm mixes all m outputs of a column-parallel layer and Hn all n
inputs of a row-parallel one. Every rank still holds only its slice of the
trellis, in whole 32 x 32 blocks (its rows of a column-parallel layer, its
columns of a row-parallel one), and one gather brings the full vector in
front of the transform that spans it. Each gather is an all-reduce of rows
that every rank fills with its own part and zeros elsewhere (exact, since
x + 0 = x), so on NVLink it takes vLLM's custom all-reduce rather than NCCL:

* column-parallel (q/k/v, gate/up), :data:`GATHER_OUTPUT`: the input
  transform (every rank has the full input), this rank's rows of the W_hat
  product, **gather** of the products, the full output transform, then
  this rank's rows times SV. KV heads replicated over ranks (GQA with fewer
  KV heads than ranks) are gathered once per replica group.
* row-parallel (o, down), :data:`GATHER_INPUT`: **gather** of the input
  shards, the full input transform, this rank's columns of the W_hat
  product (one kernel call with the GEMM's column window), the output
  transform times SV; RowParallelLinear then all-reduces the partial
  outputs as for any layer (Hm and SV are linear).

The products are gathered in fp32, so a column-parallel layer rounds nothing
that it does not round at TP=1. Every step has static shapes and no host
sync, and vLLM's collectives are custom ops, so the forward is CUDA-graph and
torch.compile safe. The three steps, :func:`input_transform`,
:func:`hat_product` and :func:`output_transform`, run the CUDA kernels or the
reference codec with the reference numerics (fp16 GEMM input, fp32 products).
Each takes all quantized shards of a fused layer in one kernel call where
they can share it: at batch 1 a layer's time is mostly launches and
collectives, not bytes.
"""

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from vllm import _qtip_ops as qtip_ops
from vllm.distributed import (
    get_tensor_model_parallel_rank,
    tensor_model_parallel_all_reduce,
)
from vllm.model_executor.layers.quantization.utils.qtip_utils import (
    FORWARD_SCALE,
    decode_weight,
    hadamard_transform,
)
from vllm.utils.torch_utils import direct_register_custom_op

if TYPE_CHECKING:
    from vllm.model_executor.layers.quantization.qtip import QTIPShard

# layer.qtip_gather: which side of a rcp=0 layer is all-gathered at TP > 1.
GATHER_INPUT = "input"
GATHER_OUTPUT = "output"


def _qtip_hat_product(
    xh: torch.Tensor,
    trellis: torch.Tensor,
    tlut: torch.Tensor,
    shard_rows: list[int],
    K: int,
) -> torch.Tensor:
    # The W_hat products of qtip_matmul on their own: xh (shards, rows, n)
    # fp16, one input per shard, times each shard's W_hat^T, side by side in
    # fp32. The batch dispatch sits inside one op so that torch.compile sees
    # no branch on the number of rows.
    rows, n = xh.shape[-2:]
    if rows < qtip_ops.QTIP_DENSE_MIN_ROWS:
        return qtip_ops.qtip_gemm(xh, trellis, tlut, shard_rows, K)
    w_hat = qtip_ops.qtip_decode(trellis, tlut, shard_rows, n, K)
    products = [torch.mm(x_s, w_s.t()) for x_s, w_s in zip(xh, w_hat.split(shard_rows))]
    return torch.cat(products, dim=-1).float()


def _qtip_hat_product_fake(
    xh: torch.Tensor,
    trellis: torch.Tensor,
    tlut: torch.Tensor,
    shard_rows: list[int],
    K: int,
) -> torch.Tensor:
    return xh.new_empty((xh.shape[-2], sum(shard_rows)), dtype=torch.float32)


direct_register_custom_op(
    "qtip_hat_product", _qtip_hat_product, fake_impl=_qtip_hat_product_fake
)


def _runs(
    shards: list["QTIPShard"], key: Callable[["QTIPShard"], int]
) -> list[list["QTIPShard"]]:
    """Consecutive shards with the same key(shard): one kernel call each."""
    runs: list[list[QTIPShard]] = []
    for shard in shards:
        if runs and key(runs[-1][-1]) == key(shard):
            runs[-1].append(shard)
        else:
            runs.append([shard])
    return runs


def _bits(shard: "QTIPShard") -> int:
    assert shard.params is not None
    return shard.params.K


def input_transform(
    layer: torch.nn.Module, x: torch.Tensor, shards: list["QTIPShard"]
) -> torch.Tensor:
    """Hn^T (SU_s * x) / 32 in fp16 of each quantized shard s: (shards, rows, n).

    x (rows, n) holds every input feature the transforms span. The shards
    are consecutive quantized ones of the layer; they share the input, so
    one kernel call serves them all.
    """
    first = shards[0].index
    assert [sh.index for sh in shards] == list(range(first, first + len(shards)))
    su = layer.SU[first : first + len(shards)]
    transform = layer.qtip_transforms[first]
    had = getattr(layer, f"qtip_had_in_{first}")
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
    xf = torch.stack(
        [
            hadamard_transform(
                x.float() * su_s,
                transpose=True,
                block_size=transform.in_block,
                had_k=had,
            )
            for su_s in su
        ]
    )
    return (xf / FORWARD_SCALE).half()


def hat_product(
    layer: torch.nn.Module, xh: torch.Tensor, shards: list["QTIPShard"]
) -> torch.Tensor:
    """xh (shards, rows, n) fp16 times this rank's W_hat^T of each shard.

    fp32 (rows, sum of the shards' rows), the products side by side. The
    shards are consecutive quantized ones of the same K, whose trellises
    lie back to back: one kernel call.
    """
    n = xh.shape[-1]
    params = shards[0].params
    assert params is not None
    words = [sh.num_words(n) for sh in shards]
    trellis = layer.trellis.narrow(0, shards[0].word_offset, sum(words))
    rows = [sh.out_size for sh in shards]
    if layer.qtip_use_kernels:
        first = shards[0].index
        tlut = layer.tlut[first : first + len(shards)]
        return torch.ops.vllm.qtip_hat_product(xh, trellis, tlut, rows, params.K)
    products = []
    for x_s, shard, trellis_s in zip(xh, shards, trellis.split(words)):
        tlut = layer.tlut[shard.index] if params.uses_tlut else None
        w_hat = decode_weight(trellis_s, tlut, shard.out_size, n, params)
        products.append(x_s.float() @ w_hat.T)
    return _cat(products)


def output_transform(
    layer: torch.nn.Module, acc: torch.Tensor, shards: list["QTIPShard"]
) -> torch.Tensor:
    """Hm of each shard's full output in fp32 (no scales).

    acc (rows, sum of the shards' out_full) holds the outputs side by side.
    Consecutive shards whose transforms share one H_K factor run in one
    kernel call.
    """
    if not layer.qtip_use_kernels:
        outputs = []
        for shard, acc_s in zip(
            shards, acc.split([sh.out_full for sh in shards], dim=-1)
        ):
            transform = layer.qtip_transforms[shard.index]
            had = getattr(layer, f"qtip_had_out_{shard.index}")
            outputs.append(
                hadamard_transform(acc_s, block_size=transform.out_block, had_k=had)
            )
        return _cat(outputs)
    runs = _runs(shards, lambda sh: layer.qtip_transforms[sh.index].out_factor)
    widths = [sum(sh.out_full for sh in run) for run in runs]
    outputs = []
    for run, acc_run in zip(runs, acc.split(widths, dim=-1)):
        outputs.append(
            qtip_ops.qtip_hadamard(
                acc_run.contiguous(),
                getattr(layer, f"qtip_had_out_{run[0].index}"),
                block_size=[layer.qtip_transforms[sh.index].out_block for sh in run],
                segment_sizes=[sh.out_full for sh in run],
                out_dtype=torch.float32,
            )
        )
    return _cat(outputs)


def _cat(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Side by side along the last dim (no copy for one tensor)."""
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors, dim=-1)


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
    shards = layer.qtip_shards
    n = layer.qtip_in_size
    start = layer.qtip_in_rank * n
    # The all-gather of the input shards as an all-reduce of zero-padded
    # rows (exact: x + 0 = x), which takes vLLM's custom all-reduce.
    x_full = tensor_model_parallel_all_reduce(
        F.pad(x, (start, layer.qtip_in_full - start - n))
    )
    if layer.qtip_use_kernels:
        # One qtip_matmul: the input transform over all features, this
        # rank's columns of the GEMM, the output transform and SV (three
        # launches, as a split_for_tp layer).
        (shard,) = shards
        (transform,) = layer.qtip_transforms
        assert shard.params is not None
        return qtip_ops.qtip_matmul(
            x_full,
            layer.trellis,
            layer.tlut,
            layer.SU,
            layer.SV,
            layer.qtip_had_in_0,
            layer.qtip_had_out_0,
            shard.params.K,
            in_block=transform.in_block,
            out_blocks=[transform.out_block],
            gemm_cols=(start, n),
        )
    xh = input_transform(layer, x_full, shards)
    xh = xh.narrow(-1, start, n).contiguous()
    y = output_transform(layer, hat_product(layer, xh, shards), shards)
    return _scale_output(y, layer.SV, x.dtype)


def _column_parallel_forward(layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """This rank's output columns of every shard, side by side.

    All quantized shards share each step (one input transform, one W_hat
    product per K, one all-gather, one output transform per H_K factor), so
    a fused q/k/v or gate/up layer launches no more kernels than one shard.
    """
    quantized = [sh for sh in layer.qtip_shards if sh.params is not None]
    xh = input_transform(layer, x, quantized)
    acc = _cat(
        [
            hat_product(layer, xh[run[0].index : run[-1].index + 1], run)
            for run in _runs(quantized, _bits)
        ]
    )
    # The all-gather of the products as an all-reduce: each rank places its
    # columns in zero-padded full-width rows (exact: x + 0 = x), which takes
    # vLLM's custom all-reduce and needs no rearrangement afterwards.
    tp_rank = get_tensor_model_parallel_rank()
    padded = []
    col = 0
    for shard in quantized:
        part = acc[:, col : col + shard.out_size]
        col += shard.out_size
        # Ranks holding the same rows (replicated KV heads) come in groups
        # of `replicas` consecutive ranks; the first of each group adds its
        # products.
        replicas = layer.tp_size * shard.out_size // shard.out_full
        if tp_rank % replicas:
            part = torch.zeros_like(part)
        start = shard.out_rank * shard.out_size
        padded.append(F.pad(part, (start, shard.out_full - start - shard.out_size)))
    full = tensor_model_parallel_all_reduce(_cat(padded))
    y = output_transform(layer, full, quantized)
    full_outputs = iter(y.split([sh.out_full for sh in quantized], dim=-1))
    outputs = []
    for shard in layer.qtip_shards:
        rows = slice(shard.row_offset, shard.row_offset + shard.out_size)
        if shard.params is None:
            outputs.append(F.linear(x, layer.weight[rows]))
            continue
        y_s = next(full_outputs).narrow(
            -1, shard.out_rank * shard.out_size, shard.out_size
        )
        outputs.append(_scale_output(y_s, layer.SV[rows], x.dtype))
    return _cat(outputs)
