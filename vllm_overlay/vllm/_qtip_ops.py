# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""Python wrappers for the QTIP CUDA kernels (``torch.ops._qtip_C``).

The kernels implement the HYB trellis code of every published QTIP checkpoint
(quantlut_sym, L=16, V=2, tlut_bits=9, 16x16 tiles, K = 2, 3, 4) on the
published kernel byte layout. :func:`qtip_matmul` is the one entry point of a
QTIP linear layer; the other wrappers expose the building blocks for tests
and benchmarks.
"""

import contextlib

import torch

from vllm.platforms import current_platform

# vLLM's own build has the QTIP ops in _C_stable_libtorch; a standalone build
# of them on a precompiled vLLM wheel is the extension vllm._qtip_C. Never
# both: the library would be registered twice.
with contextlib.suppress(ImportError):
    import vllm._C_stable_libtorch  # noqa: F401
if not hasattr(torch.ops._qtip_C, "qtip_linear"):
    with contextlib.suppress(ImportError):
        import vllm._qtip_C  # noqa: F401

try:
    from torch.library import register_fake
except ImportError:  # torch < 2.4
    from torch.library import impl_abstract as register_fake

# Batch rows from which decoding W_hat to fp16 once and running cuBLAS beats
# the fused decode + GEMM kernel (which decodes W_hat once per 64 rows).
# Measured on the H200 (BENCHMARKS.md): at 128 rows the dense path wins on
# four of the six Llama layer shapes, at 64 on none.
QTIP_DENSE_MIN_ROWS = 128

# Bits per weight with a kernel, and the HYB table shape.
QTIP_KERNEL_K = (2, 3, 4)
QTIP_TLUT_SHAPE = (512, 2)
# mma.sync m16n8k16 with fp16 operands.
QTIP_MIN_CAPABILITY = (8, 0)

_OPS = ("qtip_gemm", "qtip_decode", "qtip_hadamard", "qtip_linear")


def _has_op(name: str) -> bool:
    return hasattr(torch.ops._qtip_C, name)


if _has_op("qtip_gemm"):

    @register_fake("_qtip_C::qtip_gemm")
    def _qtip_gemm_fake(
        x: torch.Tensor,
        trellis: torch.Tensor,
        tlut: torch.Tensor,
        shard_rows: list[int],
    ) -> torch.Tensor:
        return x.new_empty((x.shape[-2], trellis.shape[0] * 32), dtype=torch.float32)


if _has_op("qtip_decode"):

    @register_fake("_qtip_C::qtip_decode")
    def _qtip_decode_fake(
        trellis: torch.Tensor, tlut: torch.Tensor, shard_rows: list[int]
    ) -> torch.Tensor:
        return trellis.new_empty(
            (trellis.shape[0] * 32, trellis.shape[1] * 32), dtype=torch.float16
        )


if _has_op("qtip_hadamard"):

    @register_fake("_qtip_C::qtip_hadamard")
    def _qtip_hadamard_fake(
        x: torch.Tensor,
        in_scale: torch.Tensor | None,
        out_scale: torch.Tensor | None,
        had_k: torch.Tensor | None,
        transpose: bool,
        block_sizes: list[int],
        segment_sizes: list[int],
        factor: float,
        out_dtype: torch.dtype,
    ) -> torch.Tensor:
        if in_scale is not None and in_scale.dim() == 2:
            return x.new_empty((in_scale.shape[0], *x.shape), dtype=out_dtype)
        return x.new_empty(x.shape, dtype=out_dtype)


if _has_op("qtip_linear"):

    @register_fake("_qtip_C::qtip_linear")
    def _qtip_linear_fake(
        x: torch.Tensor,
        trellis: torch.Tensor,
        tlut: torch.Tensor,
        SU: torch.Tensor,
        SV: torch.Tensor,
        had_in: torch.Tensor | None,
        had_out: torch.Tensor | None,
        in_block: int,
        out_blocks: list[int],
        shard_rows: list[int],
        dense_min_rows: int,
        in_offset: int = 0,
    ) -> torch.Tensor:
        return x.new_empty((x.shape[0], SV.shape[0]))


def qtip_kernels_unavailable(
    device: torch.device | str | int | None = None,
) -> str | None:
    """Why the QTIP kernels cannot run on ``device`` (default: the current
    CUDA device), or None if they can.

    They need the ``_qtip_C`` extension, an NVIDIA GPU (not ROCm) and compute
    capability 8.0 or newer.
    """
    if not all(_has_op(name) for name in _OPS):
        return "the vllm._qtip_C extension is not built"
    if not current_platform.is_cuda():
        return "the QTIP kernels run on NVIDIA CUDA GPUs only"
    if device is None:
        index = torch.accelerator.current_device_index()
    else:
        dev = torch.device("cuda", device) if isinstance(device, int) else device
        dev = torch.device(dev)  # a str names a device too
        if dev.type != "cuda":
            return f"the weights are on {dev}, not on a CUDA GPU"
        index = dev.index if dev.index is not None else 0
    if not current_platform.has_device_capability(QTIP_MIN_CAPABILITY, index):
        major, minor = QTIP_MIN_CAPABILITY
        return f"the QTIP kernels need compute capability {major}.{minor} or newer"
    return None


def qtip_kernels_available(device: torch.device | str | int | None = None) -> bool:
    """Whether the QTIP kernels can run on ``device`` (default: current CUDA)."""
    return qtip_kernels_unavailable(device) is None


def qtip_hadamard_supported(
    block_size: int, K: int, device: torch.device | str | int
) -> bool:
    """Whether qtip_hadamard takes blocks of ``block_size = K * 2**a`` on device.

    The kernel needs 2**a >= 8 and holds a whole block, plus at least 8 rows of
    H_K, in shared memory: about 57k features on Hopper, 25k on sm_86/89.
    Queried once per layer, not per call.
    """
    if block_size // K < 8:
        return False
    limit = torch.cuda.get_device_properties(device).shared_memory_per_block_optin
    return (block_size + (8 * K if K > 1 else 0)) * 4 <= limit


def _check_trellis(
    trellis: torch.Tensor, tlut: torch.Tensor, m: int, n: int, K: int, shards: int = 1
):
    if K not in QTIP_KERNEL_K:
        raise ValueError(f"QTIP kernels support K in {QTIP_KERNEL_K}, got K={K}")
    if m % 32 != 0 or n % 32 != 0:
        raise ValueError(
            f"QTIP kernels need m (out_features) and n (in_features) to be "
            f"multiples of 32, got m={m}, n={n}"
        )
    if trellis.dtype != torch.int16:
        raise ValueError(f"trellis must be int16, got {trellis.dtype}")
    if trellis.numel() != m * n * K // 16:
        raise ValueError(
            f"trellis has shape {tuple(trellis.shape)} ({trellis.numel()} elements), "
            f"expected m*n*K/16 = {m * n * K // 16} for m={m}, n={n}, K={K}"
        )
    if not trellis.is_contiguous():
        raise ValueError("trellis must be contiguous")
    tlut_shapes: list[tuple[int, ...]] = [(shards, *QTIP_TLUT_SHAPE)]
    if shards == 1:
        tlut_shapes.append(QTIP_TLUT_SHAPE)
    if tlut.dtype != torch.float16 or tuple(tlut.shape) not in tlut_shapes:
        raise ValueError(
            f"tlut must be float16 of shape {' or '.join(map(str, tlut_shapes))}, "
            f"got {tlut.dtype} {tuple(tlut.shape)}"
        )
    if trellis.device != tlut.device:
        raise ValueError(
            f"trellis ({trellis.device}) and tlut ({tlut.device}) must be on one device"
        )
    return trellis.view(m // 32, n // 32, 64 * K)


def _check_factor(had: torch.Tensor | None, name: str, device: torch.device) -> None:
    if had is None:
        return
    if not (
        had.dtype == torch.float32 and had.dim() == 2 and had.shape[0] == had.shape[1]
    ):
        raise ValueError(
            f"{name} must be a float32 (K, K) Hadamard factor, got {had.dtype} "
            f"{tuple(had.shape)}"
        )
    if had.device != device:
        raise ValueError(f"{name} must be on {device}, got {had.device}")


def qtip_gemm(
    x: torch.Tensor,
    trellis: torch.Tensor,
    tlut: torch.Tensor,
    m: int | list[int],
    K: int,
) -> torch.Tensor:
    """x (B, n) fp16 @ W_hat^T -> (B, m) fp32, W_hat decoded on the fly.

    The fused GEMM of qtip_matmul on its own (its split-K partial sums
    added here; inside qtip_matmul the output transform adds them as it
    loads them). For several shards back to back, m lists
    their row counts, x is (shards, B, n) with one input per shard and tlut
    (shards, 512, 2); the output holds their products side by side.
    """
    shard_rows = [m] if isinstance(m, int) else list(m)
    trellis3 = _check_trellis(
        trellis, tlut, sum(shard_rows), x.shape[-1], K, len(shard_rows)
    )
    return torch.ops._qtip_C.qtip_gemm(x, trellis3, tlut, shard_rows)


def qtip_decode(
    trellis: torch.Tensor, tlut: torch.Tensor, m: int | list[int], n: int, K: int
) -> torch.Tensor:
    """The Hadamard-domain weight W_hat (m, n) in fp16 (m as in qtip_gemm)."""
    shard_rows = [m] if isinstance(m, int) else list(m)
    trellis3 = _check_trellis(trellis, tlut, sum(shard_rows), n, K, len(shard_rows))
    return torch.ops._qtip_C.qtip_decode(trellis3, tlut, shard_rows)


def qtip_hadamard(
    x: torch.Tensor,
    had_k: torch.Tensor | None = None,
    *,
    transpose: bool = False,
    block_size: int | list[int] | None = None,
    segment_sizes: list[int] | None = None,
    in_scale: torch.Tensor | None = None,
    out_scale: torch.Tensor | None = None,
    factor: float = 1.0,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """factor * out_scale * H(in_scale * x) along the last dim of x, in fp32.

    H = (H_K kron Sylvester) / sqrt(b) (H_K^T if ``transpose``), applied to
    each contiguous block of ``block_size`` (default: the whole dim) elements;
    ``had_k`` is H_K (float32 K x K on x's device) or None for powers of two.
    ``segment_sizes`` splits the last dim into segments (q/k/v outputs side
    by side), each with its own entry of a list ``block_size``. An in_scale
    of shape (shards, n) gives one output per shard: (shards, ..., n).
    The kernel reads ``had_k`` before the previous kernel on the stream has
    finished (programmatic dependent launch), so it must be a buffer that is
    not written just before, like a layer's H_K.
    """
    n = x.shape[-1]
    segments = [n] if segment_sizes is None else list(segment_sizes)
    if block_size is None:
        blocks = segments
    elif isinstance(block_size, int):
        blocks = [block_size] * len(segments)
    else:
        blocks = list(block_size)
    x2 = x.reshape(-1, n).contiguous()
    y = torch.ops._qtip_C.qtip_hadamard(
        x2,
        in_scale,
        out_scale,
        had_k,
        transpose,
        blocks,
        segments,
        factor,
        x.dtype if out_dtype is None else out_dtype,
    )
    if in_scale is not None and in_scale.dim() == 2:
        return y.reshape(in_scale.shape[0], *x.shape)
    return y.reshape(x.shape)


def qtip_matmul(
    x: torch.Tensor,
    trellis: torch.Tensor,
    tlut: torch.Tensor,
    SU: torch.Tensor,
    SV: torch.Tensor,
    had_in: torch.Tensor | None,
    had_out: torch.Tensor | None,
    K: int,
    *,
    in_block: int | None = None,
    out_blocks: list[int] | None = None,
    shard_rows: list[int] | None = None,
    gemm_cols: tuple[int, int] | None = None,
) -> torch.Tensor:
    """One QTIP linear: y = SV * (Hm @ W_hat @ Hn^T @ (SU * x)).

    x (..., n) fp16/bf16 -> (..., m) in x's dtype, with the reference
    numerics (x * SU and Hn^T in fp32, / 32 then fp16, W_hat product with fp32
    accumulation, Hm in fp32, * SV * 32). trellis holds m*n*K/16 int16 in the
    published kernel layout (any shape, e.g. (m/32, n/32, 64K)), tlut is
    (512, 2) fp16, SU (n,) and SV (m,) fp32, had_in / had_out the H_K factors
    of Hn / Hm (float32 K x K on x's device, None for powers of two; buffers
    not written just before the call, as qtip_hadamard needs).

    A fused layer (q/k/v, gate/up) runs all its shards in one call, three
    launches in all: ``shard_rows`` lists their row counts (m in total),
    their trellises are back to back, tlut is (shards, 512, 2), SU
    (shards, n) and SV their concatenated output scales; the output is the
    shards' outputs side by side, as vLLM's fused layers return them.
    in_block / out_blocks (one per shard) make Hn / Hm block-diagonal
    (TP-split checkpoints). gemm_cols = (offset, count) makes W_hat cover only
    those columns of Hn^T (SU * x): the trellis is m x count, the transform
    spans all n (a row-parallel rank's slice of a whole-matrix checkpoint;
    offset a multiple of 32). Below QTIP_DENSE_MIN_ROWS rows the fused decode +
    GEMM kernel runs, from there on W_hat is decoded to fp16 and multiplied
    by cuBLAS; on Hopper the prefill GEMM (W_hat decoded into wgmma's
    operand) takes over from either where its tiles fill the GPU. The choice
    happens inside one op, so torch.compile sees no branch.
    """
    if x.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"x must be float16 or bfloat16, got {x.dtype}")
    if not x.is_cuda:
        raise ValueError(f"x must be a CUDA tensor, got device {x.device}")
    if SU.dim() not in (1, 2) or SV.dim() != 1:
        raise ValueError(
            f"SU must be (n,) or (shards, n) and SV (m,), got shapes "
            f"{tuple(SU.shape)} and {tuple(SV.shape)}"
        )
    m, n = SV.shape[0], SU.shape[-1]
    shard_rows = [m] if shard_rows is None else list(shard_rows)
    su2 = SU.reshape(-1, n)
    if su2.shape[0] != len(shard_rows) or sum(shard_rows) != m:
        raise ValueError(
            f"shard_rows {shard_rows} must have one entry per SU row "
            f"({su2.shape[0]}) and sum to m = len(SV) = {m}"
        )
    out_blocks = list(shard_rows) if out_blocks is None else list(out_blocks)
    if len(out_blocks) != len(shard_rows):
        raise ValueError(
            f"out_blocks {out_blocks} must have one entry per shard {shard_rows}"
        )
    if x.shape[-1] != n:
        raise ValueError(
            f"x has {x.shape[-1]} features (shape {tuple(x.shape)}), expected "
            f"n = SU.shape[-1] = {n}"
        )
    for name, t in (("SU", SU), ("SV", SV)):
        if t.dtype != torch.float32:
            raise ValueError(f"{name} must be float32, got {t.dtype}")
        if t.device != x.device:
            raise ValueError(f"{name} must be on {x.device}, got {t.device}")
    _check_factor(had_in, "had_in", x.device)
    _check_factor(had_out, "had_out", x.device)
    if trellis.device != x.device:
        raise ValueError(f"trellis must be on {x.device}, got {trellis.device}")
    in_offset, n_gemm = (0, n) if gemm_cols is None else gemm_cols
    if in_offset < 0 or in_offset % 32 != 0 or n_gemm <= 0 or in_offset + n_gemm > n:
        raise ValueError(
            f"gemm_cols {gemm_cols} must be a 32-aligned column range within "
            f"the {n} transformed input features"
        )
    trellis3 = _check_trellis(trellis, tlut, m, n_gemm, K, len(shard_rows))
    lead = x.shape[:-1]
    y = torch.ops._qtip_C.qtip_linear(
        x.reshape(-1, n).contiguous(),
        trellis3,
        tlut.reshape(len(shard_rows), *QTIP_TLUT_SHAPE),
        su2,
        SV,
        had_in,
        had_out,
        n if in_block is None else in_block,
        out_blocks,
        shard_rows,
        QTIP_DENSE_MIN_ROWS,
        in_offset,
    )
    return y.reshape(*lead, m)
