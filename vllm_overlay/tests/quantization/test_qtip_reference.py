# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""CPU tests of the QTIP reference codec (qtip_utils / qtip_hadamard).

The codec is checked against golden vectors of the reference implementation
and against slow scalar transcriptions of the format spec written here.

The golden files in qtip_goldens/ were produced by the reference
implementation's own decode and forward: a random packed ``trellis`` (flat
int16, kernel layout), ``tlut``, ``SU``, ``SV``, an input ``x`` and its output
``y``, the decoded Hadamard-domain matrix ``hatW`` and the dense weight ``W``
(y = x @ W.T); the metadata holds m, n and the code's parameters.

Run `pytest tests/quantization/test_qtip_reference.py`.
"""

import hashlib
import math
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from tests.quantization.reference_qtip import dequantize_weight, pack_trellis
from vllm.model_executor.layers.quantization.utils.qtip_hadamard import (
    HADAMARD_FACTOR_SIZES,
    hadamard_factor,
    hadamard_factor_int8,
)
from vllm.model_executor.layers.quantization.utils.qtip_utils import (
    QTIPCodeParams,
    decode_states,
    decode_table,
    decode_weight,
    get_hadamard_factor,
    hadamard_transform,
    qtip_linear_forward,
    unpack_trellis,
)

GOLDEN_DIR = Path(__file__).parent / "qtip_goldens"

# No distributed state or GPU memory to clean up between these tests
# (vLLM's conftest otherwise runs cleanup_dist_env_and_memory after each).
pytestmark = pytest.mark.skip_global_cleanup

HYB = QTIPCodeParams()
# Generic-layout codes: computed codes with V=1, HYB/quantlut off the kernel
# path, a free LUT, and a non-16x16 tile.
GENERIC_PARAMS = [
    QTIPCodeParams(K=2, V=1, decode_mode="1mad"),
    QTIPCodeParams(K=3, V=1, decode_mode="3inst"),
    QTIPCodeParams(K=1, V=1, decode_mode="2mad", td_x=8, td_y=8),
    QTIPCodeParams(K=2, V=2, tlut_bits=8),
    QTIPCodeParams(K=5, V=2),
    QTIPCodeParams(L=12, K=3, V=2, tlut_bits=8, decode_mode="quantlut"),
    QTIPCodeParams(L=8, K=2, V=2, tlut_bits=8, decode_mode="lut", td_x=8, td_y=8),
]


def _random_trellis(m: int, n: int, params: QTIPCodeParams, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    numel = m * n * params.K // 16
    return torch.randint(-(2**15), 2**15, (numel,), generator=gen, dtype=torch.int16)


def _random_tlut(params: QTIPCodeParams, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(2**params.tlut_bits, params.V, generator=gen).half()


# ---------------------------------------------------------------------------
# Scalar transcriptions of the spec (slow, independent of the codec)
# ---------------------------------------------------------------------------


def _fp16(bits: int) -> np.float16:
    return np.frombuffer(struct.pack("<H", bits), dtype=np.float16)[0]


def _spec_decode(s: int, params: QTIPCodeParams, tlut: np.ndarray) -> list:
    mode, q = params.decode_mode, params.tlut_bits
    if mode == "quantlut_sym":
        v = (s * (s + 1)) % 2**32
        w = [np.float32(t) for t in tlut[(v >> (15 - q)) & (2**q - 1)]]
        if (v >> 15) & 1:
            w[0] = -w[0]
        return w
    if mode == "quantlut":
        v = (s * (s + 1)) % 2**32
        return [np.float32(t) for t in tlut[(v >> (16 - q)) & (2**q - 1)]]
    if mode == "lut":
        return [np.float32(t) for t in tlut[s]]
    if mode == "3inst":
        x = (89226354 * s + 64248484) % 2**32
        x = (x & 0x8FFF8FFF) ^ 996162400
        return [np.float32(np.float16(_fp16(x >> 16) + _fp16(x & 0xFFFF)))]
    if mode == "1mad":
        x = (34038481 * s + 76625530) % 2**32
    else:  # 2mad
        x = (264435761 * s + 1013904223) % 2**32
        x = (x + ((x * 1664525) >> 32)) % 2**32
    total = sum(x.to_bytes(4, "little")) - 510
    return [np.float32(total) / np.float32(147.800537109375)]


def _spec_unpack(trellis: torch.Tensor, m: int, n: int, p: QTIPCodeParams):
    """Per-weight-group states (m, n // V) read bit by bit as the spec says."""
    words = [w & 0xFFFF for w in trellis.reshape(-1).tolist()]
    data = b"".join(struct.pack("<H", w) for w in words)
    nbits = p.td_x * p.td_y * p.K
    states = np.zeros((m, n // p.V), dtype=np.int64)
    for tr in range(m // p.td_x):
        for tc in range(n // p.td_y):
            if p.uses_kernel_layout:
                # 32x32 block, lane, then (kc, mr); K little-endian bytes.
                block = (tr // 2) * (n // 32) + tc // 2
                sub = (tc % 2) * 2 + tr % 2
                stream = 0
                for lane in range(32):
                    off = ((block * 32 + lane) * 4 + sub) * p.K
                    seg = int.from_bytes(data[off : off + p.K], "little")
                    stream = (stream << (8 * p.K)) | seg
            else:
                per_tile = nbits // 16
                tile = tr * (n // p.td_y) + tc
                stream = 0
                for w in words[tile * per_tile : (tile + 1) * per_tile]:
                    stream = (stream << 16) | w
            doubled = (stream << nbits) | stream
            for t in range(p.td_x * p.td_y // p.V):
                state = (doubled >> (2 * nbits - t * p.K * p.V - p.L)) % 2**p.L
                if p.uses_kernel_layout:
                    lane, j = t >> 2, t & 3
                    r = (lane >> 2) + 8 * (j & 1)
                    c = 8 * (j >> 1) + 2 * (lane & 3)
                else:
                    r, c = divmod(p.V * t, p.td_y)
                states[tr * p.td_x + r, (tc * p.td_y + c) // p.V] = state
    return torch.from_numpy(states)


def _sylvester(size: int) -> np.ndarray:
    s = np.ones((1, 1))
    while s.shape[0] < size:
        s = np.block([[s, s], [s, -s]])
    return s


def _dense_hadamard(size: int) -> torch.Tensor:
    """Explicit Hn = (H_K kron S) / sqrt(size) in float64."""
    k, had_k = get_hadamard_factor(size)
    h_k = np.ones((1, 1)) if had_k is None else had_k.double().numpy()
    return torch.from_numpy(np.kron(h_k, _sylvester(size // k)) / math.sqrt(size))


# ---------------------------------------------------------------------------
# Goldens from the reference implementation
# ---------------------------------------------------------------------------


def golden_files() -> list[Path]:
    files = sorted(GOLDEN_DIR.glob("*.safetensors"))
    assert files, f"no QTIP golden files in {GOLDEN_DIR}"
    return files


def _load_golden(path: Path):
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(str(path))
    params = QTIPCodeParams(
        L=int(meta["L"]),
        K=int(meta["K"]),
        V=int(meta["V"]),
        tlut_bits=int(meta["tlut_bits"]),
        decode_mode=meta["decode_mode"],
        td_x=int(meta.get("td_x", 16)),
        td_y=int(meta.get("td_y", 16)),
    )
    layer = dict(rcp=int(meta.get("rcp", 0)), tp_rank=int(meta.get("tp_rank", 8)))
    return params, int(meta["m"]), int(meta["n"]), layer, tensors


@pytest.mark.parametrize("path", golden_files(), ids=lambda p: p.stem)
def test_golden(path):
    params, m, n, layer, t = _load_golden(path)
    trellis, tlut, SU, SV = t["trellis"], t["tlut"], t["SU"], t["SV"]

    w_hat = decode_weight(trellis, tlut, m, n, params)
    assert torch.equal(w_hat, t["hatW"])
    # The trellis is accepted by element count in every stored shape.
    shapes = [(-1,), (m * n // 256, 16 * params.K)]
    if params.uses_kernel_layout:
        shapes.append((m // 32, n // 32, 64 * params.K))
    for shape in shapes:
        assert torch.equal(
            decode_weight(trellis.view(shape), tlut, m, n, params), w_hat
        )
    assert torch.equal(
        pack_trellis(unpack_trellis(trellis, m, n, params), m, n, params).flatten(),
        trellis.flatten(),
    )

    # The goldens' forward is fp32 throughout.
    x, y = t["x"], t["y"]
    scale = y.abs().max().item()
    y_fp32 = qtip_linear_forward(
        x, trellis, SU, SV, tlut, params, **layer, fp16_input=False
    )
    torch.testing.assert_close(y_fp32, y, rtol=1e-4, atol=1e-5 * scale)
    # The default rounds the transformed input to fp16 like the kernel.
    y_fp16 = qtip_linear_forward(x, trellis, SU, SV, tlut, params, **layer)
    torch.testing.assert_close(y_fp16, y, rtol=1e-4, atol=3e-3 * scale)
    assert not torch.equal(y_fp16, y_fp32)

    W = dequantize_weight(trellis, SU, SV, tlut, params, **layer)
    if "W" in t:
        w_scale = t["W"].abs().max().item()
        torch.testing.assert_close(W, t["W"], rtol=1e-4, atol=1e-5 * w_scale)
    torch.testing.assert_close(x @ W.T, y, rtol=1e-4, atol=1e-5 * scale)

    # One flipped trellis bit must change the decoded matrix.
    flipped = trellis.clone().flatten()
    flipped[len(flipped) // 3] ^= 1 << 5
    assert not torch.equal(decode_weight(flipped, tlut, m, n, params), w_hat)


# ---------------------------------------------------------------------------
# Trellis layouts
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("K", [2, 3, 4])
def test_kernel_layout_round_trip(K):
    params = QTIPCodeParams(K=K)
    assert params.uses_kernel_layout
    m, n = 64, 96
    trellis = _random_trellis(m, n, params, seed=K)
    states = unpack_trellis(trellis, m, n, params)
    assert states.shape == (m, n // 2)
    assert torch.equal(states.long(), _spec_unpack(trellis, m, n, params))

    packed = pack_trellis(states, m, n, params)
    assert packed.dtype == torch.int16
    assert packed.shape == (m * n // 256, 16 * K)
    assert torch.equal(packed.flatten(), trellis)
    # States read from any bitstream are tail-biting consistent.
    assert torch.equal(unpack_trellis(packed, m, n, params), states)


@pytest.mark.parametrize("params", GENERIC_PARAMS, ids=str)
def test_generic_layout_round_trip(params):
    assert not params.uses_kernel_layout
    m, n = 2 * params.td_x, 3 * params.td_y
    trellis = _random_trellis(m, n, params, seed=params.K)
    states = unpack_trellis(trellis, m, n, params)
    assert torch.equal(states.long(), _spec_unpack(trellis, m, n, params))
    packed = pack_trellis(states, m, n, params)
    tile_words = params.td_x * params.td_y * params.K // 16
    assert packed.shape == (m * n // (params.td_x * params.td_y), tile_words)
    assert torch.equal(packed.flatten(), trellis)
    assert torch.equal(unpack_trellis(packed, m, n, params), states)


def test_generic_layout_bit_order():
    # One tile of 1mad K=2: state 0 is the first 16 bits (word 0, MSB first)
    # and state 1 starts K*V = 2 bits later.
    params = QTIPCodeParams(K=2, V=1, decode_mode="1mad")
    trellis = torch.zeros(32, dtype=torch.int16)
    trellis[0] = 0x1234
    trellis[1] = -0x8000  # 0x8000
    states = unpack_trellis(trellis, 16, 16, params)
    assert states[0, 0] == 0x1234
    assert states[0, 1] == (0x12348 >> 2) & 0xFFFF
    # The last state wraps around to the start of the stream.
    assert states[15, 15] == ((0 << 14) | (0x1234 >> 2)) & 0xFFFF


def test_kernel_layout_byte_order():
    # Tile (0, 0), lane 0, K=2: bytes 0..1 of the flat trellis hold state 0's
    # first 16 bits as a little-endian integer; state 1 is 4 bits later.
    params = QTIPCodeParams(K=2)
    trellis = torch.zeros(32 * 32 * 2 // 16, dtype=torch.int16)
    trellis[0] = 0x1234  # little-endian bytes 0x34, 0x12 -> segment 0x1234
    states = unpack_trellis(trellis, 32, 32, params)
    assert states[0, 0] == 0x1234  # t=0: row 0, columns 0..1
    assert states[8, 0] == 0x2340  # t=1: row 8, columns 0..1
    assert states[0, 4] == 0x3400  # t=2: row 0, columns 8..9
    # Bytes 2..3 (sub-tile kc=0, mr=1) belong to the tile of rows 16..31.
    trellis[0], trellis[1] = 0, 0x00AB
    states = unpack_trellis(trellis, 32, 32, params)
    assert states[16, 0] == 0x00AB
    assert states[:16].count_nonzero() == 0


def test_pack_is_reference_stream_for_inconsistent_states():
    # Pack writes state 0 whole, then only the low K*V bits of later states.
    params = QTIPCodeParams(K=2, V=1, decode_mode="1mad")
    states = torch.zeros(16, 16, dtype=torch.int32)
    states[0, 0] = 0xFFFF
    states[0, 1] = 0xFFF0  # high bits disagree with state 0; dropped
    packed = pack_trellis(states, 16, 16, params)
    assert packed[0, 0] == -1  # 0xFFFF
    assert packed[0, 1] == 0


# ---------------------------------------------------------------------------
# Decoders
# ---------------------------------------------------------------------------

ALL_MODE_PARAMS = [HYB] + GENERIC_PARAMS


@pytest.mark.parametrize("params", ALL_MODE_PARAMS, ids=str)
def test_decode_matches_scalar_spec(params):
    tlut = _random_tlut(params) if params.uses_tlut else None
    gen = torch.Generator().manual_seed(1)
    states = torch.cat(
        (
            torch.tensor([0, 1, 255, 2**params.L - 1]),
            torch.randint(0, 2**params.L, (1000,), generator=gen),
        )
    )
    out = decode_states(states, params, tlut)
    assert out.dtype == torch.float32
    assert out.shape == (len(states), params.V)
    tlut_np = None if tlut is None else tlut.numpy()
    expected = [_spec_decode(s, params, tlut_np) for s in states.tolist()]
    assert torch.equal(out, torch.tensor(np.array(expected, dtype=np.float32)))
    # Any leading shape; the full table agrees with per-state decoding.
    assert torch.equal(
        decode_states(states.view(4, -1), params, tlut).view_as(out), out
    )
    assert torch.equal(decode_table(params, tlut)[states], out)


def test_hyb_spot_values():
    tlut = _random_tlut(HYB)
    table = tlut.float()
    out = decode_states(torch.tensor([0, 255, 3]), HYB, tlut)
    # s=0: v=0 -> index 0, no sign.
    assert torch.equal(out[0], table[0])
    # s=255: v=0xFF00 -> index (0xFF00 >> 6) & 511 = 508, bit 15 set: only
    # the first weight is negated.
    assert torch.equal(out[1], torch.stack((-table[508, 0], table[508, 1])))
    # s=3: v=12 -> index 0, no sign.
    assert torch.equal(out[2], table[0])


def test_computed_code_spot_values():
    p1 = QTIPCodeParams(K=2, V=1, decode_mode="1mad")
    # s=0: x = 76625530 = 0x0491367A, byte sum 0x04+0x91+0x36+0x7A = 325.
    value = decode_states(torch.tensor([0]), p1, None).item()
    assert value == pytest.approx((325 - 510) / 147.800537109375, rel=1e-7)
    p3 = QTIPCodeParams(K=2, V=1, decode_mode="3inst")
    # s=0: x = (64248484 & 0x8FFF8FFF) ^ 0x3B603B60 = 0x38B431C4, halves
    # 0.587890625 + 0.18017578125 (exact in fp16).
    # s=1: x = 0x3245BC76, halves 0.1959228515625 + -1.115234375: the exact
    # sum -0.9193115234375 rounds to -0.91943359375 in fp16.
    values = decode_states(torch.tensor([0, 1]), p3, None)
    assert values.flatten().tolist() == [0.76806640625, -0.91943359375]
    # Every 3INST half has |x| in [0.125, 2), so sums lie in (-4, 4).
    values = decode_table(p3, None)
    assert values.abs().max() < 4


def test_hyb_sign_only_on_first_component():
    tlut = torch.ones(512, 2, dtype=torch.float16)
    values = decode_table(HYB, tlut)
    assert torch.equal(values[:, 1], torch.ones(2**16))
    assert set(values[:, 0].tolist()) == {-1.0, 1.0}


# ---------------------------------------------------------------------------
# Hadamard transform
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "dim, k",
    [
        (11008, 172),
        (13824, 108),
        (5120, 20),
        (14336, 28),
        (28672, 28),
        (53248, 52),
        (6656, 52),
        (3072, 12),
        (576, 36),
        (1536, 12),
        (192, 12),
        (22016, 172),
        (4096, 1),
        (1, 1),
    ],
)
def test_hadamard_k_selection(dim, k):
    got_k, had_k = get_hadamard_factor(dim)
    assert got_k == k
    if k == 1:
        assert had_k is None
    else:
        assert had_k.dtype == torch.float32
        assert torch.equal(had_k, hadamard_factor(k))


@pytest.mark.parametrize("dim", [4544, 18944, 100, 0])
def test_hadamard_unsupported_dim(dim):
    with pytest.raises(ValueError, match=str(dim)):
        get_hadamard_factor(dim)
    if dim > 0:
        with pytest.raises(ValueError, match=str(dim)):
            hadamard_transform(torch.zeros(dim))


def test_hadamard_vendored_data():
    assert HADAMARD_FACTOR_SIZES == (
        12,
        20,
        28,
        36,
        52,
        60,
        108,
        116,
        124,
        140,
        156,
        172,
    )
    had20 = hadamard_factor_int8(20)
    assert had20[0].tolist() == [1] + [-1] * 19
    for k in HADAMARD_FACTOR_SIZES:
        h = hadamard_factor_int8(k).int()
        assert torch.equal(h @ h.T, k * torch.eye(k, dtype=torch.int32)), k
    with pytest.raises(ValueError, match="K=16"):
        hadamard_factor_int8(16)


# sha256 of each H_K (int8, row-major) as every published QTIP checkpoint
# uses it: the reference implementation's tables.
HADAMARD_SHA256 = {
    12: "67507aecbe2abee5607ebc930edc6e70f5046bd415503c71e71ac7dc6ddc9e50",
    20: "f54960fecf1ccf70671b403318d07fd1babfee079c6ebd627812276c3f5d91ed",
    28: "a6cb994c78f9acd4ce172a154b97e3982594cc0124ce7af90cb88810b9509a8c",
    36: "d674d8240e6b622bff2b54fd5f16f903ef5ccbde6e5fba55a73e6b8616ce936d",
    52: "9ee082772819b1055d61f2d6bc89d814caaeb2fdc5f4d8bb54317842856be195",
    60: "091e76fba0aef58371335b478d7b3f320fcc77b1185eff7d2ed962cd5bc5a048",
    108: "690a34c6c9ed2f0edaf44022cfe6147d7e788cc555505ed5293db3c255582370",
    116: "e35aecfbc1d95799af1b7e871a0edd055aa6be30a8eee5f7cac3d67d29d188cf",
    124: "9b41cf5242a1dd123127238db8506cf8f737d9072f592fde3b69ae918f7699df",
    140: "b9ff01506ffe4db50af93f4c21e0c5af43159fbf5ccf5f8366f1c0efeee84417",
    156: "99a1b852ce559ffd6291cfc39889b4963b068b27116191ce7fc24efcacc538fd",
    172: "378ef12c7cc31f3ea558e1c66b9552a83128f8f732b0bc094b864c8e120d84bd",
}


@pytest.mark.parametrize("k", HADAMARD_FACTOR_SIZES)
def test_hadamard_factors_are_the_published_ones(k):
    # Ten come from compressed-tensors' table, H_20 and H_124 from
    # qtip_hadamard itself; a change in either source fails here.
    data = hadamard_factor_int8(k).contiguous().numpy().tobytes()
    assert hashlib.sha256(data).hexdigest() == HADAMARD_SHA256[k]


@pytest.mark.parametrize(
    "dim", [1, 2, 64, 128] + [4 * k for k in HADAMARD_FACTOR_SIZES]
)
def test_hadamard_transform_matches_dense(dim):
    if dim in (4 * k for k in HADAMARD_FACTOR_SIZES):
        assert get_hadamard_factor(dim)[0] == dim // 4
    dense = _dense_hadamard(dim)
    # H Hᵀ = n I for the unnormalized matrix.
    unnormalized = (dense * math.sqrt(dim)).round()
    assert torch.equal(unnormalized @ unnormalized.T, dim * torch.eye(dim).double())

    x = torch.randn(3, dim, generator=torch.Generator().manual_seed(dim))
    xd = x.double()
    out = hadamard_transform(x)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), xd @ dense.T, rtol=1e-5, atol=1e-5)
    out_t = hadamard_transform(x, transpose=True)
    torch.testing.assert_close(out_t.double(), xd @ dense, rtol=1e-5, atol=1e-5)
    # hadUt inverts hadU.
    torch.testing.assert_close(hadamard_transform(out, transpose=True), x)


def test_hadamard_transform_leaves_input_alone():
    x = torch.randn(64, 48)
    for inp in (x, x.T.contiguous().T):  # contiguous and strided
        before = inp.clone()
        out = hadamard_transform(inp)
        assert torch.equal(inp, before)
        expected = before.double() @ _dense_hadamard(48).T
        torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


def test_hadamard_transform_with_given_factor():
    # Layers pass H_K kept in a buffer (no host copy inside a CUDA graph).
    x = torch.randn(3, 576)  # 576 = 36 * 16
    had_k = get_hadamard_factor(576)[1]
    for transpose in (False, True):
        assert torch.equal(
            hadamard_transform(x, transpose, had_k=had_k.clone()),
            hadamard_transform(x, transpose),
        )
    with pytest.raises(ValueError, match=r"had_k has shape \(12, 12\).*K=36"):
        hadamard_transform(x, had_k=hadamard_factor(12))
    with pytest.raises(ValueError, match="power of two"):
        hadamard_transform(torch.randn(2, 64), had_k=hadamard_factor(12))


def test_hadamard_transpose_differs_for_asymmetric_factor():
    x = torch.randn(2, 48)  # K=12, not symmetric
    assert not torch.allclose(hadamard_transform(x), hadamard_transform(x, True))


def test_hadamard_transform_dtypes():
    x = torch.randn(4, 2, 576)
    ref = hadamard_transform(x)
    for dtype in (torch.float16, torch.bfloat16):
        out = hadamard_transform(x.to(dtype))
        assert out.dtype == dtype and out.shape == x.shape
        torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("dim, block", [(576, 72), (192, 24), (1024, 128)])
def test_hadamard_block_diagonal(dim, block):
    x = torch.randn(3, dim, generator=torch.Generator().manual_seed(0))
    dense = torch.block_diag(*[_dense_hadamard(block)] * (dim // block))
    for transpose in (False, True):
        out = hadamard_transform(x, transpose=transpose, block_size=block)
        expected = x.double() @ (dense if transpose else dense.T)
        torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="block_size=100"):
        hadamard_transform(x, block_size=100)
    with pytest.raises(ValueError, match="block_size"):
        # 96 = 12 * 8 needs K=12 while 576 uses K=36.
        hadamard_transform(torch.zeros(576), block_size=96)


# ---------------------------------------------------------------------------
# Quantized linear forward and dequantization
# ---------------------------------------------------------------------------


def _random_layer(m: int, n: int, params: QTIPCodeParams, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    trellis = _random_trellis(m, n, params, seed)
    tlut = _random_tlut(params, seed) if params.uses_tlut else None
    SU = (torch.rand(n, generator=gen) + 0.5).half()
    SV = torch.rand(m, generator=gen) * 0.05
    return trellis, SU, SV, tlut


@pytest.mark.parametrize("rcp", [0, 1, 2])
def test_forward_matches_dense_formula(rcp):
    m, n, tp = 96, 576, 8
    trellis, SU, SV, tlut = _random_layer(m, n, HYB, seed=rcp)
    w_hat = decode_weight(trellis, tlut, m, n, HYB).double()
    h_n, h_m = _dense_hadamard(n), _dense_hadamard(m)
    if rcp == 1:
        h_n = torch.block_diag(*[_dense_hadamard(n // tp)] * tp)
    elif rcp == 2:
        h_m = torch.block_diag(*[_dense_hadamard(m // tp)] * tp)
    W_ref = SV.double()[:, None] * (h_m @ w_hat @ h_n.T) * SU.double()[None, :]

    W = dequantize_weight(trellis, SU, SV, tlut, HYB, rcp=rcp, tp_rank=tp)
    scale = W_ref.abs().max().item()
    torch.testing.assert_close(W.double(), W_ref, rtol=1e-4, atol=1e-5 * scale)

    x = torch.randn(2, 5, n, generator=torch.Generator().manual_seed(1))
    bias = torch.randn(m)
    y_ref = x.double() @ W_ref.T + bias.double()
    y_scale = y_ref.abs().max().item()
    y = qtip_linear_forward(
        x, trellis, SU, SV, tlut, HYB, rcp=rcp, tp_rank=tp, bias=bias, fp16_input=False
    )
    assert y.shape == (2, 5, m) and y.dtype == torch.float32
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-4, atol=1e-5 * y_scale)
    y16 = qtip_linear_forward(
        x,
        trellis,
        SU,
        SV,
        tlut,
        HYB,
        rcp=torch.tensor(rcp),
        tp_rank=torch.tensor(tp),
        bias=bias,
    )
    torch.testing.assert_close(y16.double(), y_ref, rtol=1e-3, atol=3e-3 * y_scale)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_forward_dtypes(dtype):
    m, n = 64, 128
    trellis, SU, SV, tlut = _random_layer(m, n, HYB)
    x = torch.randn(3, n)
    ref = qtip_linear_forward(x, trellis, SU, SV, tlut, HYB)
    y = qtip_linear_forward(x.to(dtype), trellis, SU, SV, tlut, HYB)
    assert y.dtype == dtype and y.shape == (3, m)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(y.float(), ref, rtol=tol, atol=tol * ref.abs().max())


@pytest.mark.parametrize("params", GENERIC_PARAMS[:2], ids=str)
def test_forward_generic_codes(params):
    m, n = 32, 64
    trellis, SU, SV, tlut = _random_layer(m, n, params)
    x = torch.randn(4, n)
    W = dequantize_weight(trellis, SU, SV, tlut, params)
    y = qtip_linear_forward(x, trellis, SU, SV, tlut, params, fp16_input=False)
    torch.testing.assert_close(y, x @ W.T, rtol=1e-4, atol=1e-5 * y.abs().max())


# ---------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------


def test_error_trellis_size_and_dtype():
    trellis, SU, SV, tlut = _random_layer(64, 128, HYB)
    with pytest.raises(ValueError, match=r"trellis .*expected m\*n\*K/16 = 1024"):
        decode_weight(trellis[:-1], tlut, 64, 128, HYB)
    with pytest.raises(ValueError, match=r"trellis .*\(32, 32\)"):
        qtip_linear_forward(torch.zeros(1, 128), trellis[:512], SU, SV, tlut, HYB)
    with pytest.raises(ValueError, match="trellis must be int16"):
        decode_weight(trellis.int(), tlut, 64, 128, HYB)


def test_error_dims():
    params = QTIPCodeParams()
    trellis = torch.zeros(48 * 64 * 2 // 16, dtype=torch.int16)
    with pytest.raises(ValueError, match="multiples of 32.*m=48, n=64"):
        unpack_trellis(trellis, 48, 64, params)
    with pytest.raises(ValueError, match="multiples of 32.*m=64, n=48"):
        unpack_trellis(trellis, 64, 48, params)
    generic = QTIPCodeParams(K=2, V=1, decode_mode="1mad")
    with pytest.raises(ValueError, match="td_x=16.*m=40"):
        unpack_trellis(
            torch.zeros(40 * 32 * 2 // 16, dtype=torch.int16), 40, 32, generic
        )
    with pytest.raises(
        ValueError, match=r"states has shape \(32, 32\), expected \(32, 16\)"
    ):
        pack_trellis(torch.zeros(32, 32, dtype=torch.int32), 32, 32, params)


def test_error_tlut():
    trellis, _, _, tlut = _random_layer(32, 32, HYB)
    with pytest.raises(
        ValueError, match=r"tlut has shape \(512, 1\), expected \(512, 2\)"
    ):
        decode_weight(trellis, tlut[:, :1], 32, 32, HYB)
    with pytest.raises(ValueError, match=r"tlut is required.*\(512, 2\)"):
        decode_weight(trellis, None, 32, 32, HYB)


def test_error_layer_vectors():
    trellis, SU, SV, tlut = _random_layer(64, 128, HYB)
    with pytest.raises(ValueError, match="SU must be 1-D"):
        dequantize_weight(trellis, SU.view(2, -1), SV, tlut, HYB)
    with pytest.raises(ValueError, match="SV must be 1-D"):
        qtip_linear_forward(torch.zeros(128), trellis, SU, SV.view(1, -1), tlut, HYB)
    with pytest.raises(ValueError, match=r"x has 64 features.*n=128"):
        qtip_linear_forward(torch.zeros(2, 64), trellis, SU, SV, tlut, HYB)
    with pytest.raises(ValueError, match=r"bias has shape \(63,\), expected \(64,\)"):
        qtip_linear_forward(
            torch.zeros(128), trellis, SU, SV, tlut, HYB, bias=torch.zeros(63)
        )
    # A wrong-length SV shows up as a trellis of the wrong size.
    with pytest.raises(ValueError, match=r"trellis .*m=32, n=128"):
        dequantize_weight(trellis, SU, SV[:32], tlut, HYB)


def test_error_rcp():
    trellis, SU, SV, tlut = _random_layer(64, 128, HYB)
    with pytest.raises(ValueError, match="rcp=3"):
        dequantize_weight(trellis, SU, SV, tlut, HYB, rcp=3)
    with pytest.raises(ValueError, match="tp_rank=3"):
        dequantize_weight(trellis, SU, SV, tlut, HYB, rcp=1, tp_rank=3)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(decode_mode="e8p"), "decode_mode='e8p'"),
        (dict(L=17), "L=17"),
        (dict(K=0), "K=0"),
        (dict(K=9), "K=9"),
        (dict(V=2, K=2, decode_mode="1mad"), "V=2"),
        (dict(tlut_bits=16), "tlut_bits=16"),
        (dict(decode_mode="lut", tlut_bits=9), "tlut_bits=9"),
        (dict(td_y=15), "td_y=15"),
        (dict(K=1, V=1, decode_mode="1mad", td_x=2, td_y=4), "td_x=2"),
    ],
)
def test_error_params(kwargs, match):
    params = QTIPCodeParams(**kwargs)
    with pytest.raises(ValueError, match=match):
        params.validate()
    with pytest.raises(ValueError, match=match):
        decode_states(torch.zeros(4, dtype=torch.int64), params, None)
