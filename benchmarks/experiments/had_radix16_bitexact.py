# SPDX-License-Identifier: Apache-2.0
# Extended review model of qtip_sylvester16_kernel (branch exp/radix16-blocks):
# host routing + blk0, a literal translation of the kernel's index code
# (seg selection, col0, row0/gsw, base1, u/base2, guards, i_end, groups),
# run in numpy float32 and compared bit for bit with an fp32 emulation of
# qtip_hadamard_kernel's K = 1 path (load_sylvester: butterflies<8>, the three
# shuffle stages with `upper ? other - v : v + other`, smem_stages radix
# passes, store_group8). Also checks: every shared slot read was written in
# this CTA, no slot written twice per pass, all indices in bounds.
import math
import sys

import numpy as np

f32 = np.float32
kSyl16Cols, kSyl16Threads, kMaxShards = 4096, 256, 8
kHadMinCtaCols = 2048


def butterflies(v, R):
    # v: (..., R) float32, in place, as qtip_hadamard.cuh butterflies<R>
    h = 1
    while h < R:
        for i in range(R):
            if not i & h:
                a, c = v[..., i].copy(), v[..., i + h].copy()
                v[..., i] = a + c
                v[..., i + h] = a - c
        h <<= 1


def host_segs(blocks, segments, factor, K=1):
    segs = dict(
        count=len(segments), col=[], len=[], cta_cols=[], log2P=[], blk0=[0], mult=[]
    )
    col = 0
    for ln, b in zip(segments, blocks):
        assert b > 0 and ln > 0 and ln % b == 0
        P = b // K
        assert P >= 8 and P & (P - 1) == 0
        log2P = P.bit_length() - 1
        per_cta = 1 if K > 1 else min(ln // b, (kHadMinCtaCols + b - 1) // b)
        cta = per_cta * b
        segs["col"].append(col)
        segs["len"].append(ln)
        segs["cta_cols"].append(cta)
        segs["log2P"].append(log2P)
        segs["blk0"].append(segs["blk0"][-1] + (ln + cta - 1) // cta)
        segs["mult"].append(f32(factor / math.sqrt(b)))
        col += ln
    return segs, col


def general(x, in_scale, out_scale, segs, copies, rows, n):
    # qtip_hadamard_kernel, K = 1, in_splits = 1: one CTA per
    # (copy, row, j); vectorised over rows (axis 0).
    y = np.full((copies, rows, n), np.nan, dtype=f32)
    for copy in range(copies):
        for j in range(segs["blk0"][-1]):
            seg = 0
            while seg + 1 < segs["count"] and j >= segs["blk0"][seg + 1]:
                seg += 1
            seg_off = (j - segs["blk0"][seg]) * segs["cta_cols"][seg]
            b = min(segs["cta_cols"][seg], segs["len"][seg] - seg_off)
            log2P = segs["log2P"][seg]
            col0 = segs["col"][seg] + seg_off
            mult = segs["mult"][seg]
            groups = b // 8
            V = x[:, col0 : col0 + b].reshape(rows, groups, 8).copy()
            if in_scale is not None:
                V *= in_scale[copy, col0 : col0 + b].reshape(groups, 8)
            shfl = min(log2P, 6)
            butterflies(V, 8)
            h8 = 1
            while h8 < (1 << (shfl - 3)):
                g = np.arange(groups)
                other = V[:, g ^ h8, :]
                upper = ((g & 31) & h8) != 0  # lane = g & 31
                V = np.where(upper[None, :, None], other - V, V + other).astype(f32)
                h8 <<= 1
            X = V.reshape(rows, b)
            bit = shfl
            while bit < log2P:
                r = min(3, log2P - bit)
                R, h = 1 << r, 1 << bit
                gid = np.arange(b >> r)
                base = ((gid >> bit) << (bit + r)) | (gid & (h - 1))
                idx = base[:, None] + np.arange(R)[None, :] * h
                W = X[:, idx].copy()
                butterflies(W, R)
                X[:, idx] = W
                bit += 3
            out = X * mult
            if out_scale is not None:
                out = out * out_scale[col0 : col0 + b]
            y[copy, :, col0 : col0 + b] = out
    return y


def slot(e):
    return e ^ (((e >> 5) & 3) << 2) ^ (((e >> 8) & 1) << 4)


def radix16(x, in_scale, out_scale, segs, copies, rows, n):
    # qtip_sylvester16_kernel, literal; grid (rows, blk0[count], copies),
    # vectorised over rows (blockIdx.x) and threads (t).
    xf = x.reshape(-1)
    isf = None if in_scale is None else in_scale.reshape(-1)
    y = np.full(copies * rows * n, np.nan, dtype=f32)
    t = np.arange(kSyl16Threads)
    rowv = np.arange(rows)
    for copy in range(copies):  # blockIdx.z
        for j in range(segs["blk0"][segs["count"]]):  # blockIdx.y
            seg = 0
            while seg + 1 < segs["count"] and j >= segs["blk0"][seg + 1]:
                seg += 1
            seg_off = (j - segs["blk0"][seg]) * kSyl16Cols
            cols = min(kSyl16Cols, segs["len"][seg] - seg_off)
            assert cols > 0 and cols % (1 << segs["log2P"][seg]) == 0
            col0 = segs["col"][seg] + seg_off
            bits2 = segs["log2P"][seg] - 8
            mult = segs["mult"][seg]
            xo = rowv * n + col0  # x += row * n + col0
            yo = (copy * rows + rowv) * n + col0
            X = np.full((rows, kSyl16Cols), np.nan, dtype=f32)
            written = np.zeros(kSyl16Cols, dtype=int)
            on = 16 * t < cols
            tb4 = (t >> 4) & 1
            # pass 0
            ton = t[on]
            gi = (
                xo[:, None, None]
                + 16 * ton[None, :, None]
                + np.arange(16)[None, None, :]
            )
            assert gi.min() >= 0 and gi.max() < rows * n
            assert ((16 * ton) % (8 if x.dtype == f32 else 8) == 0).all()
            v = xf[gi].astype(f32)  # (rows, T_on, 16)
            if isf is not None:
                si = copy * n + col0 + 16 * ton[:, None] + np.arange(16)[None, :]
                assert si.min() >= 0 and si.max() < copies * n
                assert ((copy * n + col0 + 16 * ton) % 4 == 0).all()  # 16 B
                v = v * isf[si][None]
            butterflies(v, 16)
            row0 = (16 * ton) ^ (tb4[on] << 4)
            gsw = (ton >> 1) & 3
            for q in range(4):
                a = row0 + 4 * (q ^ gsw)
                assert (a % 4 == 0).all()
                for k in range(4):
                    ad = a + k
                    assert ad.min() >= 0 and ad.max() < kSyl16Cols
                    assert (ad == slot(16 * ton + 4 * q + k)).all()
                    X[:, ad] = v[:, :, 4 * q + k]
                    np.add.at(written, ad, 1)
            assert written.max() <= 1
            assert (written[:cols] == 1).all() or True
            # __syncthreads
            # pass 1
            base1 = np.stack(
                [
                    ((ton >> 4) << 8)
                    + ((ton & 15) ^ (((b >> 1) & 3) << 2))
                    + (-16 if b & 1 else 16) * tb4[on]
                    for b in range(8)
                ]
            )
            idx1 = np.stack([base1[i & 7] + 16 * i for i in range(16)], axis=1)
            assert idx1.min() >= 0 and idx1.max() < kSyl16Cols
            assert len(np.unique(idx1)) == idx1.size  # own disjoint slots
            v = X[:, idx1].copy()
            assert not np.isnan(v).any(), "pass 1 read an unwritten slot"
            butterflies(v, 16)
            X[:, idx1] = v
            # __syncthreads
            # pass 2 (all threads)
            u = t ^ (((t >> 5) & 3) << 2)
            base2 = [u, u ^ 16]
            i_end = cols >> 8
            assert i_end % (1 << bits2) == 0 or bits2 == 0
            v = np.full((rows, kSyl16Threads, 16), np.nan, dtype=f32)  # uninit
            for i in range(16):
                if i < i_end:
                    ad = base2[i & 1] + 256 * i
                    assert ad.max() < kSyl16Cols
                    v[:, :, i] = X[:, ad]
            assert not np.isnan(v[:, :, :i_end]).any(), "pass 2 read unwritten"
            R = {0: 1, 1: 2, 2: 4, 3: 8}.get(bits2, 16)
            for g in range(0, 16, R):
                w = v[:, :, g : g + R].copy()
                butterflies(w, R)
                v[:, :, g : g + R] = w
            for i in range(16):
                if i >= i_end:
                    break
                e = 256 * i + t
                val = v[:, :, i] * mult
                assert not np.isnan(val).any()
                if out_scale is not None:
                    assert (col0 + e).max() < n
                    val = val * out_scale[col0 + e]
                gy = yo[:, None] + e[None, :]
                assert gy.max() < copies * rows * n
                assert np.isnan(y[gy]).all(), "output written twice"
                y[gy] = val
    return y.reshape(copies, rows, n)


def route(K, in_splits, copies, rows, segs):
    ok = K == 1 and in_splits == 1 and copies * rows >= 128
    for s in range(segs["count"]):
        ok &= segs["log2P"][s] >= 8 and (1 << segs["log2P"][s]) <= kSyl16Cols
    if not ok:
        return None
    s2 = {k: (list(v) if isinstance(v, list) else v) for k, v in segs.items()}
    for s in range(segs["count"]):
        s2["blk0"][s + 1] = s2["blk0"][s] + (segs["len"][s] + 4095) // 4096
    return s2


def reference64(x, in_scale, out_scale, blocks, segments, factor, copies):
    xs = x.astype(np.float64)[None].repeat(copies, 0)
    if in_scale is not None:
        xs = xs * in_scale[:, None, :]
    outs, col = [], 0
    for b, ln in zip(blocks, segments):
        H = np.array([[1.0]])
        while H.shape[0] < b:
            H = np.block([[H, H], [H, -H]])
        p = xs[..., col : col + ln].reshape(copies, -1, b)
        outs.append((p @ H.T / math.sqrt(b) * factor).reshape(copies, x.shape[0], ln))
        col += ln
    y = np.concatenate(outs, -1)
    if out_scale is not None:
        y = y * out_scale
    return y


def check(blocks, segments, copies, rows, scales, rng, factor=0.5, in_dt=f32):
    segs, n = host_segs(blocks, segments, factor)
    r = route(1, 1, copies, rows, segs)
    assert r is not None, (blocks, segments, copies, rows)
    x = rng.standard_normal((rows, n)).astype(in_dt).astype(f32)
    in_scale = np.sign(rng.standard_normal((copies, n))).astype(f32) if scales else None
    if scales:
        in_scale *= rng.uniform(0.5, 2, (copies, n)).astype(f32)
    out_scale = rng.uniform(0, 1, n).astype(f32) if scales else None
    yg = general(x, in_scale, out_scale, segs, copies, rows, n)
    yr = radix16(x, in_scale, out_scale, r, copies, rows, n)
    assert not np.isnan(yr).any(), "output column never written"
    assert np.array_equal(yg.view(np.uint32), yr.view(np.uint32)), (blocks, segments)
    ref = reference64(x, in_scale, out_scale, blocks, segments, factor, copies)
    err = np.linalg.norm(yr - ref) / np.linalg.norm(ref)
    assert err < 1e-6, err
    return r["blk0"]


rng = np.random.default_rng(0)
cases = [
    ([4096], [8192], 1, 128),
    ([4096, 1024, 1024], [4096, 1024, 1024], 2, 64),
    ([512], [14336], 1, 128),
    ([256, 2048], [768, 6144], 2, 64),
    ([256], [4096], 1, 128),
    ([1024], [4096 * 2 + 1024 * 3], 1, 128),
    ([256, 512, 1024, 2048, 4096], [256 * 5, 512 * 9, 1024, 2048 * 3, 4096], 3, 48),
    ([2048] * 8, [2048 * (k + 1) for k in range(8)], 8, 16),
]
for blocks, segments, copies, rows in cases:
    for scales in (False, True):
        blk0 = check(blocks, segments, copies, rows, scales, rng)
    print("ok", blocks, segments, "copies", copies, "rows", rows, "blk0", blk0)
# random layouts
for it in range(int(sys.argv[1]) if len(sys.argv) > 1 else 40):
    cnt = int(rng.integers(1, kMaxShards + 1))
    blocks = [1 << int(rng.integers(8, 13)) for _ in range(cnt)]
    segments = [b * int(rng.integers(1, 40 if b < 1024 else 6)) for b in blocks]
    copies = int(rng.integers(1, kMaxShards + 1))
    rows = max(1, -(-128 // copies))
    check(
        blocks,
        segments,
        copies,
        rows,
        bool(rng.integers(0, 2)),
        rng,
        factor=float(rng.uniform(0.1, 40)),
        in_dt=[f32, np.float16][int(rng.integers(0, 2))],
    )
print("random layouts ok")
