# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""Pure-PyTorch reference codec for QTIP (trellis-coded quantization).

This is the ground truth that the CUDA kernels and the checkpoint loader are
tested against, and the forward of layers the kernels do not cover. It
covers the decoding side (the encoder and dense dequantization live with the
tests, in tests/quantization/reference_qtip.py):

* the bitshift-trellis codes (HYB ``quantlut_sym``, ``1mad``, ``2mad``,
  ``3inst``, ``quantlut``, ``lut``): state -> V weights,
* the two trellis bit layouts: the kernel layout of every published
  checkpoint (16x16 tiles in mma-fragment order, bytes interleaved over 2x2
  tile blocks) and the generic row-major layout for everything else,
* QTIP's randomized Hadamard transform ``(H_K kron Sylvester) / sqrt(n)``
  with its exact choice of the small factor H_K,
* the forward ``y = SV * (Hm @ W_hat @ Hn^T @ (SU * x))`` with the reference
  numerics.
"""

import math
from dataclasses import dataclass

import torch

from vllm.model_executor.layers.quantization.utils.qtip_hadamard import (
    HADAMARD_FACTOR_SIZES,
    hadamard_factor,
)

DECODE_MODES = ("quantlut_sym", "1mad", "2mad", "3inst", "quantlut", "lut")
# Modes that read the per-layer lookup table ``tlut``.
TLUT_DECODE_MODES = ("quantlut_sym", "quantlut", "lut")
# Modes defined for one weight per state.
SCALAR_DECODE_MODES = ("1mad", "2mad", "3inst")

# The reference takes the FIRST factor in this order that divides the
# dimension, so it must be kept as is (not sorted, not largest-first).
HADAMARD_K_ORDER = (172, 156, 140, 124, 116, 108, 60, 52, 36, 28, 20, 12)

# The forward divides the transformed input by this before the fp16 matmul
# and multiplies it back afterwards, to keep fp16 in range.
FORWARD_SCALE = 32.0

_MASK32 = 0xFFFFFFFF


@dataclass(frozen=True)
class QTIPCodeParams:
    """Trellis code parameters, as in a checkpoint's ``quip_params``.

    L: trellis state bits; K: bits per weight; V: weights per state;
    tlut_bits: index bits of the lookup table (2**tlut_bits entries);
    decode_mode: the code; td_x, td_y: tile rows (outputs) and columns
    (inputs).
    """

    L: int = 16
    K: int = 2
    V: int = 2
    tlut_bits: int = 9
    decode_mode: str = "quantlut_sym"
    td_x: int = 16
    td_y: int = 16

    @property
    def uses_kernel_layout(self) -> bool:
        """The reference's ``has_kernel`` predicate.

        It also selects the packing layout: the kernel layout when true, the
        generic row-major layout otherwise.
        """
        return (
            self.decode_mode == "quantlut_sym"
            and self.L == 16
            and self.V == 2
            and self.K in (2, 3, 4)
            and self.tlut_bits == 9
            and self.td_x == 16
            and self.td_y == 16
        )

    @property
    def tile_size(self) -> int:
        return self.td_x * self.td_y

    @property
    def uses_tlut(self) -> bool:
        return self.decode_mode in TLUT_DECODE_MODES

    def validate(self) -> None:
        """Raise ValueError naming the first unsupported key and value."""
        for key in ("L", "K", "V", "tlut_bits", "td_x", "td_y"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"QTIP {key}={value!r} must be a positive int")
        if self.decode_mode not in DECODE_MODES:
            raise ValueError(
                f"QTIP decode_mode={self.decode_mode!r} is not supported; "
                f"expected one of {DECODE_MODES}"
            )
        # States are cut as windows of at most 16 bits from the bitstream.
        if self.L > 16:
            raise ValueError(f"QTIP L={self.L} is not supported (L <= 16)")
        if self.K * self.V > self.L:
            raise ValueError(
                f"QTIP K={self.K}, V={self.V}: K*V={self.K * self.V} "
                f"exceeds the state size L={self.L}"
            )
        if self.decode_mode in SCALAR_DECODE_MODES and self.V != 1:
            raise ValueError(
                f"QTIP V={self.V} is not supported with "
                f"decode_mode={self.decode_mode!r} (needs V=1)"
            )
        if self.decode_mode == "quantlut_sym" and self.tlut_bits > 15:
            raise ValueError(
                f"QTIP tlut_bits={self.tlut_bits} is not supported with "
                "decode_mode='quantlut_sym' (tlut_bits <= 15)"
            )
        if self.decode_mode == "quantlut" and self.tlut_bits > 16:
            raise ValueError(
                f"QTIP tlut_bits={self.tlut_bits} is not supported with "
                "decode_mode='quantlut' (tlut_bits <= 16)"
            )
        if self.decode_mode == "lut" and self.tlut_bits != self.L:
            raise ValueError(
                f"QTIP tlut_bits={self.tlut_bits} must equal L={self.L} "
                "with decode_mode='lut'"
            )
        # A weight group of V must not straddle two tile rows.
        if self.td_y % self.V != 0:
            raise ValueError(f"QTIP td_y={self.td_y} must be a multiple of V={self.V}")
        tile_bits = self.tile_size * self.K
        # Whole 16-bit words per tile, so no padding breaks the circular
        # (tail-biting) bitstream.
        if tile_bits % 16 != 0:
            raise ValueError(
                f"QTIP td_x={self.td_x}, td_y={self.td_y}, K={self.K}: the tile "
                f"bitstream of {tile_bits} bits is not a whole number of "
                "16-bit words"
            )
        if tile_bits < self.L:
            raise ValueError(
                f"QTIP td_x={self.td_x}, td_y={self.td_y}, K={self.K}: the tile "
                f"bitstream of {tile_bits} bits is shorter than L={self.L}"
            )


# ---------------------------------------------------------------------------
# Codes: state -> V weights
# ---------------------------------------------------------------------------


def _check_tlut(tlut: torch.Tensor | None, params: QTIPCodeParams) -> torch.Tensor:
    expected = (1 << params.tlut_bits, params.V)
    if tlut is None:
        raise ValueError(
            f"tlut is required for decode_mode={params.decode_mode!r}; "
            f"expected shape {expected}"
        )
    if tuple(tlut.shape) != expected:
        raise ValueError(
            f"tlut has shape {tuple(tlut.shape)}, expected {expected} "
            f"(2**tlut_bits, V) for tlut_bits={params.tlut_bits}, V={params.V}"
        )
    return tlut.float()


def _byte_sum(x: torch.Tensor) -> torch.Tensor:
    return (x & 0xFF) + ((x >> 8) & 0xFF) + ((x >> 16) & 0xFF) + ((x >> 24) & 0xFF)


def _fp16_from_bits(bits: torch.Tensor) -> torch.Tensor:
    """Reinterpret 16-bit patterns held in an int64 tensor as fp16."""
    signed = torch.where(bits >= 0x8000, bits - 0x10000, bits)
    return signed.to(torch.int16).view(torch.float16)


def decode_states(
    states: torch.Tensor,
    params: QTIPCodeParams,
    tlut: torch.Tensor | None,
) -> torch.Tensor:
    """Decode trellis states of any shape ``S`` to weights of shape (*S, V).

    The result is float32. ``tlut`` is needed by the table modes
    (quantlut_sym, quantlut, lut) and ignored by the computed codes.
    """
    params.validate()
    mode = params.decode_mode
    s = states.long() & ((1 << params.L) - 1)
    if mode in TLUT_DECODE_MODES:
        table = _check_tlut(tlut, params).to(s.device)
        if mode == "lut":
            return table[s]
        # s < 2**16, so s*(s+1) is exact in int64; only its low 16 bits are
        # read, so the reference's mod 2**32 does not matter.
        v = (s * (s + 1)) & 0xFFFF
        q = params.tlut_bits
        if mode == "quantlut":
            return table[(v >> (16 - q)) & ((1 << q) - 1)]
        # HYB: index from bits 15-q..14, sign (bit 15) on the first weight.
        out = table[(v >> (15 - q)) & ((1 << q) - 1)]
        sign = 1.0 - 2.0 * ((v >> 15) & 1).float()
        out[..., 0] *= sign
        return out
    if mode == "1mad":
        x = (34038481 * s + 76625530) & _MASK32
        value = (_byte_sum(x) - 510).float() / 147.800537109375
    elif mode == "2mad":
        x = (264435761 * s + 1013904223) & _MASK32
        # x < 2**32, so x * 1664525 < 2**53 fits in int64.
        x = (x + ((x * 1664525) >> 32)) & _MASK32
        value = (_byte_sum(x) - 510).float() / 147.800537109375
    else:  # 3inst
        x = (89226354 * s + 64248484) & _MASK32
        x = (x & 0x8FFF8FFF) ^ 0x3B603B60
        # The sum of the two halves is rounded to fp16, as in the reference.
        value = (_fp16_from_bits(x >> 16) + _fp16_from_bits(x & 0xFFFF)).float()
    return value.unsqueeze(-1)


def decode_table(
    params: QTIPCodeParams,
    tlut: torch.Tensor | None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Decoded values of all 2**L states: float32 (2**L, V)."""
    states = torch.arange(1 << params.L, device=device)
    return decode_states(states, params, tlut)


# ---------------------------------------------------------------------------
# Bit layouts: packed int16 trellis <-> per-weight-group states
# ---------------------------------------------------------------------------


def expected_trellis_numel(m: int, n: int, params: QTIPCodeParams) -> int:
    """Number of int16 words holding an m x n matrix: m*n*K/16."""
    return m * n * params.K // 16


def trellis_shape(m: int, n: int, params: QTIPCodeParams) -> tuple[int, int]:
    """Canonical 2-D trellis shape: (tiles, 16-bit words per tile)."""
    return (m * n // params.tile_size, params.tile_size * params.K // 16)


def _check_dims(m: int, n: int, params: QTIPCodeParams) -> None:
    if params.uses_kernel_layout:
        # The kernel layout interleaves 2x2 blocks of 16x16 tiles.
        if m % 32 != 0 or n % 32 != 0:
            raise ValueError(
                f"QTIP kernel layout needs m (out_features) and n "
                f"(in_features) to be multiples of 32, got m={m}, n={n}"
            )
    elif m % params.td_x != 0 or n % params.td_y != 0:
        raise ValueError(
            f"QTIP generic layout needs m (out_features) to be a multiple of "
            f"td_x={params.td_x} and n (in_features) a multiple of "
            f"td_y={params.td_y}, got m={m}, n={n}"
        )


def _flat_trellis(
    trellis: torch.Tensor, m: int, n: int, params: QTIPCodeParams
) -> torch.Tensor:
    """Validate the trellis (2-D, flat or (m/32, n/32, 64K)) and flatten it."""
    expected = expected_trellis_numel(m, n, params)
    if trellis.dtype != torch.int16:
        raise ValueError(f"trellis must be int16, got dtype {trellis.dtype}")
    if trellis.numel() != expected:
        raise ValueError(
            f"trellis has shape {tuple(trellis.shape)} ({trellis.numel()} "
            f"elements), expected m*n*K/16 = {expected} elements, e.g. shape "
            f"{trellis_shape(m, n, params)}, for m={m}, n={n}, K={params.K}"
        )
    return trellis.reshape(-1)


def _tile_streams_from_trellis(
    trellis: torch.Tensor, m: int, n: int, params: QTIPCodeParams
) -> torch.Tensor:
    """Per-tile bitstreams as bytes in stream order, first bit = MSB.

    Returns byte values as int32 (m/td_x, n/td_y, T*K/8), tiles in natural
    (row tile, column tile) order.
    """
    words = _flat_trellis(trellis, m, n, params).to(torch.int32) & 0xFFFF
    mt, nt = m // params.td_x, n // params.td_y
    if params.uses_kernel_layout:
        k = params.K
        # Memory bytes of the int16 words, little-endian.
        mem = torch.stack((words & 0xFF, words >> 8), dim=-1)
        # (block row, block col, lane, kc, mr, byte); each lane segment is a
        # little-endian integer whose MSB is the first stream bit.
        mem = mem.reshape(m // 32, n // 32, 32, 2, 2, k).flip(-1)
        # -> (block row, mr, block col, kc, lane, byte) = (tile row, tile
        # col, 32 lane segments of K bytes).
        return mem.permute(0, 4, 1, 3, 2, 5).reshape(mt, nt, 32 * k)
    # Generic layout: words of each tile hold its stream MSB first.
    stream = torch.stack((words >> 8, words & 0xFF), dim=-1)
    return stream.reshape(mt, nt, -1)


def _sequence_to_natural(
    seq: torch.Tensor, m: int, n: int, params: QTIPCodeParams
) -> torch.Tensor:
    """(tile rows, tile cols, T/V) in sequence order -> (m, n/V)."""
    mt, nt = seq.shape[:2]
    if params.uses_kernel_layout:
        # State t = 4*lane + j with lane = 4g + q and j = 2d + a decodes to
        # row g + 8a and weight pair 4d + q of its tile (mma A fragment).
        seq = seq.reshape(mt, nt, 8, 4, 2, 2)  # (.., g, q, d, a)
        return seq.permute(0, 5, 2, 1, 4, 3).reshape(m, n // 2)
    # Generic: row-major over (td_x rows, td_y/V groups).
    seq = seq.reshape(mt, nt, params.td_x, params.td_y // params.V)
    return seq.permute(0, 2, 1, 3).reshape(m, n // params.V)


def unpack_trellis(
    trellis: torch.Tensor, m: int, n: int, params: QTIPCodeParams
) -> torch.Tensor:
    """Trellis states of each group of V weights: int32 (m, n // V).

    ``states[r, c]`` decodes to weights ``W_hat[r, V*c : V*c + V]``.
    """
    params.validate()
    _check_dims(m, n, params)
    streams = _tile_streams_from_trellis(trellis, m, n, params)
    # State t is the L-bit window at bit t*K*V of the circular stream; since
    # L <= 16 it lies within the 3 bytes from byte (t*K*V) // 8.
    windows = (
        (streams << 16) | (streams.roll(-1, dims=-1) << 8) | streams.roll(-2, dims=-1)
    )
    start = torch.arange(params.tile_size // params.V, device=streams.device) * (
        params.K * params.V
    )
    shift = (24 - params.L - start % 8).to(torch.int32)
    seq = (windows[..., start // 8] >> shift) & ((1 << params.L) - 1)
    return _sequence_to_natural(seq, m, n, params)


def decode_weight(
    trellis: torch.Tensor,
    tlut: torch.Tensor | None,
    m: int,
    n: int,
    params: QTIPCodeParams,
) -> torch.Tensor:
    """Decode the Hadamard-domain matrix W_hat: float32 (m, n)."""
    states = unpack_trellis(trellis, m, n, params)
    table = decode_table(params, tlut, device=trellis.device)
    return table[states.long()].reshape(m, n)


# ---------------------------------------------------------------------------
# Randomized Hadamard transform
# ---------------------------------------------------------------------------


def _is_power_of_two(x: int) -> bool:
    return x > 0 and x & (x - 1) == 0


def _hadamard_k(n: int) -> int:
    """QTIP's factor K of n = K * 2**a (1 for powers of two).

    Follows the reference exactly: the first K of HADAMARD_K_ORDER dividing n
    is taken, and n/K must then be a power of two (no fallback to a later K).
    """
    if n < 1:
        raise ValueError(f"Hadamard size n={n} must be positive")
    for k in HADAMARD_K_ORDER:
        if n % k == 0:
            if not _is_power_of_two(n // k):
                raise ValueError(
                    f"QTIP Hadamard transform does not support dimension "
                    f"{n}: the reference factor K={k} divides it but "
                    f"{n}/{k} = {n // k} is not a power of two"
                )
            return k
    if _is_power_of_two(n):
        return 1
    raise ValueError(
        f"QTIP Hadamard transform does not support dimension {n}: it must be "
        f"K * 2**a with K in {HADAMARD_FACTOR_SIZES} or a power of two"
    )


def get_hadamard_factor(n: int) -> tuple[int, torch.Tensor | None]:
    """QTIP's factorization n = K * 2**a: (K, H_K as float32 +-1).

    Returns (1, None) for powers of two; raises naming n if QTIP has no
    transform of that size.
    """
    k = _hadamard_k(n)
    return k, (hadamard_factor(k) if k > 1 else None)


def _sylvester_transform_(x: torch.Tensor) -> torch.Tensor:
    """In-place unnormalized Sylvester (natural order) Hadamard, last dim.

    x must be contiguous; one butterfly stage per bit of the size.
    """
    size = x.shape[-1]
    h = 1
    while h < size:
        pairs = x.view(-1, size // (2 * h), 2, h)
        a, b = pairs[:, :, 0], pairs[:, :, 1]
        diff = a - b
        a.add_(b)
        b.copy_(diff)
        h *= 2
    return x


def hadamard_transform(
    x: torch.Tensor,
    transpose: bool = False,
    block_size: int | None = None,
    had_k: torch.Tensor | None = None,
) -> torch.Tensor:
    """Apply Hn (``hadU``) or Hn^T (``hadUt``) along the last dim of x.

    Hn = (H_K kron S_{n/K}) / sqrt(n), with S the Sylvester Hadamard. With
    ``block_size`` the transform is block-diagonal: each contiguous chunk of
    that size is transformed on its own (the TP-split rcp=1/2 checkpoints).
    Computed in fp32; the result has x's dtype.

    ``had_k`` may hold H_K already on x's device (float32 K x K), as layers
    keep it in a buffer: looking it up copies it from the host, which CUDA
    graph capture does not allow.
    """
    size = x.shape[-1]
    if block_size is None:
        block_size = size
    if block_size < 1 or size % block_size != 0:
        raise ValueError(
            f"Hadamard block_size={block_size} must divide the last dim of x ({size})"
        )
    k = _hadamard_k(block_size)
    if had_k is None:
        had_k = hadamard_factor(k) if k > 1 else None
    elif k == 1 or tuple(had_k.shape) != (k, k):
        raise ValueError(
            f"had_k has shape {tuple(had_k.shape)}, but a Hadamard of size "
            f"{block_size} needs H_K with K={k}"
            + (" (none: a power of two)" if k == 1 else f", shape ({k}, {k})")
        )
    if block_size != size:
        # The quantizer picks H_K from the block size but the reference
        # forward from the full size; only shapes where both agree are
        # well defined.
        k_full = _hadamard_k(size)
        if k_full != k:
            raise ValueError(
                f"Hadamard block_size={block_size} needs factor K={k} but the "
                f"full dimension {size} uses K={k_full}"
            )
    lead = x.shape[:-1]
    xf = x.to(torch.float32, memory_format=torch.contiguous_format, copy=True)
    xf = xf.reshape(*lead, size // block_size, k, block_size // k)
    xf = _sylvester_transform_(xf) * (1.0 / math.sqrt(block_size))
    if had_k is not None:
        had_k = had_k.to(device=xf.device, dtype=torch.float32)
        if transpose:
            had_k = had_k.T
        xf = torch.matmul(had_k, xf)
    return xf.reshape(*lead, size).to(x.dtype)


# ---------------------------------------------------------------------------
# Quantized linear layer
# ---------------------------------------------------------------------------


def _check_rcp(rcp: int, tp_rank: int, m: int, n: int) -> None:
    if rcp not in (0, 1, 2):
        raise ValueError(f"QTIP rcp={rcp} must be 0, 1 or 2")
    if rcp == 0:
        return
    if tp_rank < 1:
        raise ValueError(f"QTIP tp_rank={tp_rank} must be positive")
    dim_name, dim = ("n (in_features)", n) if rcp == 1 else ("m (out_features)", m)
    if dim % tp_rank != 0:
        raise ValueError(
            f"QTIP rcp={rcp} splits {dim_name}={dim} into tp_rank={tp_rank} "
            "blocks, which does not divide it"
        )


def _layer_dims(SU: torch.Tensor, SV: torch.Tensor) -> tuple[int, int]:
    if SU.dim() != 1:
        raise ValueError(f"SU must be 1-D (n,), got shape {tuple(SU.shape)}")
    if SV.dim() != 1:
        raise ValueError(f"SV must be 1-D (m,), got shape {tuple(SV.shape)}")
    return SV.numel(), SU.numel()


def _block_sizes(
    rcp: int, tp_rank: int, m: int, n: int
) -> tuple[int | None, int | None]:
    """Block sizes of the (input, output) transforms for rcp."""
    _check_rcp(rcp, tp_rank, m, n)
    return (n // tp_rank if rcp == 1 else None, m // tp_rank if rcp == 2 else None)


def qtip_linear_forward(
    x: torch.Tensor,
    trellis: torch.Tensor,
    SU: torch.Tensor,
    SV: torch.Tensor,
    tlut: torch.Tensor | None,
    params: QTIPCodeParams,
    *,
    rcp: int = 0,
    tp_rank: int = 8,
    bias: torch.Tensor | None = None,
    fp16_input: bool = True,
    had_in: torch.Tensor | None = None,
    had_out: torch.Tensor | None = None,
) -> torch.Tensor:
    """y = SV * (Hm @ W_hat @ Hn^T @ (SU * x)) (+ bias), the reference way.

    x has any leading shape and n features; y has x's dtype. Transforms run
    in fp32; the transformed input is divided by 32, rounded to fp16 and
    multiplied by W_hat (fp16-exact) with fp32 accumulation, as the
    reference kernel does, then scaled back by 32 with SV. With
    ``fp16_input=False`` the fp16 rounding is skipped, so the whole forward
    is fp32 (the golden vectors were produced that way). ``had_in`` and
    ``had_out`` are the H_K factors of the input and output transforms, if
    already on x's device (see hadamard_transform).
    """
    m, n = _layer_dims(SU, SV)
    rcp, tp_rank = int(rcp), int(tp_rank)
    in_block, out_block = _block_sizes(rcp, tp_rank, m, n)
    if x.shape[-1] != n:
        raise ValueError(
            f"x has {x.shape[-1]} features (shape {tuple(x.shape)}), expected "
            f"n={n} = len(SU)"
        )
    if bias is not None and tuple(bias.shape) != (m,):
        raise ValueError(
            f"bias has shape {tuple(bias.shape)}, expected ({m},) = (len(SV),)"
        )
    w_hat = decode_weight(trellis, tlut, m, n, params)
    lead = x.shape[:-1]
    xf = x.reshape(-1, n).float() * SU.float()
    xf = hadamard_transform(xf, transpose=True, block_size=in_block, had_k=had_in)
    xf = xf / FORWARD_SCALE
    if fp16_input:
        xf = xf.half().float()
    y = xf @ w_hat.T
    y = hadamard_transform(y, block_size=out_block, had_k=had_out)
    y = y * (SV.float() * FORWARD_SCALE)
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*lead, m)
