# SPDX-License-Identifier: Apache-2.0
"""numpy model of exp/epilogue-hadamard's index math.

It mirrors the kernels: the GEMM epilogue's in-group Sylvester stages on each
split's partials, then the output transform's H_K (x) H_q step with no
Sylvester part, against the whole block Hadamard of the split sum.

Run: python3 benchmarks/experiments/epilogue_model.py
"""

import numpy as np

GROUP_BITS = 9  # a GEMM row group: 16 warps x 32 rows


def sylvester(n: int) -> np.ndarray:
    h = np.ones((1, 1))
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h


def split_output(out_blocks, shard_rows, k0):
    """qtip_linear.cpp's split_output_hadamard: (q, pre_bits), or (0, [])."""
    group_rows = 1 << GROUP_BITS
    q = max(b // k0 // min(b // k0, group_rows) for b in out_blocks)
    bits = []
    for b, rows in zip(out_blocks, shard_rows):
        inner = b // k0 // q
        tail = rows % group_rows
        if inner < 8 or (tail and tail % inner):
            return 0, []
        bits.append(inner.bit_length() - 1)
    return q, bits


def epilogue(part, shard_rows, bits):
    """qtip_mma_kernel's epilogue: per split, row group and batch row."""
    out = part.copy()
    r0 = 0
    for s, rows in enumerate(shard_rows):
        for g0 in range(0, rows, 1 << GROUP_BITS):
            nr = min(1 << GROUP_BITS, rows - g0)
            v = np.zeros(part.shape[:2] + (1 << GROUP_BITS,))
            v[..., :nr] = part[..., r0 + g0 : r0 + g0 + nr]
            for bit in range(bits[s]):
                for j in range(1 << (GROUP_BITS - 1)):
                    lo = ((j >> bit) << (bit + 1)) | (j & ((1 << bit) - 1))
                    hi = lo + (1 << bit)
                    a, b = v[..., lo].copy(), v[..., hi].copy()
                    v[..., lo], v[..., hi] = a + b, a - b
            out[..., r0 + g0 : r0 + g0 + nr] = v[..., :nr]
        r0 += rows
    return out


def transform_pre(part, had, k0, q, out_blocks, shard_rows, sv, factor):
    """qtip_hadamard_kernel with pre: H_K0 (x) H_q on the (K0 q, P') view."""
    q_log2 = q.bit_length() - 1
    k = k0 * q
    m = np.empty((k, k))
    for r in range(k):
        for c in range(k):
            h = 1.0 if had is None else had[r >> q_log2, c >> q_log2]
            m[r, c] = -h if bin(r & c & (q - 1)).count("1") & 1 else h
    x = part.sum(0)
    y = np.zeros_like(x)
    col = 0
    for b, rows in zip(out_blocks, shard_rows):
        for blk in range(col, col + rows, b):
            xb = x[:, blk : blk + b].reshape(-1, k, b // k)
            yb = np.einsum("rk,nkp->nrp", m, xb).reshape(-1, b)
            y[:, blk : blk + b] = yb * factor / np.sqrt(b) * sv[blk : blk + b]
        col += rows
    return y


def reference(part, had, k0, out_blocks, shard_rows, sv, factor):
    x = part.sum(0)
    y = np.zeros_like(x)
    col = 0
    for b, rows in zip(out_blocks, shard_rows):
        h = np.kron(np.ones((1, 1)) if had is None else had, sylvester(b // k0))
        for blk in range(col, col + rows, b):
            yb = x[:, blk : blk + b] @ h.T
            y[:, blk : blk + b] = yb * factor / np.sqrt(b) * sv[blk : blk + b]
        col += rows
    return y


def main() -> None:
    rng = np.random.default_rng(0)
    # (out_blocks, shard_rows, K0): 4096, Llama-3 qkv, K=12 with a half group,
    # TP-split blocks, K=28 (14336), K=20 with P=64, a 512-row shard.
    cases = [
        ([4096], [4096], 1),
        ([4096, 1024, 1024], [4096, 1024, 1024], 1),
        ([768, 768], [2304, 1536], 12),
        ([2048], [4096], 1),
        ([14336], [14336], 28),
        ([1280], [5120], 20),
        ([256], [512], 1),
    ]
    for blocks, rows, k0 in cases:
        had = rng.choice([-1.0, 1.0], size=(k0, k0)) if k0 > 1 else None
        part = rng.standard_normal((3, 2, sum(rows)))
        sv = rng.standard_normal(sum(rows))
        q, bits = split_output(blocks, rows, k0)
        assert bits, (blocks, rows, k0)
        ref = reference(part, had, k0, blocks, rows, sv, 32.0)
        got = transform_pre(
            epilogue(part, rows, bits), had, k0, q, blocks, rows, sv, 32.0
        )
        err = np.abs(got - ref).max() / np.abs(ref).max()
        print(
            f"blocks {blocks} rows {rows} K0 {k0}: q {q} pre_bits {bits}, "
            f"max rel. error {err:.1e}"
        )
        assert err < 1e-12


if __name__ == "__main__":
    main()
