# SPDX-License-Identifier: Apache-2.0
"""numpy model of qtip_ws_kernel's data path (exp/ws-wgmma b5fdcc0).

Part 1 (one stage): random fp16 W (128 x 64) and x~ (64 x 64) are placed
into a byte array through the kernel's exact producer index code
(qtip_wgmma.cu lines 186-218: frag words -> bytes, cp.async chunk -> bytes),
read back through the wgmma K-major no-swizzle descriptor semantics (CuTe
canonical INTERLEAVE K-major layout ((8,n),2):((1,SBO),LBO) in 16-byte units:
element (mn, k) of a 64x16 operand at start + (mn/8)*SBO + (mn%8)*16 +
(k/8)*LBO + (k%8)*2), with the consumer's descriptors (line 244-245, packed by
ws_desc line 91-96 and unpacked here from the bit fields), D = A B^T summed
over kk and compared with W @ x~^T; then the consumer's accumulator
fragment (CuTe CLayout_64x64) goes through the epilogue mapping (lines
255-267) and is compared too.

Part 2 (whole kernel): the host plan (lines 307-329) and every unit/step,
stage buffers reused across steps and initialised with NaN (stale data),
partial sums (splits, rows, m) initialised with NaN and a write counter; the
sum over splits must equal x~[shard] @ W_hat[shard rows]^T and every (split,
b < rows, R) must be written exactly once.
"""

import os

import numpy as np

rng = np.random.default_rng(1)
# WS_PRODUCERS=8: exp/ws-wgmma (4 stages of 64 columns); 16 (default):
# exp/ws-wgmma16 (3 stages of 128 columns).
kWsProducerWarps = int(os.environ.get("WS_PRODUCERS", "16"))
kWsStages, kWsN, kWsUnitTiles = (4 if kWsProducerWarps == 8 else 3), 64, 4
kWsStepBlocks = kWsProducerWarps // kWsUnitTiles  # 32-column blocks per stage
kWsStepCols = 32 * kWsStepBlocks
kWsCoreCols = kWsStepCols // 8
kWsSbo = kWsCoreCols * 128
kWsABytes = kWsUnitTiles * 32 * kWsStepCols * 2
kWsBBytes = kWsN * kWsStepCols * 2
kWsStageBytes = kWsABytes + kWsBBytes


def ws_desc(addr):
    return ((addr >> 4) & 0x3FFF) | ((128 >> 4) << 16) | ((kWsSbo >> 4) << 32)


def unpack(desc):
    start = (desc & 0x3FFF) << 4
    lbo = ((desc >> 16) & 0x3FFF) << 4
    sbo = ((desc >> 32) & 0x3FFF) << 4
    base = (desc >> 49) & 7
    swz = (desc >> 62) & 3
    assert base == 0 and swz == 0
    return start, lbo, sbo


def read_operand(mem_u16, desc, rows):
    """rows x 16 fp16 operand, K-major no swizzle (CuTe canonical)."""
    start, lbo, sbo = unpack(desc)
    out = np.empty((rows, 16), np.float16)
    for mn in range(rows):
        for k in range(16):
            byte = (
                start + (mn >> 3) * sbo + (mn & 7) * 16 + (k >> 3) * lbo + (k & 7) * 2
            )
            assert byte % 2 == 0
            out[mn, k] = mem_u16[byte // 2].view(np.float16)
    return out


def frag_words(blk):
    """decode_block's contract for a 32x32 fp16 block: frag[lane][kc*2+mr][i]
    as uint32 (two fp16, lower column in the low half)."""
    u = blk.view(np.uint16).astype(np.uint32)
    fr = np.zeros((32, 4, 4), np.uint32)
    for lane in range(32):
        g, q = lane >> 2, lane & 3
        for kc in range(2):
            for mr in range(2):
                for i in range(4):
                    r = mr * 16 + g + 8 * (i & 1)
                    c = kc * 16 + 2 * q + 8 * (i >> 1)
                    fr[lane, kc * 2 + mr, i] = u[r, c] | (u[r, c + 1] << 16)
    return fr


def producer_store_A(mem_bytes, a_base, rt, kb, fr):
    """Lines 191-201, for all lanes of producer warp (rt, kb)."""
    for lane in range(32):
        g, q = lane >> 2, lane & 3
        for t in range(4):
            mr, kc = t & 1, t >> 1
            for i in range(4):
                r = rt * 32 + mr * 16 + (i & 1) * 8
                c = kb * 32 + kc * 16 + (i >> 1) * 8
                off = (
                    a_base + ((r >> 3) * kWsCoreCols + (c >> 3)) * 128 + g * 16 + q * 4
                )
                mem_bytes[off : off + 4] = np.frombuffer(
                    np.uint32(fr[lane, t, i]).tobytes(), np.uint8
                )


def producer_stage_B(mem_bytes, b_addr, x_rows, rows, col0, k1, xrow_fn, N=64):
    """stage_x for all 256 producer threads (N = 32 or 64 batch rows)."""
    threads = kWsProducerWarps * 32
    for ptid in range(threads):
        for i in range(N * kWsCoreCols // threads):
            idx = ptid + i * threads
            b, c = idx & (N - 1), idx // N
            dst = b_addr + ((b >> 3) * kWsCoreCols + c) * 128 + (b & 7) * 16
            if b < rows and col0 + 8 * c < 32 * k1:
                src = xrow_fn(b, col0 + 8 * c)  # 8 halfs
                mem_bytes[dst : dst + 16] = np.frombuffer(src.tobytes(), np.uint8)
            elif b < rows:
                mem_bytes[dst : dst + 16] = 0


def consumer_step(mem_bytes, stage_base, acc, first, N=64):
    """Lines 238-245: 2 x 4 wgmma m64n64k16, D[r][b] (+)= sum_k A[r][k] B[b][k]."""
    mem_u16 = mem_bytes.view(np.uint16)
    a_addr = stage_base
    b_addr = a_addr + kWsABytes
    for mt in range(2):
        for kk in range(kWsStepCols // 16):
            A = read_operand(
                mem_u16, ws_desc(a_addr + (8 * mt * kWsCoreCols + 2 * kk) * 128), 64
            )
            B = read_operand(mem_u16, ws_desc(b_addr + 2 * kk * 128), N)
            with np.errstate(invalid="ignore", over="ignore"):
                D = A.astype(np.float64) @ B.astype(np.float64).T
            if first and kk == 0:
                acc[mt] = D  # scale-d = 0: overwrite (acc uninitialised)
            else:
                acc[mt] += D


def to_fragments(acc, N=64):
    """CuTe CLayout_64xN ((4,8,4),(2,2,N/8)):((128,1,16),(64,8,512)) over a
    column-major 64xN tile: d[thread][v] for each 64-row half."""
    d = np.empty((2, 128, N // 2))
    for mt in range(2):
        for t in range(128):
            t0, t1, t2 = t % 4, (t // 4) % 8, t // 32
            for v in range(N // 2):
                v0, v1, v2 = v % 2, (v // 2) % 2, v // 4
                off = t0 * 128 + t1 * 1 + t2 * 16 + v0 * 64 + v1 * 8 + v2 * 512
                m, n = off % 64, off // 64
                d[mt, t, v] = acc[mt][m, n]
    return d


def epilogue(d, out_fn, tiles, rows, N=64):
    """Lines 255-267 for all 128 consumer threads."""
    for tid in range(128):
        warp, lane = tid >> 5, tid & 31
        g, q = lane >> 2, lane & 3
        for mt in range(2):
            for jn in range(N // 8):
                for i in range(4):
                    r = 64 * mt + 16 * warp + g + (i >> 1) * 8
                    b = 8 * jn + 2 * q + (i & 1)
                    if r < tiles * 32 and b < rows:
                        out_fn(b, r, d[mt, tid, 4 * jn + i])


def part1():
    W = rng.standard_normal((128, kWsStepCols)).astype(np.float16)
    X = rng.standard_normal((64, kWsStepCols)).astype(np.float16)
    mem = np.full(kWsStageBytes, 0xFF, np.uint8)  # NaN everywhere first
    for p in range(kWsProducerWarps):
        rt, kb = p % kWsUnitTiles, p // kWsUnitTiles
        blk = np.ascontiguousarray(W[rt * 32 : (rt + 1) * 32, kb * 32 : (kb + 1) * 32])
        producer_store_A(mem, 0, rt, kb, frag_words(blk))
    producer_stage_B(
        mem, kWsABytes, X, 64, 0, kWsStepBlocks, lambda b, c: X[b, c : c + 8]
    )
    assert not np.isnan(mem.view(np.float16)).any(), "stage not fully written"
    acc = [None, None]
    consumer_step(mem, 0, acc, True)
    ref = W.astype(np.float64) @ X.astype(np.float64).T
    D = np.vstack(acc)
    print("part 1: max |D - W x~^T| =", np.abs(D - ref).max())
    out = np.full((64, 128), np.nan)
    cnt = np.zeros((64, 128), int)

    def put(b, r, v):
        out[b, r] = v
        cnt[b, r] += 1

    epilogue(to_fragments(acc), put, 4, 64)
    print(
        "part 1: epilogue max |out^T - ref| =",
        np.abs(out.T - ref).max(),
        " writes once:",
        (cnt == 1).all(),
    )
    # Swapped LBO/SBO must fail (sanity of the read model).
    mem_u16 = mem.view(np.uint16)
    bad = (0 >> 4) | ((kWsSbo >> 4) << 16) | ((128 >> 4) << 32)
    A = read_operand(mem_u16, bad, 64)
    print(
        "part 1: swapped LBO/SBO reproduces W[0:64,0:16]?",
        np.array_equal(A, W[:64, :16]),
    )


def part2(shard_tiles, nblk, rows, sms):
    N = 32 if rows <= 32 else 64  # qtip_ws_partials' choice
    shards = len(shard_tiles)
    rb0 = np.concatenate([[0], np.cumsum(shard_tiles)]).astype(int)
    m = rb0[-1] * 32
    n = nblk * 32
    What = rng.standard_normal((m, n)).astype(np.float16)
    xt = rng.standard_normal((shards, rows, n)).astype(np.float16)
    # host plan (qtip_ws_partials): waves x unit clocks / splits + partials
    groups = sum((rb0[s + 1] - rb0[s] + 3) // 4 for s in range(shards))
    max_splits = max(1, nblk // (4 * kWsStepBlocks))
    unit_clocks = kWsUnitTiles * 32.0 * n / 32.0
    best, splits = None, 1
    for sp in range(1, max_splits + 1):
        waves = (groups * sp + sms - 1) // sms
        t = waves * unit_clocks / sp + sp * rows * m * 8.0 / (sms * 20.0)
        if best is None or t < best:
            best, splits = t, sp
    unit0 = []
    units = 0
    for s in range(shards):
        unit0.append(units)
        units += ((rb0[s + 1] - rb0[s] + 3) // 4) * splits
    unit0.append(units)
    part = np.full((splits, rows, m), np.nan)
    cnt = np.zeros((splits, rows, m), int)
    for u in range(units):
        shard = 0
        while shard + 1 < shards and u >= unit0[shard + 1]:
            shard += 1
        local = u - unit0[shard]
        group, split = local // splits, local % splits
        tile0 = rb0[shard] + group * 4
        tiles = min(4, rb0[shard + 1] - tile0)
        k0 = nblk * split // splits
        k1 = nblk * (split + 1) // splits
        steps = (k1 - k0 + kWsStepBlocks - 1) // kWsStepBlocks
        mem = np.full(kWsStages * kWsStageBytes, 0xFF, np.uint8)  # stale = NaN
        acc = [None, None]
        for j in range(steps):
            s = j % kWsStages
            base = s * kWsStageBytes
            for p in range(kWsProducerWarps):
                rt, kb = p % kWsUnitTiles, p // kWsUnitTiles
                has_rows = rt < tiles
                blk = k0 + kWsStepBlocks * j + kb
                mine = has_rows and blk < k1
                if mine:
                    R = (tile0 + rt) * 32
                    fr = frag_words(
                        np.ascontiguousarray(
                            What[R : R + 32, blk * 32 : (blk + 1) * 32]
                        )
                    )
                else:
                    fr = np.zeros((32, 4, 4), np.uint32)
                if has_rows:
                    producer_store_A(mem, base, rt, kb, fr)
            col0 = 32 * (k0 + kWsStepBlocks * j)
            producer_stage_B(
                mem,
                base + kWsABytes,
                None,
                rows,
                col0,
                k1,
                lambda b, c: xt[shard, b, c : c + 8],
                N,
            )
            consumer_step(mem, base, acc, j == 0, N)
        if steps == 0:
            continue

        def put(b, r, v):
            part[split, b, tile0 * 32 + r] = v
            cnt[split, b, tile0 * 32 + r] += 1

        epilogue(to_fragments(acc, N), put, tiles, rows, N)
    ref = np.zeros((rows, m))
    for s in range(shards):
        r0, r1 = rb0[s] * 32, rb0[s + 1] * 32
        ref[:, r0:r1] = xt[s].astype(np.float64) @ What[r0:r1].astype(np.float64).T
    y = part.sum(0)
    ok_once = (cnt == 1).all()
    err = np.abs(y - ref).max()
    print(
        f"part 2: tiles {shard_tiles} nblk {nblk} rows {rows} sms {sms}: "
        f"splits {splits} units {units}; writes once {ok_once}; "
        f"max err {err:.3g}; NaN {np.isnan(y).any()}"
    )
    return ok_once and err < 1e-9


if __name__ == "__main__":
    part1()
    ok = True
    for cfg in [
        ([4], 2, 64, 132),
        ([5, 3, 8], 13, 33, 132),
        ([1], 1, 40, 132),
        ([2, 7], 7, 64, 4),
        ([6], 17, 50, 132),
        ([9, 1, 2], 3, 37, 2),
        ([4, 4], 16, 64, 8),
        ([4], 8, 17, 132),
        ([5, 2], 9, 32, 6),
        ([3], 5, 20, 1),
        ([4], 37, 40, 3),
        ([8, 3], 22, 64, 5),
    ]:
        ok &= part2(*cfg)
    print("ALL OK" if ok else "FAIL")
