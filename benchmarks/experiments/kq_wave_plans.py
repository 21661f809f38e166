# SPDX-License-Identifier: Apache-2.0
"""The fused GEMM's (splits, kq) plans on an H200 (132 SMs, 227 KiB of shared
memory per block): "kq1" is `mma_plan` before warp shares, "kq-wave" the
twelfth session's (a ring-fill term per wave), "main" the one landed in
0e0978a (warp shares only in one-wave plans with a split of k); for the
benchmark's layers at 1-127 rows. A Python copy of `mma_config`,
`max_chunk_log2kq`, `mma_plan` and (one row, own input, K = 1) `run_mma`'s
re-planning, one warp-share level at a time, until the staging fits."""

SMS = 132
LIMIT = 232448
W = 16
KSTAGES = 4


def ring(nb):
    return 8 if nb == 1 else KSTAGES


def sbb(nb):
    return nb * 512 + 16


def stage_bytes(nb, cb):
    return 2 * cb * sbb(nb)


def lutb(c):
    return 1024 * c * 4


def config(nbt):
    if nbt <= 4:
        nb = 1 if nbt <= 1 else 2 if nbt <= 2 else 4
    else:  # pass_tiles (nb6.patch): 6 where 8 would need no more than 6 per pass
        passes = (nbt + 7) // 8
        nb = 6 if (nbt + passes - 1) // passes <= 6 else 8
    r = ring(nb)
    copies = 32 if lutb(32) + stage_bytes(nb, r) <= LIMIT else 16
    lut = lutb(copies)
    blocks = min(64, min(LIMIT - lut, 96 * 1024) // (2 * nb * 512))
    cb = max(r, blocks // r * r)
    while cb > r and lut + stage_bytes(nb, cb) > LIMIT:
        cb -= r
    return nb, cb


def red_bytes(lq, nb):
    return ((1 << lq) - 1) * (W >> lq) * 32 * 2 * nb * 4 * 4


def max_chunk_l(nb, cb):
    lq = 0
    while (
        nb <= 4
        and lq < 4
        and cb % ((2 << lq) * ring(nb)) == 0
        and red_bytes(lq + 1, nb) <= stage_bytes(nb, cb)
    ):
        lq += 1
    return lq


def plan(shard_tiles, nblk, rows, maxl, mode):
    nbt = (rows + 7) // 8
    m = sum(shard_tiles) * 32
    rate = min(32.0, 1024.0 / (nbt * 8))
    out = min(max(rows * len(shard_tiles), 1), SMS)
    best = None
    for lq in range(0, (maxl if mode != "main" else 0) + 1):
        tpu = W >> lq
        groups = sum((t + tpu - 1) // tpu for t in shard_tiles)
        uw = tpu * 32 * nblk * 32
        ux = rows * nblk * 32 * 2
        for s in range(1, max(1, nblk // (KSTAGES << lq)) + 1):
            waves = (groups * s + SMS - 1) // SMS
            if mode == "new" and lq > 0 and waves > 1:
                break
            if mode == "new" and lq > 0 and s < 2:
                continue  # a warp share only with a split of k
            fill = 2000 if mode == "kqwave" else 0
            t = (
                waves * ((uw / rate + ux / 20.0) / s + fill)
                + s * rows * m * 8.0 / (SMS * 20.0)
                + s * rows * m * 4.0 / (out * 60.0)
            )
            if best is None or t < best[0]:
                best = (t, s, lq, groups)
    return best


layers = {
    "1024x4096": ([32], 4096, 1),
    "4096x4096": ([128], 4096, 1),
    "4096x11008": ([128], 11008, 172),
    "4096x14336": ([128], 14336, 28),
    "11008x4096": ([344], 4096, 1),
    "14336x4096": ([448], 4096, 1),
    "L2 qkv": ([128] * 3, 4096, 1),
    "L2 gate_up": ([344] * 2, 4096, 1),
    "L3 qkv": ([128, 32, 32], 4096, 1),
    "L3 gate_up": ([448] * 2, 4096, 1),
    "L3 o/L2 o": ([128], 4096, 1),
}


def own_input_need(n, splits, lq):
    """own_input_staging (K = 1): X, the widest unit's x~ row, the sums."""
    nblk, kq = n // 32, 1 << lq
    widest = (nblk + splits - 1) // splits
    floats = n + (widest + kq - 1) // kq * kq * (sbb(1) // 4)
    if lq:
        floats += red_bytes(lq, 1) // 4
    return floats * 4


def fitted(tiles, n, rows, maxl, mode, nb, cb):
    """run_mma: one row with its own input re-plans with one warp-share level
    fewer at a time until the staging fits."""
    p = plan(tiles, n // 32, rows, maxl, mode)
    while (
        rows == 1 and p[2] > 0 and own_input_need(n, p[1], p[2]) > stage_bytes(nb, cb)
    ):
        p = plan(tiles, n // 32, rows, p[2] - 1, mode)
    return p


for name, (tiles, n, hk) in layers.items():
    for rows in (1, 2, 16, 32, 64, 127):
        nb, cb = config((rows + 7) // 8)
        own = rows == 1
        maxl = (4 if hk == 1 else 0) if own else max_chunk_l(nb, cb)
        r = [
            fitted(tiles, n, rows, maxl, mo, nb, cb) for mo in ("main", "kqwave", "new")
        ]
        tag = lambda p: f"s{p[1]} kq{1 << p[2]} u{p[3] * p[1]}"
        mark = (
            ""
            if (r[2][1], r[2][2]) == (r[0][1], r[0][2])
            else "  <-- main differs from kq1"
        )
        print(
            f"{name:<12} b{rows:<4} kq1 {tag(r[0]):<16} kq-wave {tag(r[1]):<16} "
            f"main {tag(r[2]):<16}{mark}"
        )
