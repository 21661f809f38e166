# SPDX-License-Identifier: Apache-2.0
# numpy model of the kernel's tensor-core H_K step: PTX m16n8k8 tf32 fragment
# semantics, the shared-memory layouts and the item loop, vs H @ X.
import numpy as np


def stride(rc):
    return rc + 8


def mma(acc, a, b):
    # a[lane][4], b[lane][2] -> D = A(16x8) B(8x8) + C, PTX layouts
    A = np.zeros((16, 8))
    B = np.zeros((8, 8))
    for lane in range(32):
        g, t = lane >> 2, lane & 3
        A[g][t], A[g + 8][t], A[g][t + 4], A[g + 8][t + 4] = a[lane]
        B[t][g], B[t + 4][g] = b[lane]
    C = np.zeros((16, 8))
    for lane in range(32):
        g, t = lane >> 2, lane & 3
        C[g][2 * t], C[g][2 * t + 1], C[g + 8][2 * t], C[g + 8][2 * t + 1] = acc[lane]
    D = A @ B + C
    for lane in range(32):
        g, t = lane >> 2, lane & 3
        acc[lane] = [D[g][2 * t], D[g][2 * t + 1], D[g + 8][2 * t], D[g + 8][2 * t + 1]]


def block(K, P, rchunk, r0, p_lo, plen, H, Xfull, transpose, xpad=0):
    k8 = (K + 7) // 8 * 8
    ms = stride(rchunk)
    M = np.full(K * ms, np.nan)  # unwritten entries must never be read
    for i in range(K * rchunk):
        k, r = i // rchunk, r0 + i % rchunk
        M[k * ms + r - r0] = (H[k][r] if transpose else H[r][k]) if r < K else 0.0
    # X's rows P + xpad floats apart (the kernel's padded copy / presummed load)
    xs = P + xpad
    X = np.full(K * xs + 64, np.nan)
    for k in range(K):
        X[k * xs : k * xs + P] = Xfull[k]
    Y = {}
    ptiles = plen // 8
    items = (rchunk // 16) * ptiles
    for item in range(items):
        rt, pc = item // ptiles, p_lo + (item % ptiles) * 8
        acc = [[0.0] * 4 for _ in range(32)]
        for ks in range(0, k8, 8):
            a = []
            b = []
            banks0 = []
            for lane in range(32):
                g, t = lane >> 2, lane & 3
                k = ks + t
                m = rt * 16 + g
                a.append(
                    [
                        M[k * ms + m] if k < K else 0.0,
                        M[k * ms + m + 8] if k < K else 0.0,
                        M[(k + 4) * ms + m] if k + 4 < K else 0.0,
                        M[(k + 4) * ms + m + 8] if k + 4 < K else 0.0,
                    ]
                )
                x0 = X[k * xs + pc + g] if k < K else 0.0
                x1 = X[(k + 4) * xs + pc + g] if k + 4 < K else 0.0
                b.append([x0, x1])
                banks0.append((k * xs + pc + g) % 32)
            if xpad and P % 32 == 0:  # the padding's point: no bank conflicts
                assert len(set(banks0)) == 32, (K, P, ks)
            assert not np.isnan(np.array(a)).any() and not np.isnan(np.array(b)).any()
            mma(acc, a, b)
        for lane in range(32):
            g, t = lane >> 2, lane & 3
            r, p = r0 + rt * 16 + g, pc + 2 * t
            if r < K:
                Y[(r, p)] = acc[lane][0]
                Y[(r, p + 1)] = acc[lane][1]
            if r + 8 < K:
                Y[(r + 8, p)] = acc[lane][2]
                Y[(r + 8, p + 1)] = acc[lane][3]
    return Y


rng = np.random.default_rng(0)
cases = 0
for K, P in ((172, 64), (28, 512), (12, 16), (20, 8), (52, 32)):
    for transpose in (False, True):
        H = rng.choice([-1.0, 1.0], size=(K, K))
        Xf = rng.standard_normal((K, P))
        ref = (H.T if transpose else H) @ Xf
        for rchunk in sorted(
            {min(32, (K + 15) // 16 * 16), 16, 48, 96, (K + 15) // 16 * 16}
        ):
            for p_splits, xpad in ((1, 0), (2, 0), (P // 8, 0), (1, 8), (2, 8)):
                if P % p_splits or (P // p_splits) % 8:
                    continue
                Yall = {}
                for r0 in range(0, K, rchunk):
                    for ps in range(p_splits):
                        p_lo = ps * P // p_splits
                        plen = (ps + 1) * P // p_splits - p_lo
                        Y = block(K, P, rchunk, r0, p_lo, plen, H, Xf, transpose, xpad)
                        assert not (Y.keys() & Yall.keys()), "output written twice"
                        Yall.update(Y)
                assert len(Yall) == K * P, (K, P, rchunk, p_splits, len(Yall))
                out = np.zeros((K, P))
                for (r, p), v in Yall.items():
                    out[r][p] = v
                assert np.allclose(out, ref), (K, P, rchunk, p_splits)
                cases += 1
print("ok", cases, "configurations")
