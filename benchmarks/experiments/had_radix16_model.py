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
