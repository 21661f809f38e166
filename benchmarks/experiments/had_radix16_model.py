# SPDX-License-Identifier: Apache-2.0
# Model of the radix-16 4096-point Sylvester transform: 256 threads x 16 values,
# three register passes joined by shared memory with the swizzle S.
import numpy as np

P, T = 4096, 256


def S(e):
    return e ^ (((e >> 5) & 3) << 2) ^ (((e >> 8) & 1) << 4)


assert sorted(S(e) for e in range(P)) == list(range(P))


def e_of(pss, t, i):
    if pss == 0:
        return 16 * t + i
    if pss == 1:
        return ((t >> 4) << 8) | (i << 4) | (t & 15)
    return i * 256 + t


# closure: a thread's 16 values differ exactly in the pass's bits
for pss, lo in ((0, 0), (1, 4), (2, 8)):
    seen = set()
    for t in range(T):
        es = [e_of(pss, t, i) for i in range(16)]
        base = es[0]
        assert all(
            (e ^ base) & ~(15 << lo) == 0 and ((e >> lo) & 15) == i
            for i, e in enumerate(es)
        ), (pss, t)
        seen.update(es)
    assert len(seen) == P


def fwht16(v):
    v = v.copy()
    h = 1
    while h < 16:
        for i in range(16):
            if not i & h:
                v[i], v[i + h] = v[i] + v[i + h], v[i] - v[i + h]
        h <<= 1
    return v


def banks_conflict_free(addrs):  # one scalar access per lane
    return len({a % 32 for a in addrs}) == len(addrs)


# pass-0 vector stores: granule q of lane t at 16t ^ ((t>>4)&1)<<4 + 4 (q ^ (t>>1)&3)
for q in range(4):
    for w in range(T // 32):
        for ph in range(4):  # 8 lanes per phase of a 128-bit access
            lanes = range(32 * w + 8 * ph, 32 * w + 8 * ph + 8)
            starts = []
            for t in lanes:
                a = (16 * t ^ (((t >> 4) & 1) << 4)) + 4 * (q ^ ((t >> 1) & 3))
                assert a == S(16 * t + 4 * q), (
                    t,
                    q,
                )  # same as S on the granule's first element
                assert all(S(16 * t + 4 * q + j) == a + j for j in range(4))
                starts.append(a)
            banks = [(a + j) % 32 for a in starts for j in range(4)]
            assert len(set(banks)) == 32, (q, w, ph)
# scalar passes: conflict-free per (pass, i, warp)
for pss in (1, 2):
    for i in range(16):
        for w in range(T // 32):
            assert banks_conflict_free(
                [S(e_of(pss, t, i)) for t in range(32 * w, 32 * w + 32)]
            ), (pss, i, w)
# end to end
rng = np.random.default_rng(1)
x = rng.standard_normal(P)
smem = np.full(P, np.nan)
for t in range(T):  # pass 0
    v = fwht16(np.array([x[16 * t + i] for i in range(16)]))
    for i in range(16):
        smem[S(16 * t + i)] = v[i]
for t in range(T):  # pass 1 (reads and writes its own addresses)
    es = [e_of(1, t, i) for i in range(16)]
    v = fwht16(np.array([smem[S(e)] for e in es]))
    for e, val in zip(es, v):
        smem[S(e)] = val
y = np.zeros(P)
for t in range(T):
    es = [e_of(2, t, i) for i in range(16)]
    v = fwht16(np.array([smem[S(e)] for e in es]))
    for e, val in zip(es, v):
        y[e] = val
H = np.array([[1.0]])
while H.shape[0] < P:
    H = np.block([[H, H], [H, -H]])
assert np.allclose(y, H @ x)
print("radix-16 model ok: mapping, swizzle bijection, conflict-free accesses, S_4096")
# folded bases used by the kernel
for t in range(T):
    tb4 = (t >> 4) & 1
    row0, gsw = (16 * t) ^ (tb4 << 4), (t >> 1) & 3
    for q in range(4):
        assert row0 + 4 * (q ^ gsw) == S(16 * t + 4 * q)
    base1 = [
        ((t >> 4) << 8)
        + ((t & 15) ^ (((j >> 1) & 3) << 2))
        + (-16 if j & 1 else 16) * tb4
        for j in range(8)
    ]
    for i in range(16):
        assert base1[i & 7] + 16 * i == S(e_of(1, t, i)), (t, i)
    u = t ^ (((t >> 5) & 3) << 2)
    base2 = [u, u ^ 16]
    for i in range(16):
        assert base2[i & 1] + 256 * i == S(e_of(2, t, i))
print("folded bases ok")


# Blocks of P = 2^8 .. 2^12 columns (qtip_sylvester16_kernel): a CTA holds
# cols = k * P <= 4096 columns; passes 0 and 1 as above for the threads with
# 16 t < cols, pass 2 radix-2^(log2P - 8) groups of consecutive i < cols / 256.
def fwht_groups(v, r):
    v = v.copy()
    h = 1
    while h < r:
        for i in range(16):
            if not i & h:
                v[i], v[i + h] = v[i] + v[i + h], v[i] - v[i + h]
        h <<= 1
    return v


def sylvester(n):
    h = np.array([[1.0]])
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h


cases = 0
for log2p in range(8, 13):
    blk = 1 << log2p
    for cols in range(blk, P + 1, blk):
        x = rng.standard_normal(cols)
        smem = np.full(P, np.nan)
        for t in range(T):
            if 16 * t >= cols:
                continue
            v = fwht16(np.array([x[16 * t + i] for i in range(16)]))
            for i in range(16):
                smem[S(16 * t + i)] = v[i]
        for t in range(T):
            if 16 * t >= cols:
                continue
            es = [e_of(1, t, i) for i in range(16)]
            assert all(e < cols for e in es)  # the guard is exact
            v = fwht16(np.array([smem[S(e)] for e in es]))
            for e, val in zip(es, v):
                smem[S(e)] = val
        y = np.full(cols, np.nan)
        i_end = cols >> 8
        for t in range(T):
            v = np.zeros(16)
            for i in range(i_end):
                v[i] = smem[S(e_of(2, t, i))]
            assert not np.isnan(v[:i_end]).any()  # only written slots read
            v = fwht_groups(v, 1 << (log2p - 8))
            for i in range(i_end):
                y[256 * i + t] = v[i]
        ref = np.concatenate(
            [sylvester(blk) @ x[b : b + blk] for b in range(0, cols, blk)]
        )
        assert np.allclose(y, ref), (log2p, cols)
        cases += 1
print(f"block sizes 2^8 .. 2^12, partial CTAs: {cases} cases ok")
