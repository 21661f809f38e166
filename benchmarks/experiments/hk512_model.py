# SPDX-License-Identifier: Apache-2.0
"""A numpy model of qtip_hk512_kernel's index math (qtip_hadamard.cu): the
two Sylvester passes with their shared-memory slots, the mma.sync m16n8k8
fragments of X^T, Hm^T and Y^T as each lane holds them, and the output pass,
for K = 12 and 28 in both directions, against (Hm kron S_512) in float64.
Prints the largest relative error (~1e-15 when the indexing is right). Run it
after changing the kernel's layout (e.g. for K x 1024 blocks)."""

import numpy as np

P = 512
S = P + 8
HS = 40
MAXK = 32


def slot(p):
    return p ^ (((p >> 5) & 3) << 2)


def bfly(v):
    v = v.copy()
    R = len(v)
    h = 1
    while h < R:
        for i in range(R):
            if not i & h:
                a, c = v[i], v[i + h]
                v[i] = a + c
                v[i + h] = a - c
        h <<= 1
    return v


def sylv(n):
    H = np.array([[1.0]])
    while H.shape[0] < n:
        H = np.block([[H, H], [H, -H]])
    return H


def kernel(x, had, K, transpose, insc, outsc, mult):
    X = np.full(MAXK * S, np.nan)
    Hs = np.zeros(MAXK * HS)
    for i in range(MAXK * MAXK):
        k, r = divmod(i, MAXK)
        Hs[k * HS + r] = (
            (had[k, r] if transpose else had[r, k]) if (k < K and r < K) else 0.0
        )
    for i in range(K * S, MAXK * S):
        X[i] = 0.0
    for item in range(K * 32):
        k, j = item >> 5, item & 31
        col = k * P + 16 * j
        v = x[col : col + 16] * (insc[col : col + 16] if insc is not None else 1)
        v = bfly(v)
        sw = (j >> 1) & 3
        for q in range(4):
            X[k * S + 16 * j + 4 * (q ^ sw) : k * S + 16 * j + 4 * (q ^ sw) + 4] = v[
                4 * q : 4 * q + 4
            ]
    for warp in range(16):
        for lane in range(32):
            k = 4 * (warp >> 1) + (warp & 1) + 2 * (lane >> 4)
            jj = lane & 15
            if k < K:
                idx = [k * S + 16 * i + (jj ^ (((i >> 1) & 3) << 2)) for i in range(32)]
                v = bfly(X[idx])
                X[idx] = v
    X2 = X.copy()
    for warp in range(16):
        for tile in range(2):
            p0 = 16 * warp + 256 * tile
            for lane in range(32):
                g, q = lane >> 2, lane & 3
                s0, s1 = slot(p0 + g), slot(p0 + g + 8)
                assert p0 <= s0 < p0 + 16 and p0 <= s1 < p0 + 16
            # build A (16x32) and B (32x32) from lane fragments as the mma sees them
            A = np.zeros((16, 32))
            B = np.zeros((32, 32))
            for kk in range(4):
                for lane in range(32):
                    g, q = lane >> 2, lane & 3
                    s0, s1 = slot(p0 + g), slot(p0 + g + 8)
                    r0 = (8 * kk + q) * S
                    r4 = r0 + 4 * S
                    a = [X[r0 + s0], X[r0 + s1], X[r4 + s0], X[r4 + s1]]
                    A[g, 8 * kk + q] = a[0]
                    A[g + 8, 8 * kk + q] = a[1]
                    A[g, 8 * kk + q + 4] = a[2]
                    A[g + 8, 8 * kk + q + 4] = a[3]
                    for nt in range(4):
                        h0 = (8 * kk + q) * HS + g
                        h4 = h0 + 4 * HS
                        B[8 * kk + q, 8 * nt + g] = Hs[h0 + 8 * nt]
                        B[8 * kk + q + 4, 8 * nt + g] = Hs[h4 + 8 * nt]
            Cm = A @ B
            for lane in range(32):
                g, q = lane >> 2, lane & 3
                s0, s1 = slot(p0 + g), slot(p0 + g + 8)
                for nt in range(4):
                    r0 = (8 * nt + 2 * q) * S
                    X2[r0 + s0] = Cm[g, 8 * nt + 2 * q]
                    X2[r0 + S + s0] = Cm[g, 8 * nt + 2 * q + 1]
                    X2[r0 + s1] = Cm[g + 8, 8 * nt + 2 * q]
                    X2[r0 + S + s1] = Cm[g + 8, 8 * nt + 2 * q + 1]
    y = np.full(K * P, np.nan)
    for i in range(K * (P // 8)):
        r, p = i // (P // 8), (i % (P // 8)) * 8
        v = np.concatenate(
            [
                X2[r * S + slot(p) : r * S + slot(p) + 4],
                X2[r * S + slot(p + 4) : r * S + slot(p + 4) + 4],
            ]
        )
        e = r * P + p
        v = v * mult
        if outsc is not None:
            v = v * outsc[e : e + 8]
        y[e : e + 8] = v
    return y


rng = np.random.default_rng(0)
for K in (12, 28):
    for transpose in (False, True):
        had = rng.choice([-1.0, 1.0], size=(K, K))
        x = rng.standard_normal(K * P)
        insc = rng.standard_normal(K * P)
        outsc = rng.standard_normal(K * P)
        Hm = had.T if transpose else had
        full = np.kron(Hm, sylv(P))
        ref = (full @ (x * insc)) * 0.3 * outsc
        y = kernel(x, had, K, transpose, insc, outsc, 0.3)
        print(K, transpose, np.abs(y - ref).max() / np.abs(ref).max())
