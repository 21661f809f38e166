# SPDX-License-Identifier: Apache-2.0
# ruff: noqa: E501, E741, UP031, SIM115
# Review models of prefill-rs.patch (twenty-second session, CPU only).
# Index-level model of qtip_prefill_kernel (fixed walk): decode_half -> register A
# fragments (PTX wgmma m64nNk16 A layout == mma.m16n8k16 A), x~ staged with the
# producer's swizzled cp.async addresses, B read through the sw128 K-major
# descriptor (start + 32 kk), D fragment -> epilogue addressing. Compared with a
# reference built straight from the header's trellis spec.
import random

import numpy as np
from decode_model import M, decode_half

rng = np.random.default_rng(0)
random.seed(0)


def entry_of_state(s):
    v = (s * s + s) & M
    return ((v << 1) & 0x1FF80) >> 7


def run(K, shard_rows, n, rows, col0, ld):
    m = sum(shard_rows)
    shards = len(shard_rows)
    nblk = n // 32
    steps = n // 64
    tr = rng.integers(0, 256, size=(m // 32) * nblk * 128 * K, dtype=np.uint8)
    tlut = rng.integers(-8, 8, size=(shards, 512, 2)).astype(np.float64)
    xt = rng.integers(-4, 5, size=(shards, rows, ld)).astype(np.float64)
    rb0 = np.cumsum([0] + [r // 32 for r in shard_rows])

    def shard_of_rb(rb):
        return int(np.searchsorted(rb0, rb, side="right") - 1)

    def lutval(sh, e):
        a, b = tlut[sh][e & 511]
        return (-a if e >= 512 else a), b

    # ---- reference W_hat from the header's spec ----
    W = np.zeros((m, n))
    for bi in range(m // 32):
        sh = shard_of_rb(bi)
        for bj in range(nblk):
            base = (bi * nblk + bj) * 128 * K
            for mr in range(2):
                for kc in range(2):
                    segs = [
                        int.from_bytes(
                            tr[
                                base + l * 4 * K + (kc * 2 + mr) * K : base
                                + l * 4 * K
                                + (kc * 2 + mr + 1) * K
                            ].tobytes(),
                            "little",
                        )
                        for l in range(32)
                    ]
                    bits = "".join(format(s, "0%db" % (8 * K)) for s in segs)
                    L = len(bits)
                    for l in range(32):
                        g, q = l // 4, l % 4
                        for j in range(4):
                            st = 2 * K * (4 * l + j)
                            win = int("".join(bits[(st + b) % L] for b in range(16)), 2)
                            w0, w1 = lutval(sh, entry_of_state(win))
                            r = 32 * bi + 16 * mr + g + 8 * (j & 1)
                            c = 32 * bj + 16 * kc + 2 * q + 8 * (j >> 1)
                            W[r, c] = w0
                            W[r, c + 1] = w1
    ref = np.zeros((rows, m))
    for bi in range(m // 32):
        sh = shard_of_rb(bi)
        ref[:, 32 * bi : 32 * bi + 32] = (
            xt[sh][:, col0 : col0 + n] @ W[32 * bi : 32 * bi + 32].T
        )
    # ---- kernel model ----
    out = np.full((rows, m), np.nan)
    col_tiles = m // 128
    tiles = (rows + 255) // 256 * col_tiles
    for t in range(tiles):
        tt = t // col_tiles
        row0 = (t - tt * col_tiles) * 128
        xrow0 = tt * 256
        shard = shard_of_rb(row0 // 32)
        acc = np.zeros((2, 4, 32, 128))  # [wg][w4][lane][i]
        for step in range(steps):
            # producer: stage bytes (halves) with swizzle
            smem = np.zeros(16384)
            for lane in range(32):
                c = lane & 7
                for i in range(64):
                    r = (lane >> 3) + 4 * i
                    row = xrow0 + r
                    a = r * 128 + ((c ^ (r & 7)) << 4)
                    if row < rows:
                        smem[a // 2 : a // 2 + 8] = xt[shard][
                            row, col0 + step * 64 + c * 8 : col0 + step * 64 + c * 8 + 8
                        ]
                    else:
                        smem[a // 2 : a // 2 + 8] = 0
            # consumers: decode A
            for wg in range(2):
                Areg = {}
                for w4 in range(4):
                    rb = 2 * wg + (w4 >> 1)
                    mr = w4 & 1
                    for cb in range(2):
                        off = ((row0 // 32 + rb) * nblk + step * 2 + cb) * 128 * K
                        Wd = [
                            [
                                int.from_bytes(
                                    tr[
                                        off + l * 4 * K + 4 * k : off
                                        + l * 4 * K
                                        + 4 * k
                                        + 4
                                    ].tobytes(),
                                    "little",
                                )
                                for k in range(K)
                            ]
                            for l in range(32)
                        ]
                        ent = decode_half(K, Wd, mr, lambda s, _: entry_of_state(s))
                        for kc in range(2):
                            Areg[(w4, 2 * cb + kc)] = [
                                [lutval(shard, ent[l][kc][j]) for j in range(4)]
                                for l in range(32)
                            ]
                for kk in range(4):
                    # A 64x16 from registers (PTX figure: warp w rows 16w.., reg j: row g+8(j&1), col 2q+8(j>>1)+e)
                    A = np.zeros((64, 16))
                    for w4 in range(4):
                        for l in range(32):
                            g, q = l // 4, l % 4
                            for j in range(4):
                                for e in range(2):
                                    A[
                                        16 * w4 + g + 8 * (j & 1),
                                        2 * q + 8 * (j >> 1) + e,
                                    ] = Areg[(w4, kk)][l][j][e]
                    # B 256x16 through the descriptor: start=32kk, SBO=1024, rows 128 B apart, 128B swizzle on address bits
                    B = np.zeros((256, 16))
                    for nn in range(256):
                        for k in range(16):
                            raw = (
                                32 * kk
                                + (nn // 8) * 1024
                                + (nn % 8) * 128
                                + (k // 8) * 16
                                + (k % 8) * 2
                            )
                            a = raw ^ (((raw >> 7) & 7) << 4)
                            B[nn, k] = smem[a // 2]
                    D = A @ B.T  # 64 x 256
                    for w4 in range(4):
                        for l in range(32):
                            for i in range(128):
                                r = 16 * w4 + l // 4 + 8 * ((i // 2) % 2)
                                c = 8 * (i // 4) + 2 * (l % 4) + i % 2
                                acc[wg, w4, l, i] += D[r, c]
        # epilogue (lines 376-390)
        for wg in range(2):
            for w4 in range(4):
                for l in range(32):
                    row = xrow0 + 2 * (l & 3)
                    col = row0 + 64 * wg + 16 * w4 + (l >> 2)
                    for j in range(32):
                        for e in range(2):
                            if row + 8 * j + e >= rows:
                                continue
                            out[row + 8 * j + e, col] = acc[wg, w4, l, 4 * j + e]
                            out[row + 8 * j + e, col + 8] = acc[
                                wg, w4, l, 4 * j + 2 + e
                            ]
    ok = np.array_equal(out, ref)
    print(
        f"K={K} shard_rows={shard_rows} n={n} rows={rows} col0={col0}: exact match={ok}, nan={np.isnan(out).sum()}, maxerr={np.nanmax(np.abs(out - ref))}"
    )
    return ok


for K in (2, 3, 4):
    run(K, [128, 128], 128, 300, 32, 256)
run(3, [256], 256, 40, 0, 256)
