# SPDX-License-Identifier: Apache-2.0
"""A numpy model of qtip_hk64_kernel's index math (exp/dense-hk64): the staged
row block, the ldmatrix.x4.trans addresses and B fragments, the A fragments of
Hm, the m16n8k16 C layout, the in-place Sylvester stages and the output
columns, for K = 36 and 172 in both directions, against (Hm kron S_64) in
float64; and the input side's Sylvester tasks (input_kernel, exp/dense-hk64-in).
Prints the largest relative errors (~1e-15 when the indexing is right)."""

import numpy as np

P, STRIDE = 64, 72  # halves


def sylv(n):
    H = np.array([[1.0]])
    while H.shape[0] < n:
        H = np.block([[H, H], [H, -H]])
    return H


def kernel(x, had, K, transpose, outsc, mult):
    kt_n = (K + 15) // 16
    kp = kt_n * 16
    Hm = had.T if transpose else had
    hm = lambda r, k: Hm[r, k] if (r < K and k < K) else 0.0
    # smem buffer as halves, flat; pad rows zero, pad cols NaN (never read)
    smem = np.full(kp * STRIDE, np.nan)
    smem[K * STRIDE :] = 0.0
    for c in range(K * 8):
        k, ch = c >> 3, c & 7
        smem[k * STRIDE + ch * 8 : k * STRIDE + ch * 8 + 8] = x[
            k * P + ch * 8 : k * P + ch * 8 + 8
        ]
    y = np.full(K * P, np.nan)
    for warp in range(kt_n):
        acc = np.zeros((32, 8, 4))
        for kt in range(kt_n):
            # A frags per lane
            A = np.zeros((16, 16))
            for lane in range(32):
                g, q = lane >> 2, lane & 3
                r, k = 16 * warp + g, 16 * kt + 2 * q
                vals = [
                    (hm(r, k), hm(r, k + 1)),
                    (hm(r + 8, k), hm(r + 8, k + 1)),
                    (hm(r, k + 8), hm(r, k + 9)),
                    (hm(r + 8, k + 8), hm(r + 8, k + 9)),
                ]
                pos = [(g, 2 * q), (g + 8, 2 * q), (g, 2 * q + 8), (g + 8, 2 * q + 8)]
                for (v0, v1), (ri, ci) in zip(vals, pos):
                    A[ri, ci], A[ri, ci + 1] = v0, v1
            for j in range(4):
                # ldmatrix.x4.trans: lane addresses (in halves)
                addr = [
                    kt * 16 * STRIDE
                    + j * 16
                    + ((ln & 7) + 8 * ((ln >> 3) & 1)) * STRIDE
                    + 8 * (ln >> 4)
                    for ln in range(32)
                ]
                mats = [
                    np.array(
                        [
                            smem[addr[8 * m + rr] : addr[8 * m + rr] + 8]
                            for rr in range(8)
                        ]
                    )
                    for m in range(4)
                ]
                # reg m of lane l (trans): (row 2(l%4), 2(l%4)+1 ; col l//4) of mats[m]
                for half in range(2):  # n-tile 2j + half uses regs (2*half, 2*half+1)
                    B = np.zeros((16, 8))
                    for lane in range(32):
                        g, q = lane >> 2, lane & 3
                        m0, m1 = mats[2 * half], mats[2 * half + 1]
                        B[2 * q, g], B[2 * q + 1, g] = m0[2 * q, g], m0[2 * q + 1, g]
                        B[2 * q + 8, g], B[2 * q + 9, g] = (
                            m1[2 * q, g],
                            m1[2 * q + 1, g],
                        )
                    C = A @ B
                    nt = 2 * j + half
                    for lane in range(32):
                        g, q = lane >> 2, lane & 3
                        acc[lane, nt] += [
                            C[g, 2 * q],
                            C[g, 2 * q + 1],
                            C[g + 8, 2 * q],
                            C[g + 8, 2 * q + 1],
                        ]
        # Sylvester in place
        for lane in range(32):
            for nt in range(8):
                for i in (0, 2):
                    a0, a1 = acc[lane, nt, i], acc[lane, nt, i + 1]
                    acc[lane, nt, i], acc[lane, nt, i + 1] = a0 + a1, a0 - a1
            hb = 1
            while hb < 8:
                for nt in range(8):
                    if nt & hb:
                        continue
                    for i in range(4):
                        a0, a1 = acc[lane, nt, i], acc[lane, nt + hb, i]
                        acc[lane, nt, i], acc[lane, nt + hb, i] = a0 + a1, a0 - a1
                hb <<= 1
        for m in (1, 2):
            new = acc.copy()
            for lane in range(32):
                q = lane & 3
                other = acc[lane ^ m]
                new[lane] = (other - acc[lane]) if (q & m) else (acc[lane] + other)
            acc = new
        for lane in range(32):
            g, q = lane >> 2, lane & 3
            for h in range(2):
                r = 16 * warp + g + 8 * h
                if r >= K:
                    continue
                col = r * P + 2 * q
                for nt in range(8):
                    for e in range(2):
                        y[col + 8 * nt + e] = (
                            acc[lane, nt, 2 * h + e] * mult * outsc[col + 8 * nt + e]
                        )
    return y


rng = np.random.default_rng(0)
for K in (36, 172):
    for transpose in (False, True):
        had = rng.choice([-1.0, 1.0], size=(K, K))
        x = rng.standard_normal(K * P)
        outsc = rng.standard_normal(K * P)
        Hm = had.T if transpose else had
        ref = (np.kron(Hm, sylv(P)) @ x) * 0.3 * outsc
        y = kernel(x, had, K, transpose, outsc, 0.3)
        print(K, transpose, np.abs(y - ref).max() / np.abs(ref).max())


def input_kernel(x, su, had, K, mult_pre, mult_post):
    """qtip_hk64_in_kernel (exp/dense-hk64-in) without its fp16 rounding: the
    Sylvester part per (k, s) task with lanes 8m .. 8m + 7 of a row, then
    H_K^T through the same fragments as kernel()."""
    kp = (K + 15) // 16 * 16
    X = np.zeros((kp, P))
    v = {}
    for i in range(K * 8):
        k, s = i >> 3, i & 7
        v[i] = sylv(8) @ (
            x[k * P + 8 * s : k * P + 8 * s + 8] * su[k * P + 8 * s : k * P + 8 * s + 8]
        )
    for m in (1, 2, 4):
        new = {}
        for i in v:
            s = i & 7
            other = v[i ^ m]
            new[i] = (other - v[i]) if (s & m) else (v[i] + other)
        v = new
    for i in v:
        k, s = i >> 3, i & 7
        X[k, 8 * s : 8 * s + 8] = v[i] * mult_pre
    # The MMA part as in kernel(), with Hm = H_K^T and no Sylvester after it.
    Hm = np.zeros((kp, kp))
    Hm[:K, :K] = had.T
    Y = Hm @ X
    return (Y[:K] * mult_post).reshape(-1)


for K in (36, 172):
    had = rng.choice([-1.0, 1.0], size=(K, K))
    x = rng.standard_normal(K * P)
    su = rng.standard_normal(K * P)
    ref = (np.kron(had.T, sylv(P)) @ (x * su)) / 32 / np.sqrt(P * K)
    y = input_kernel(x, su, had, K, 1 / 32 / np.sqrt(P), 1 / np.sqrt(K))
    print("input", K, np.abs(y - ref).max() / np.abs(ref).max())
