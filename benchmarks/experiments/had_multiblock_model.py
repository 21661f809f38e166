# SPDX-License-Identifier: Apache-2.0
"""Numpy model of `exp/had-multiblock`: `qtip_hadamard`'s host plan for H_K
transforms (K > 1) with narrow blocks grouped per thread block (kHadHkMinCols,
from kHadHkGroupMinRows rows on), and the kernel's H_K step index math
(`col_base`, both the 8 x 2 register-tile path and the k-split path, and the
presummed load of the two-launch path), on an H200 (132 SMs, 227 KiB of
shared memory per block). An independent thread-level emulator (fourteenth
session's review, 39,672 layouts incl. splits, copies, transpose and the first
launch, shared memory filled with NaN) agreed.

For every layout it checks, per row: each output written exactly once, equal
to H_K applied to its block's (K, P) values (as float64 sums, so only the
index math is tested), reads only inside the thread block's columns, and the
host's thread count and shared memory cover what the kernel indexes.
Run: python3 had_multiblock_model.py (prints the plans, asserts)."""

import numpy as np

SMS, SMEM = 132, 232448
MAX_THREADS, MIN_CTA_COLS, MAX_ROW_CHUNKS = 1024, 2048, 4
TWO_MAX_ROWS, TWO_MAX_K, SYL_CTA_COLS, HK_MIN_COLS = 32, 32, 512, 64
GROUP_MIN_ROWS = 8


def plan(segments, K, rows, copies=1):
    """segments: [(len, block)]; the host code of qtip_hadamard (K > 1)."""
    fits = (K * HK_MIN_COLS + 8 * K) * 4 <= SMEM
    hk_target = K * HK_MIN_COLS if copies * rows >= GROUP_MIN_ROWS and fits else 0
    segs, max_cols, min_P = [], 0, 1 << 30
    for length, b in segments:
        target = max(b, hk_target)
        cta_cols = min(length // b, (target + b - 1) // b) * b
        segs.append((length, b, b // K, cta_cols))
        max_cols, min_P = max(max_cols, cta_cols), min(min_P, b // K)
    ctas_per_row = sum((seg[0] + seg[3] - 1) // seg[3] for seg in segs)
    two = K <= TWO_MAX_K and copies * rows <= TWO_MAX_ROWS
    row_blocks = copies * rows * ctas_per_row
    rchunk = 32
    if K > 32 and row_blocks <= SMS and not two:
        cap = MAX_ROW_CHUNKS if row_blocks >= 8 else SMS
        chunks = min(max(SMS // row_blocks, 1), cap)
        fat = ((K + chunks - 1) // chunks + 7) // 8 * 8
        if fat > rchunk and (max_cols + K * fat) * 4 <= SMEM:
            rchunk = fat
    while rchunk > 8 and (max_cols + K * rchunk) * 4 > SMEM:
        rchunk //= 2
    smem = (max_cols + K * rchunk) * 4
    assert smem <= SMEM
    base = row_blocks * ((K + rchunk - 1) // rchunk)
    want = 1 if rchunk > 32 else (2 * SMS + base - 1) // base
    p_splits = min(max(want, 1), max(1, min_P // (8 if two else 32)))
    while p_splits & (p_splits - 1):
        p_splits &= p_splits - 1
    max_P = max_cols // K
    items = (rchunk // 8) * ((max_P + p_splits - 1) // p_splits)
    ksplit = 1
    while (
        items * ksplit * 2 <= MAX_THREADS
        and ksplit * 2 * 8 <= K
        and smem + ksplit * 2 * items * 8 * 4 <= SMEM
    ):
        ksplit *= 2
    loads = K * (max_P // p_splits) // 4 if two else max_cols // 8
    work = max(loads, items * ksplit)
    threads = min(max((work + 31) // 32 * 32, 64), MAX_THREADS)
    smem += (ksplit - 1) * items * 8 * 4
    return dict(
        segs=segs, rchunk=rchunk, p_splits=p_splits, ksplit=ksplit,
        threads=threads, smem=smem, two=two, ctas_per_row=ctas_per_row,
    )  # fmt: skip


def run_row(p, K, H, xrow):
    """One row through every thread block of the kernel's H_K step."""
    y = np.full(xrow.shape, np.nan)
    written = np.zeros(xrow.shape, int)
    col = 0
    for length, bsize, P, cta_cols in p["segs"]:
        for seg_off in range(0, length, cta_cols):
            b = min(cta_cols, length - seg_off)
            X = xrow[col + seg_off : col + seg_off + b]
            nq = b // (K * P)
            assert nq * K * P == b
            for by in range(((K + p["rchunk"] - 1) // p["rchunk"]) * p["p_splits"]):
                r0 = (by // p["p_splits"]) * p["rchunk"]
                ps = by % p["p_splits"]
                p_lo = ps * P // p["p_splits"]
                plen = (ps + 1) * P // p["p_splits"] - p_lo
                clen = plen * nq

                def col_base(c, plen=plen, p_lo=p_lo, P=P):
                    return (c // plen) * (K * P) + p_lo + c % plen

                if p["two"]:  # presummed load: the columns this block reads
                    quads = clen // 4
                    offs = [
                        (i // quads) * P + col_base((i % quads) * 4) + d
                        for i in range(K * quads)
                        for d in range(4)
                    ]
                    assert min(offs) >= 0 and max(offs) < b
                items = (p["rchunk"] // 8) * clen
                if p["ksplit"] == 1:
                    pairs = clen // 2
                    outs = [
                        (r0 + (it // pairs) * 8, (it % pairs) * 2 + d)
                        for it in range((p["rchunk"] // 8) * pairs)
                        for d in (0, 1)
                    ]
                else:
                    assert items * p["ksplit"] <= p["threads"]
                    outs = [(r0 + (it // clen) * 8, it % clen) for it in range(items)]
                for rs, c in outs:
                    if rs >= K:
                        continue
                    xc = col_base(c) + P * np.arange(K)
                    assert xc.max() < b
                    for j in range(8):
                        if rs + j >= K:
                            break
                        idx = col_base(c) + (rs + j) * P
                        y[col + seg_off + idx] = H[rs + j] @ X[xc]
                        written[col + seg_off + idx] += 1
        col += length
    return y, written


def reference(segments, K, H, xrow):
    out, col = [], 0
    for length, b in segments:
        P = b // K
        blocks = xrow[col : col + length].reshape(-1, K, P)
        out.append(np.einsum("rk,bkp->brp", H, blocks).reshape(-1))
        col += length
    return np.concatenate(out)


rng = np.random.default_rng(0)
layouts = [
    ("split_for_tp Llama-2-7B 11008 / 8", [(11008, 1376)], 172),
    ("split_for_tp gate_up (two shards)", [(11008, 1376), (11008, 1376)], 172),
    ("Llama-3 14336 / 8 (P = 64)", [(14336, 1792)], 28),
    ("405B 53248 / 8 (P = 128)", [(53248, 6656)], 52),
    ("K = 28, P = 8, 5 blocks (partial group)", [(5 * 224, 224)], 28),
    ("K = 12, P = 16 and 32 segments", [(12 * 16 * 7, 192), (12 * 32 * 3, 384)], 12),
    ("K = 172 whole matrix (P = 64)", [(11008, 11008)], 172),
    ("K = 20, P = 8, 40 blocks", [(20 * 8 * 40, 160)], 20),
]  # fmt: skip
for name, segments, K in layouts:
    H = rng.standard_normal((K, K))
    n = sum(length for length, _ in segments)
    for rows in (1, 2, 8, 16, 32, 64, 300):
        p = plan(segments, K, rows)
        xrow = rng.standard_normal(n)
        y, written = run_row(p, K, H, xrow)
        assert (written == 1).all(), (name, rows, np.unique(written))
        assert np.allclose(y, reference(segments, K, H, xrow)), (name, rows)
        if rows in (1, 16, 64):
            groups = [f"{seg[3] // seg[1]}" for seg in p["segs"]]
            print(
                f"{name:<42} rows {rows:<4} blocks/CTA {','.join(groups):<6} "
                f"CTAs/row {p['ctas_per_row']:<3} rchunk {p['rchunk']:<3} "
                f"p_splits {p['p_splits']} ksplit {p['ksplit']:<2} "
                f"threads {p['threads']:<5} smem {p['smem']:<6} two {p['two']}"
            )
print("all layouts: every output once, equal to the block-wise H_K product")
