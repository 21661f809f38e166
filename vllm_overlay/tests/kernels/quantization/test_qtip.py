# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""Tests for the QTIP CUDA kernels (vllm._qtip_C) against the reference codec.

Run: pytest tests/kernels/quantization/test_qtip.py (needs a CUDA GPU with
compute capability >= 8.0 and the _qtip_C extension). The golden vectors are
those of tests/quantization/qtip_goldens.

Tolerances (relative Frobenius error against qtip_linear_forward, which uses
the same reference numerics): 2e-3 for fp16 outputs and 8e-3 for bf16. The
only differences are fp32 summation order (the fp16 rounding of the
transformed input can then flip by one ulp), the fp16 output of the cuBLAS
GEMM on the dense path (the reference fallback's numerics) and the final
rounding to the activation dtype.
"""

from pathlib import Path

import pytest
import torch

import vllm._qtip_ops as qtip_ops
from vllm._qtip_ops import (
    QTIP_DENSE_MIN_ROWS,
    qtip_decode,
    qtip_gemm,
    qtip_hadamard,
    qtip_kernels_available,
    qtip_matmul,
)
from vllm.model_executor.layers.quantization.utils.qtip_utils import (
    HADAMARD_K_ORDER,
    QTIPCodeParams,
    decode_weight,
    get_hadamard_factor,
    hadamard_transform,
    qtip_linear_forward,
)

if not torch.cuda.is_available():
    pytest.skip("QTIP kernels need a CUDA GPU", allow_module_level=True)
if not qtip_kernels_available():
    pytest.skip(
        "vllm._qtip_C is not built or the GPU is older than SM 8.0",
        allow_module_level=True,
    )

GOLDEN_DIR = Path(__file__).parents[2] / "quantization" / "qtip_goldens"
DEVICE = "cuda"
BATCHES = (1, 2, 3, 8, 16, 33, 96, 256)
SHAPES = (
    (4096, 4096),
    (11008, 4096),
    (4096, 11008),
    (14336, 4096),
    (5120, 5120),
    (576, 576),
    (1536, 576),
)
TOL = {torch.float16: 2e-3, torch.bfloat16: 8e-3}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    assert not torch.isnan(a).any(), "kernel output has NaN"
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def random_layer(m: int, n: int, K: int, seed: int = 0):
    """Random trellis bits (any pattern is a valid trellis), tlut, SU, SV."""
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    trellis = torch.randint(
        -(2**15), 2**15, (m * n * K // 16,), generator=g, device=DEVICE
    ).to(torch.int16)
    tlut = torch.randn(512, 2, generator=g, device=DEVICE).half()
    SU = torch.randn(n, generator=g, device=DEVICE)
    SV = torch.rand(m, generator=g, device=DEVICE) * 0.02 + 0.005
    return trellis, tlut, SU, SV


def factor(size: int) -> torch.Tensor | None:
    _, had = get_hadamard_factor(size)
    return None if had is None else had.to(DEVICE)


def blockwise_hadamard(
    x: torch.Tensor, block: int, had: torch.Tensor | None, transpose: bool = False
) -> torch.Tensor:
    """The reference transform of each `block` columns on its own (a width of
    several blocks need not be a Hadamard size the reference would pick)."""
    return torch.cat(
        [hadamard_transform(b, transpose, had_k=had) for b in x.split(block, dim=1)],
        dim=1,
    )


def golden_files():
    return sorted(GOLDEN_DIR.glob("*.safetensors")) if GOLDEN_DIR.is_dir() else []


# ---------------------------------------------------------------------------
# Decode: bit-exact against the reference codec
# ---------------------------------------------------------------------------


@pytest.mark.skipif(not golden_files(), reason=f"no goldens in {GOLDEN_DIR}")
@pytest.mark.parametrize("path", golden_files(), ids=lambda p: p.stem)
def test_decode_and_forward_goldens(path: Path):
    from safetensors import safe_open

    with safe_open(str(path), "pt", device=DEVICE) as f:
        meta = f.metadata()
        t = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    m, n, K = int(meta["m"]), int(meta["n"]), int(meta["K"])
    w = qtip_decode(t["trellis"], t["tlut"], m, n, K)
    assert w.dtype == torch.float16
    assert torch.equal(w.float(), t["hatW"])
    # The goldens' y was computed in fp32 throughout; the kernel rounds the
    # transformed input to fp16 like the published kernel.
    SU, SV = t["SU"].float(), t["SV"].float()
    y = qtip_matmul(
        t["x"].half(), t["trellis"], t["tlut"], SU, SV, factor(n), factor(m), K
    )
    assert rel_err(y, t["y"]) < 2e-3


@pytest.mark.parametrize("K", (2, 3, 4))
@pytest.mark.parametrize("m,n", ((64, 128), (96, 576), (4096, 4096), (1536, 576)))
def test_decode_random(K: int, m: int, n: int):
    trellis, tlut, _, _ = random_layer(m, n, K, seed=K * 7 + m)
    params = QTIPCodeParams(K=K)
    ref = decode_weight(trellis, tlut, m, n, params)
    w = qtip_decode(trellis, tlut, m, n, K)
    assert torch.equal(w.float(), ref)


# ---------------------------------------------------------------------------
# GEMM and the whole linear against qtip_linear_forward
# ---------------------------------------------------------------------------


def _check_linear(m: int, n: int, K: int, dtype: torch.dtype, batches):
    trellis, tlut, SU, SV = random_layer(m, n, K, seed=m + n + K)
    had_in, had_out = factor(n), factor(m)
    params = QTIPCodeParams(K=K)
    rows = sum(batches)
    x = torch.randn(rows, n, device=DEVICE).to(dtype)
    # The reference is row-independent: one decode for all batch sizes.
    ref = qtip_linear_forward(
        x, trellis, SU, SV, tlut, params, had_in=had_in, had_out=had_out
    )
    start = 0
    for b in batches:
        y = qtip_matmul(x[start : start + b], trellis, tlut, SU, SV, had_in, had_out, K)
        assert y.shape == (b, m) and y.dtype == dtype
        err = rel_err(y, ref[start : start + b])
        assert err < TOL[dtype], f"batch {b}: relative error {err:.2e}"
        start += b


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16))
@pytest.mark.parametrize("m,n", SHAPES)
def test_linear_k2(m: int, n: int, dtype: torch.dtype):
    _check_linear(m, n, 2, dtype, BATCHES)


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16))
@pytest.mark.parametrize("K", (3, 4))
@pytest.mark.parametrize("m,n", ((4096, 4096), (576, 576), (1536, 576)))
def test_linear_k34(m: int, n: int, K: int, dtype: torch.dtype):
    # 1100 rows: on the dense path a GEMM with tiles of a few hundred rows
    # gives CTAs several tiles on 4096x4096 too.
    batches = (1, 3, 16, 33, 65, QTIP_DENSE_MIN_ROWS + 1, 1100)
    _check_linear(m, n, K, dtype, batches)


@pytest.mark.parametrize("m,n", ((4096, 11008), (11008, 4096), (4096, 14336)))
def test_linear_zero_rows(m: int, n: int):
    # An empty batch gives an empty output (the K = 172 transform's planning
    # divided by the row count).
    trellis, tlut, SU, SV = random_layer(m, n, 2, seed=5)
    x = torch.empty(0, n, device=DEVICE, dtype=torch.bfloat16)
    y = qtip_matmul(x, trellis, tlut, SU, SV, factor(n), factor(m), 2)
    assert y.shape == (0, m) and y.dtype == torch.bfloat16


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16))
def test_linear_own_input_wide_factor(dtype: torch.dtype):
    # Llama-3 down_proj (K=28 input factor, P=512): at one row the GEMM
    # transforms x itself, with more shared memory than its staging buffers;
    # from two rows the one-pass transform.
    _check_linear(4096, 14336, 2, dtype, (1, 2, 16))


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16))
def test_linear_dense_wide_factor(dtype: torch.dtype):
    # Llama-3 down_proj on the dense path: its K = 28 x 512 input transform
    # takes the one-pass kernel (H_K on the tensor cores).
    _check_linear(4096, 14336, 2, dtype, (QTIP_DENSE_MIN_ROWS, 300))


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16))
@pytest.mark.parametrize("m,n", ((4096, 11008), (2304, 6912), (6912, 2304)))
def test_linear_dense_k64_blocks(m: int, n: int, dtype: torch.dtype):
    # Hadamard blocks of K x 64 (K = 172, 108, 36) on the dense path; 600
    # rows give each persistent CTA of the one-pass kernels several row blocks.
    _check_linear(m, n, 2, dtype, (QTIP_DENSE_MIN_ROWS, 600))


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16))
@pytest.mark.parametrize(
    "m,n", ((1024, 11008), (2304, 6912), (6912, 2304), (11008, 1024))
)
def test_linear_fused_k64_blocks(
    m: int, n: int, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
):
    # K x 64 input and output blocks (K = 172, 108, 36) on the fused path
    # take the one-pass kernels from two rows (the output side adds the
    # split-K partials as it stages them); with the dense path moved up, 300
    # rows give the persistent CTAs several row blocks each.
    monkeypatch.setattr(qtip_ops, "QTIP_DENSE_MIN_ROWS", 1024)
    _check_linear(m, n, 2, dtype, (2, 7, 40, 127, 300))


@pytest.mark.parametrize("K", (2, 3, 4))
@pytest.mark.parametrize(
    "batch", (1, 5, 8, 9, 16, 17, 32, 40, 48, 57, 64, 65, 96, 97, 130)
)
# 1056 rows = 33 row tiles: the last work unit is partial.
@pytest.mark.parametrize("m,n", ((1024, 2048), (1056, 576)))
def test_gemm_vs_decoded(K: int, batch: int, m: int, n: int):
    # Every batch tiling (1, 2, 4, 6, 8 n8 tiles, several passes, partial
    # tiles) against the decoded weight, in fp32 (exact fp16 products, fp32
    # sums).
    trellis, tlut, _, _ = random_layer(m, n, K, seed=batch)
    x = torch.randn(batch, n, device=DEVICE).half()
    w = qtip_decode(trellis, tlut, m, n, K).float()
    y = qtip_gemm(x, trellis, tlut, m, K)
    assert y.dtype == torch.float32 and y.shape == (batch, m)
    assert rel_err(y, x.float() @ w.T) < 1e-5


def test_gemm_unaligned_input():
    # The GEMM stages x~ in 16-byte pieces: a view starting 2 bytes into its
    # storage is copied first, not read misaligned.
    m, n, K = 64, 576, 2
    trellis, tlut, _, _ = random_layer(m, n, K, seed=5)
    x = torch.randn(3 * n + 1, device=DEVICE).half()[1:].view(3, n)
    w = qtip_decode(trellis, tlut, m, n, K).float()
    assert rel_err(qtip_gemm(x, trellis, tlut, m, K), x.float() @ w.T) < 1e-5


def test_block_diagonal_linear():
    # A TP-split (rcp=2 style) layer: Hm block-diagonal with 8 blocks.
    m, n, K = 8 * 1664, 4096, 2  # 1664 = 52 * 32
    trellis, tlut, SU, SV = random_layer(m, n, K, seed=3)
    params = QTIPCodeParams(K=K)
    x = torch.randn(4, n, device=DEVICE).half()
    ref = qtip_linear_forward(x, trellis, SU, SV, tlut, params, rcp=2, tp_rank=8)
    y = qtip_matmul(
        x, trellis, tlut, SU, SV, None, factor(m // 8), K, out_blocks=[m // 8]
    )
    assert rel_err(y, ref) < TOL[torch.float16]


# 5 and 33 rows: a partial n8 tile (the GEMM stages only real rows, each
# from its own x~ row of n_full columns).
@pytest.mark.parametrize("batch", (1, 5, 16, 33, 64, QTIP_DENSE_MIN_ROWS))
@pytest.mark.parametrize(
    "n_full, rank, ranks",
    ((4096, 1, 2), (11008, 1, 4), (11008, 3, 4), (576, 0, 2)),
)
def test_linear_column_window(batch: int, n_full: int, rank: int, ranks: int):
    # A row-parallel rank's slice of a whole-matrix layer (gemm_cols): the
    # input transform spans all n_full features, W_hat only this rank's
    # columns; against the same steps as separate ops.
    m, K = 1024, 2
    n = n_full // ranks
    trellis, tlut, _, SV = random_layer(m, n, K, seed=batch)
    SU = torch.randn(n_full, device=DEVICE)
    had_in, had_out = factor(n_full), factor(m)
    x = torch.randn(batch, n_full, device=DEVICE).half()
    xh = qtip_hadamard(
        x, had_in, transpose=True, in_scale=SU, factor=1 / 32, out_dtype=torch.float16
    )
    w = qtip_decode(trellis, tlut, m, n, K).float()
    acc = xh[:, rank * n : (rank + 1) * n].float() @ w.T
    ref = qtip_hadamard(acc, had_out, out_scale=SV, factor=32.0)
    y = qtip_matmul(
        x, trellis, tlut, SU, SV, had_in, had_out, K, gemm_cols=(rank * n, n)
    )
    assert rel_err(y, ref) < TOL[torch.float16]


def _kernel_names(fn) -> set[str]:
    """Names of the CUDA kernels fn launches."""
    with torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CUDA]
    ) as prof:
        fn()
        torch.accelerator.synchronize()
    return {e.key for e in prof.key_averages()}


# Hopper's prefill GEMM, on 132 SMs: 128 rows (one x~ tile of 128, 48 row
# tiles of 128 W_hat rows, k split 2 ways), 300 (two x~ tiles of 256, the
# second partial) with a column window, three shards (a LUT refill per shard
# change) and 1000 rows (96 tile pairs on fewer clusters: several per CTA,
# across shards); too few tiles for the SMs split k 4 ways (fp32 partials),
# the last split shorter where its 86 steps do not split evenly; 96 rows,
# below QTIP_DENSE_MIN_ROWS, where its tiles fill the GPU; 64 and 60 rows,
# tiles of 64 x~ rows with two consumer pairs (the second's sums added in the
# epilogue), the latter across three shards; 56 rows of a 1024-row layer, k
# split 8 ways (each pair 4 steps of a split); 80 rows of Llama-2's gate/up,
# 172 tiles split 2 ways in 3 waves.
@pytest.mark.parametrize("K", (2, 3, 4))
@pytest.mark.parametrize(
    "shard_rows, batch, rank, n_full",
    (
        ([6144], QTIP_DENSE_MIN_ROWS, 0, 4096),
        ([6144], 300, 1, 4096),
        ([4096, 1024, 1024], 1000, 0, 4096),
        ([4096], QTIP_DENSE_MIN_ROWS, 0, 4096),
        ([2048], 300, 1, 4096),
        ([4096], QTIP_DENSE_MIN_ROWS, 1, 11008),
        ([4096], 96, 0, 4096),
        ([4096], 64, 0, 4096),
        ([4096, 1024, 1024], 60, 1, 4096),
        ([1024], 56, 0, 8192),
        ([11008, 11008], 80, 1, 8192),
    ),
)
def test_linear_prefill_gemm(
    shard_rows: list[int], batch: int, rank: int, n_full: int, K: int
):
    # Against the same steps as separate ops: the transforms, the decoded
    # W_hat (each shard's own codebook) and an fp32 product rounded to fp16.
    ranks = 2
    n, m = n_full // ranks, sum(shard_rows)
    shards = [random_layer(r, n, K, seed=K + i) for i, r in enumerate(shard_rows)]
    SU = torch.randn(len(shard_rows), n_full, device=DEVICE)
    SV = torch.cat([sv for _, _, _, sv in shards])
    had_in, had_out = factor(n_full), factor(shard_rows[0])
    x = torch.randn(batch, n_full, device=DEVICE).bfloat16()
    acc = []
    for (t, tl, _, _), r, su in zip(shards, shard_rows, SU):
        xh = qtip_hadamard(
            x,
            had_in,
            transpose=True,
            in_scale=su,
            factor=1 / 32,
            out_dtype=torch.float16,
        )
        w = qtip_decode(t, tl, r, n, K).float()
        acc.append((xh[:, rank * n : (rank + 1) * n].float() @ w.T).half())
    ref = torch.cat(
        [
            qtip_hadamard(a.float(), had_out, out_scale=sv, factor=32.0)
            for a, sv in zip(acc, SV.split(shard_rows))
        ],
        dim=1,
    )

    def run():
        return qtip_matmul(
            x,
            torch.cat([t for t, _, _, _ in shards]),
            torch.stack([tl for _, tl, _, _ in shards]),
            SU,
            SV,
            had_in,
            had_out,
            K,
            shard_rows=shard_rows,
            gemm_cols=(rank * n, n),
        )

    y = run()
    assert y.shape == (batch, m) and y.dtype == torch.bfloat16
    assert rel_err(y, ref) < TOL[torch.bfloat16]
    props = torch.cuda.get_device_properties(DEVICE)
    if (props.major, props.minor) == (9, 0):
        assert any("qtip_prefill_kernel" in k for k in _kernel_names(run)), (
            "the layer did not take the prefill GEMM"
        )


@pytest.mark.parametrize(
    "shard_rows, n, out_blocks",
    [
        ([4096, 1024, 1024], 4096, None),  # Llama-3 q/k/v (GQA)
        # Llama-2 q/k/v: at one row 8 warps share each row tile's k range.
        ([4096, 4096, 4096], 4096, None),
        ([11008, 11008], 4096, None),  # Llama-2 gate/up (K=172 output)
        ([1024, 1024], 11008, None),  # K=172 input, one x~ copy per shard
        ([512, 128, 128], 576, [64, 16, 16]),  # TP-split blocks per shard
        # 15 row tiles per shard (H_60 output): partial work units.
        ([480, 480], 576, None),
    ],
    ids=["qkv-gqa", "qkv", "gate-up", "k172-input", "blocks", "odd-tiles"],
)
@pytest.mark.parametrize("batch", [1, 16, 40, 100, QTIP_DENSE_MIN_ROWS, 600])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fused_layer_matches_its_shards(shard_rows, n, out_blocks, batch, dtype):
    # One call for all shards of a fused layer equals each shard's reference
    # forward, side by side. 600 rows: on the dense path a GEMM that walks
    # tiles of a few hundred rows gives each CTA several, across shards.
    K = 2
    blocks = shard_rows if out_blocks is None else out_blocks
    shards = [random_layer(m, n, K, seed=10 + i) for i, m in enumerate(shard_rows)]
    x = torch.randn(batch, n, device=DEVICE).to(dtype)
    had_in, had_out = factor(n), factor(blocks[0])
    params = QTIPCodeParams(K=K)
    ref = torch.cat(
        [
            qtip_linear_forward(
                x,
                t,
                su,
                sv,
                tl,
                params,
                rcp=0 if out_blocks is None else 2,
                tp_rank=8 if out_blocks is None else m // b,
                had_in=had_in,
                had_out=had_out,
            )
            for (t, tl, su, sv), m, b in zip(shards, shard_rows, blocks)
        ],
        dim=-1,
    )
    y = qtip_matmul(
        x,
        torch.cat([t for t, _, _, _ in shards]),
        torch.stack([tl for _, tl, _, _ in shards]),
        torch.stack([su for _, _, su, _ in shards]),
        torch.cat([sv for _, _, _, sv in shards]),
        had_in,
        had_out,
        K,
        out_blocks=blocks,
        shard_rows=shard_rows,
    )
    assert y.shape == (batch, sum(shard_rows)) and y.dtype == dtype
    assert rel_err(y, ref) < TOL[dtype]
    # Each shard on its own, too (no bleeding across shard boundaries).
    start = 0
    for (t, tl, su, sv), m, b in zip(shards, shard_rows, blocks):
        alone = qtip_matmul(x, t, tl, su, sv, had_in, had_out, K, out_blocks=[b])
        assert rel_err(y[:, start : start + m], alone) < TOL[dtype]
        start += m


# ---------------------------------------------------------------------------
# Hadamard transforms
# ---------------------------------------------------------------------------

HAD_SIZES = [k * 64 for k in HADAMARD_K_ORDER] + [
    8,
    64,
    4096,
    11008,
    14336,
    16384,
    28 * 2048,
]


@pytest.mark.parametrize("n", HAD_SIZES)
@pytest.mark.parametrize("transpose", (False, True))
def test_hadamard(n: int, transpose: bool):
    x = torch.randn(3, n, device=DEVICE)
    in_scale = torch.randn(n, device=DEVICE)
    out_scale = torch.randn(n, device=DEVICE)
    had = factor(n)
    ref = hadamard_transform(x * in_scale, transpose=transpose, had_k=had)
    ref = ref * 0.5 * out_scale
    y = qtip_hadamard(
        x,
        had,
        transpose=transpose,
        in_scale=in_scale,
        out_scale=out_scale,
        factor=0.5,
    )
    assert rel_err(y, ref) < 1e-5


@pytest.mark.parametrize("in_dtype", (torch.float16, torch.bfloat16, torch.float32))
@pytest.mark.parametrize("out_dtype", (torch.float16, torch.bfloat16, torch.float32))
def test_hadamard_dtypes(in_dtype: torch.dtype, out_dtype: torch.dtype):
    n = 5120
    x = torch.randn(7, n, device=DEVICE).to(in_dtype)
    ref = hadamard_transform(x.float(), had_k=factor(n))
    y = qtip_hadamard(x, factor(n), out_dtype=out_dtype)
    assert y.dtype == out_dtype
    tol = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 5e-3}
    assert rel_err(y, ref) < tol[out_dtype]


@pytest.mark.parametrize("n", (4096, 11008, 192))
def test_hadamard_sums_splits(n: int):
    # Split-K partial sums (splits, rows, n) are added in order on load; 192
    # (K=12, P=16) leaves lanes of a warp past the end of the block.
    parts = torch.randn(5, 3, n, device=DEVICE)
    SV = torch.rand(n, device=DEVICE)
    y = torch.ops._qtip_C.qtip_hadamard(
        parts, None, SV, factor(n), False, [n], [n], 32.0, torch.float32
    )
    ref = hadamard_transform(parts.sum(0), had_k=factor(n)) * SV * 32
    assert rel_err(y, ref) < 1e-5


@pytest.mark.parametrize("n", (11008, 14336, 192))
@pytest.mark.parametrize("rows", (1, 2, 5, 40))
def test_hadamard_partials_and_copies(n: int, rows: int):
    # Up to 32 rows (times copies) an H_K transform with K <= 32 (14336: 28,
    # 192: 12) takes two launches; more rows of K x 512 blocks (14336) the
    # one-pass kernel, with split-K partials too; K = 172 (11008) and 192 at
    # 40 rows qtip_hadamard_kernel, K = 172 at 1-2 rows on the output side
    # with 8 rows of H_K per thread block.
    op = torch.ops._qtip_C.qtip_hadamard
    had = factor(n)
    # Output side: split-K partial sums.
    parts = torch.randn(3, rows, n, device=DEVICE)
    SV = torch.rand(n, device=DEVICE)
    y = op(parts, None, SV, had, False, [n], [n], 32.0, torch.float32)
    ref = hadamard_transform(parts.sum(0), had_k=had) * SV * 32
    assert rel_err(y, ref) < 1e-5
    # Input side: one copy per row of SU (fused layers).
    x = torch.randn(rows, n, device=DEVICE, dtype=torch.bfloat16)
    SU = torch.randn(2, n, device=DEVICE).sign()
    y = op(x, SU, None, had, True, [n], [n], 1 / 32, torch.float16)
    ref = hadamard_transform(x.float() * SU[:, None], transpose=True, had_k=had)
    assert rel_err(y.float(), ref / 32) < 1e-3


def test_hadamard_more_row_blocks_than_sms():
    # Llama-2's gate/up output at 100 rows: two K = 172 segments are 200 row
    # blocks, more than an H100's or H200's SMs, each taken by one thread
    # block with all 172 rows of H_K; split-K partials added in order.
    n = 11008
    had = factor(n)
    parts = torch.randn(3, 100, 2 * n, device=DEVICE)
    SV = torch.rand(2 * n, device=DEVICE)
    y = torch.ops._qtip_C.qtip_hadamard(
        parts, None, SV, had, False, [n, n], [n, n], 32.0, torch.float32
    )
    ref = blockwise_hadamard(parts.sum(0), n, had)
    assert rel_err(y, ref * SV * 32) < 1e-5


@pytest.mark.parametrize(
    "n,block",
    (
        (8 * 6656, 6656),
        (4096, 512),
        (8 * 1536, 1536),
        # Narrow H_K blocks (172 x 8, 28 x 8): eight per thread block from
        # 8 rows on, one below.
        (8 * 1376, 1376),
        (8 * 224, 224),
    ),
)
@pytest.mark.parametrize("rows", (1, 300))
def test_hadamard_blocks(n: int, block: int, rows: int):
    x = torch.randn(rows, n, device=DEVICE)
    had = factor(block)
    ref = hadamard_transform(x, transpose=True, block_size=block, had_k=had)
    y = qtip_hadamard(x, had, transpose=True, block_size=block)
    assert rel_err(y, ref) < 1e-5
    # Split-K partial sums (the output side), two segments.
    parts = torch.randn(3, rows, 2 * n, device=DEVICE)
    y = torch.ops._qtip_C.qtip_hadamard(
        parts, None, None, had, False, [block, block], [n, n], 1.0, torch.float32
    )
    ref = hadamard_transform(parts.sum(0), block_size=block, had_k=had)
    assert rel_err(y, ref) < 1e-5


@pytest.mark.parametrize(
    "blocks,block,rows",
    (
        # Grouped narrow H_K blocks with a shorter last thread block: the
        # 8-row x 2-column register tiles, all 172 rows of H_K per block;
        (9, 1376, 64),
        # the two-launch path with two column splits of each block, register
        # tiles (K = 12) and k-split sums (K = 28).
        (9, 192, 16),
        (9, 448, 16),
    ),
)
def test_hadamard_grouped_blocks(blocks: int, block: int, rows: int):
    n = blocks * block
    had = factor(block)

    def ref(v: torch.Tensor, transpose: bool) -> torch.Tensor:
        out = hadamard_transform(v.reshape(-1, block), transpose, had_k=had)
        return out.reshape(v.shape)

    x = torch.randn(rows, n, device=DEVICE)
    y = qtip_hadamard(x, had, transpose=True, block_size=block)
    assert rel_err(y, ref(x, True)) < 1e-5
    parts = torch.randn(3, rows, n, device=DEVICE)
    y = torch.ops._qtip_C.qtip_hadamard(
        parts, None, None, had, False, [block], [n], 1.0, torch.float32
    )
    assert rel_err(y, ref(parts.sum(0), False)) < 1e-5


@pytest.mark.parametrize("rows", (64, 300))
@pytest.mark.parametrize("in_dtype", (torch.float16, torch.bfloat16, torch.float32))
@pytest.mark.parametrize("out_dtype", (torch.float16, torch.bfloat16, torch.float32))
def test_hadamard_4096_blocks(rows: int, in_dtype: torch.dtype, out_dtype: torch.dtype):
    # Blocks of 4096 columns with K = 1, no split-K partials and from 49 rows
    # (or 128 copies x rows) on take the radix-16 kernel: two blocks per row,
    # with and without scales, one copy per row of SU, two segments.
    n = 8192
    op = torch.ops._qtip_C.qtip_hadamard
    x = torch.randn(rows, n, device=DEVICE).to(in_dtype)
    SU = torch.randn(2, n, device=DEVICE).sign()
    SV = torch.rand(n, device=DEVICE)
    tol = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 5e-3}[out_dtype]

    def ref(v: torch.Tensor) -> torch.Tensor:
        return hadamard_transform(v, block_size=4096)

    y = op(x, SU, SV, None, True, [4096], [n], 0.5, out_dtype)
    assert rel_err(y.float(), ref(x.float() * SU[:, None]) * SV * 0.5) < tol
    y = op(x, None, None, None, False, [4096, 4096], [4096, 4096], 0.5, out_dtype)
    assert rel_err(y.float(), ref(x.float()) * 0.5) < tol
    # The same bits as qtip_hadamard_kernel (a zero second split-K partial
    # sends the call there).
    xf = x.float()
    parts = torch.stack([xf, torch.zeros_like(xf)])
    args = (SU, SV, None, False, [4096], [n], 0.5, out_dtype)
    assert torch.equal(op(xf, *args), op(parts, *args))


@pytest.mark.parametrize("K", (12, 20, 28))
@pytest.mark.parametrize("rows", (64, 300))
@pytest.mark.parametrize("in_dtype", (torch.bfloat16, torch.float32))
@pytest.mark.parametrize("out_dtype", (torch.float16, torch.float32))
def test_hadamard_k512_blocks(
    K: int, rows: int, in_dtype: torch.dtype, out_dtype: torch.dtype
):
    # Blocks of K x 512 columns with K <= 32 from 33 rows (copies x rows) on
    # take the one-pass kernel with H_K on the tensor cores: both directions,
    # two blocks per row, with and without scales, one copy per row of SU,
    # two segments (a fused gate/up output), split-K partials.
    block = K * 512
    n = 2 * block
    had = factor(block)
    op = torch.ops._qtip_C.qtip_hadamard
    x = torch.randn(rows, n, device=DEVICE).to(in_dtype)
    SU = torch.randn(2, n, device=DEVICE).sign()
    SV = torch.rand(n, device=DEVICE)
    tol = {torch.float32: 1e-5, torch.float16: 1e-3}[out_dtype]

    def ref(v: torch.Tensor, transpose: bool) -> torch.Tensor:
        return hadamard_transform(v, transpose, block_size=block, had_k=had)

    y = op(x, SU, SV, had, True, [block], [n], 0.5, out_dtype)
    assert rel_err(y.float(), ref(x.float() * SU[:, None], True) * SV * 0.5) < tol
    y = op(x, None, None, had, False, [block] * 2, [block] * 2, 0.5, out_dtype)
    assert rel_err(y.float(), ref(x.float(), False) * 0.5) < tol
    # Split-K partial sums over two segments, added in split order.
    parts = torch.randn(3, rows, n, device=DEVICE)
    args = (None, None, had, False, [block] * 2, [block] * 2, 0.5, out_dtype)
    y = op(parts, *args)
    assert rel_err(y.float(), ref(parts.sum(0), False) * 0.5) < tol
    assert torch.equal(y, op((parts[0] + parts[1]) + parts[2], *args))


@pytest.mark.parametrize("K", (36, 108, 172))
@pytest.mark.parametrize("out_dtype", (torch.float16, torch.bfloat16, torch.float32))
def test_hadamard_k64_blocks(K: int, out_dtype: torch.dtype):
    # fp16 blocks of K x 64 columns with 32 < K <= 176, no input scale and
    # from 128 rows on (the dense path's output side) take the one-pass kernel
    # with H_K first on fp16 tensor cores: both directions, with and without
    # SV, two segments of two and three blocks, more row blocks than SMs
    # (persistent CTAs, whose items change block: SV is reloaded); 127 rows
    # take qtip_hadamard_kernel, 128 the kernel.
    block = K * 64
    n = 5 * block
    had = factor(block)
    op = torch.ops._qtip_C.qtip_hadamard
    SV = torch.rand(n, device=DEVICE)
    tol = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 5e-3}[out_dtype]
    segments = [2 * block, 3 * block]
    for rows in (127, 128, 300):
        x = torch.randn(rows, n, device=DEVICE).half()
        for transpose in (False, True):
            # 5 blocks of K x 64: not a Hadamard size of the reference's own.
            ref = blockwise_hadamard(x.float(), block, had, transpose)
            y = op(x, None, SV, had, transpose, [block] * 2, segments, 0.5, out_dtype)
            assert y.dtype == out_dtype
            assert rel_err(y.float(), ref * SV * 0.5) < tol
        y = op(x, None, None, had, False, [block] * 2, segments, 2.0, out_dtype)
        ref = blockwise_hadamard(x.float(), block, had)
        assert rel_err(y.float(), ref * 2.0) < tol


@pytest.mark.parametrize("rows", (1, 300))
def test_hadamard_small_blocks(rows: int):
    # 172 power-of-two blocks of 64 (the Sylvester half of the dense path's
    # K = 172 transform): several blocks per CTA, a shorter last CTA.
    n, block = 172 * 64, 64
    x = torch.randn(rows, n, device=DEVICE)
    in_scale = torch.randn(n, device=DEVICE)
    ref = hadamard_transform((x * in_scale).reshape(-1, block))
    y = qtip_hadamard(x, None, block_size=block, in_scale=in_scale)
    assert rel_err(y, ref.reshape(rows, n)) < 1e-5


# ---------------------------------------------------------------------------
# Op registration, torch.compile, CUDA graphs
# ---------------------------------------------------------------------------


def _small_layer(K: int = 2):
    m, n = 96, 576
    trellis, tlut, SU, SV = random_layer(m, n, K, seed=11)
    return m, n, trellis.view(m // 32, n // 32, 64 * K), tlut, SU, SV


def test_opcheck():
    m, n, trellis, tlut, SU, SV = _small_layer()
    x16 = torch.randn(5, n, device=DEVICE).half()
    ops = torch.ops._qtip_C
    torch.library.opcheck(ops.qtip_gemm.default, (x16, trellis, tlut, [m]))
    torch.library.opcheck(ops.qtip_decode.default, (trellis, tlut, [m]))
    torch.library.opcheck(
        ops.qtip_hadamard.default,
        (x16, SU, None, factor(n), True, [n], [n], 1 / 32, torch.float16),
    )
    # Two shards: one input copy per SU row; output segments with own blocks.
    SU2 = torch.stack([SU, -SU])
    torch.library.opcheck(
        ops.qtip_hadamard.default,
        (x16, SU2, None, factor(n), True, [n], [n], 1 / 32, torch.float16),
    )
    torch.library.opcheck(
        ops.qtip_hadamard.default,
        (x16.float(), None, None, None, False, [64, 16], [512, 64], 1.0, torch.half),
    )
    trellis2 = torch.cat([trellis, trellis.flip(0)])
    tlut2 = torch.stack([tlut, tlut.flip(0)])
    torch.library.opcheck(
        ops.qtip_gemm.default,
        (torch.stack([x16, -x16]), trellis2, tlut2, [m, m]),
    )
    torch.library.opcheck(ops.qtip_decode.default, (trellis2, tlut2, [m, m]))
    # Batch 1 on a layer with power-of-two transforms (no H_K factors).
    m8, n8 = 64, 512
    t8, l8, su8, sv8 = random_layer(m8, n8, 2, seed=12)
    t8 = t8.view(m8 // 32, n8 // 32, 128)
    cases = [
        (x16, trellis, tlut[None], SU[None], SV, factor(n), factor(m), n, [m], [m]),
        (
            x16,
            trellis2,
            tlut2,
            SU2,
            torch.cat([SV, SV]),
            factor(n),
            factor(m),
            n,
            [m, m],
            [m, m],
        ),
        (
            torch.randn(1, n8, device=DEVICE).half(),
            t8,
            l8[None],
            su8[None],
            sv8,
            None,
            None,
            n8,
            [m8],
            [m8],
        ),
    ]
    for dtype in (torch.float16, torch.bfloat16):
        for x, *rest in cases:
            for dense_min_rows in (64, 1):
                torch.library.opcheck(
                    ops.qtip_linear.default, (x.to(dtype), *rest, dense_min_rows)
                )


@pytest.mark.parametrize("layer", ("small", "k172-input"))
def test_cuda_graph(layer: str):
    if layer == "small":
        K, rows = 3, 4
        m, n, trellis, tlut, SU, SV = _small_layer(K)
    else:  # Llama-2's down_proj: the one-pass K x 64 input kernel
        K, rows, m, n = 2, 8, 1024, 11008
        trellis, tlut, SU, SV = random_layer(m, n, K, seed=7)
    had_in, had_out = factor(n), factor(m)
    x = torch.randn(rows, n, device=DEVICE).half()

    def fwd(inp):
        return qtip_matmul(inp, trellis, tlut, SU, SV, had_in, had_out, K)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fwd(x)  # warm-up outside capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = fwd(x)
    for _ in range(2):
        x.copy_(torch.randn_like(x))
        graph.replay()
        # Fixed-order split-K reduction: the replay gives the eager bits.
        assert torch.equal(y, fwd(x))


@pytest.mark.parametrize(
    "shard_rows, n, batch",
    [
        ([11008, 11008], 4096, batch)
        for batch in (1, 7, 16, 40, 64, 100, 2 * QTIP_DENSE_MIN_ROWS)
    ]
    + [
        ([4096], 11008, 1),
        ([4096], 11008, 16),
        ([4096], 4096, 64),
        ([4096], 4096, 96),
        ([4096], 4096, 2 * QTIP_DENSE_MIN_ROWS),
    ],
)
def test_deterministic(shard_rows: list[int], n: int, batch: int):
    # Same input, same bits, on every run (no atomics anywhere): a fused
    # gate/up layer with the K=172 output factor, split over the SMs, and a
    # down_proj whose K=172 input factor the GEMM applies itself at one row
    # (split k sums) and the one-pass input kernel at 16.
    K = 2
    m = sum(shard_rows)
    trellis, _, _, _ = random_layer(m, n, K, seed=21)
    g = torch.Generator(device=DEVICE).manual_seed(22)
    tlut = torch.randn(len(shard_rows), 512, 2, generator=g, device=DEVICE).half()
    SU = torch.randn(len(shard_rows), n, generator=g, device=DEVICE)
    SV = torch.rand(m, generator=g, device=DEVICE) * 0.01
    x = torch.randn(batch, n, generator=g, device=DEVICE).bfloat16()
    args = (x, trellis, tlut, SU, SV, factor(n), factor(shard_rows[0]), K)
    first = qtip_matmul(*args, shard_rows=shard_rows)
    for _ in range(9):
        assert torch.equal(qtip_matmul(*args, shard_rows=shard_rows), first)


def test_torch_compile():
    m, n, trellis, tlut, SU, SV = _small_layer(4)
    had_in, had_out = factor(n), factor(m)

    def fwd(inp):
        return qtip_matmul(inp, trellis, tlut, SU, SV, had_in, had_out, 4) * 2

    compiled = torch.compile(fwd, fullgraph=True, dynamic=True)
    for rows in (3, 2 * QTIP_DENSE_MIN_ROWS):
        x = torch.randn(rows, n, device=DEVICE).bfloat16()
        assert torch.equal(compiled(x), fwd(x))


# ---------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------


def test_bad_inputs():
    m, n, trellis, tlut, SU, SV = _small_layer()
    x = torch.randn(2, n, device=DEVICE).half()
    flat = trellis.reshape(-1)

    def call(**kw):
        args = dict(
            x=x, trellis=flat, tlut=tlut, SU=SU, SV=SV, had_in=factor(n),
            had_out=factor(m), K=2,
        )  # fmt: skip
        args.update(kw)
        return qtip_matmul(**args)

    with pytest.raises(ValueError, match="x must be float16 or bfloat16"):
        call(x=x.float())
    with pytest.raises(ValueError, match="expected n = SU.shape"):
        call(x=x[:, :64].contiguous())
    with pytest.raises(ValueError, match="trellis has shape"):
        call(trellis=flat[:-16])
    with pytest.raises(ValueError, match="K in"):
        call(K=5)
    with pytest.raises(ValueError, match="tlut must be float16"):
        call(tlut=tlut.float())
    with pytest.raises(ValueError, match="SU must be float32"):
        call(SU=SU.half())
    with pytest.raises(ValueError, match="had_in must be a float32"):
        call(had_in=torch.ones(3, 4, device=DEVICE))
    with pytest.raises(ValueError, match="shard_rows"):
        call(shard_rows=[64, 32])
    ops = torch.ops._qtip_C
    with pytest.raises(RuntimeError, match="x must be float16"):
        ops.qtip_gemm(x.float(), trellis, tlut, [m])
    with pytest.raises(RuntimeError, match="trellis must be int16"):
        ops.qtip_decode(trellis.int(), tlut, [m])
    with pytest.raises(RuntimeError, match="tlut must have shape"):
        ops.qtip_decode(trellis, tlut[:256], [m])
    with pytest.raises(RuntimeError, match="shard_rows .* sum to 64"):
        ops.qtip_gemm(x, trellis, tlut, [32, 32])
    with pytest.raises(RuntimeError, match="multiple of 32"):
        ops.qtip_decode(trellis, tlut[None].expand(2, -1, -1).contiguous(), [80, 16])
    with pytest.raises(RuntimeError, match="x must have shape \\(2, B, n\\)"):
        ops.qtip_gemm(x, trellis, torch.stack([tlut, tlut]), [64, 32])
    with pytest.raises(RuntimeError, match="block_size=100 must divide"):
        ops.qtip_hadamard(x, None, None, None, False, [100], [n], 1.0, torch.half)
    with pytest.raises(RuntimeError, match="must be a power of two"):
        ops.qtip_hadamard(x, None, None, None, False, [n], [n], 1.0, torch.half)
    with pytest.raises(RuntimeError, match="segment_sizes .* sum to 512"):
        ops.qtip_hadamard(x, None, None, None, False, [64], [512], 1.0, torch.half)
    with pytest.raises(RuntimeError, match="in_scale must have shape"):
        ops.qtip_hadamard(x, SU[:64], None, factor(n), False, [n], [n], 1.0, torch.half)
    # The whole-layer op, on the fused (64) and the dense (1) path.
    layer = (x, trellis, tlut[None], SU[None], SV)
    for dense_min_rows in (64, 1):
        bad = torch.ones(3, 4, device=DEVICE)
        with pytest.raises(RuntimeError, match="had_in.*must be square"):
            ops.qtip_linear(*layer, bad, factor(m), n, [m], [m], dense_min_rows)
    with pytest.raises(RuntimeError, match="block size 64 is not a multiple"):
        ops.qtip_linear(*layer, factor(n), factor(m), 64, [m], [m], 1)
