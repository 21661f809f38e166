# SPDX-License-Identifier: Apache-2.0
"""numpy model of exp/dense-hk-fused's tensor-core H_K product (hk_product): the
ldmatrix (.trans) addresses and mma.m16n8k16 fragments as the PTX ISA defines them,
run over the kernel's warp/tile loops and compared with H @ X."""

import numpy as np


def ldmatrix(mem: np.ndarray, addrs: list[int], trans: bool) -> np.ndarray:
    """x4: lane 8i + r gives the element offset of row r of matrix i."""
    regs = np.zeros((32, 4, 2))
    for i in range(4):
        m = np.array([mem[addrs[8 * i + r] : addrs[8 * i + r] + 8] for r in range(8)])
        for t in range(32):
            g, q = t // 4, t % 4
            regs[t, i] = (
                m[g, 2 * q : 2 * q + 2] if not trans else m[2 * q : 2 * q + 2, g]
            )
    return regs


def mma(d: np.ndarray, a: np.ndarray, b0: np.ndarray, b1: np.ndarray) -> None:
    """d (32 lanes, 4) += A (16x16, row) B (16x8, col) from the fragments."""
    A, B = np.zeros((16, 16)), np.zeros((16, 8))
    for t in range(32):
        g, q = t // 4, t % 4
        A[g, 2 * q : 2 * q + 2], A[g + 8, 2 * q : 2 * q + 2] = a[t, 0], a[t, 1]
        A[g, 2 * q + 8 : 2 * q + 10], A[g + 8, 2 * q + 8 : 2 * q + 10] = (
            a[t, 2],
            a[t, 3],
        )
        B[2 * q : 2 * q + 2, g], B[2 * q + 8 : 2 * q + 10, g] = b0[t], b1[t]
    c = A @ B
    for t in range(32):
        g, q = t // 4, t % 4
        d[t] += [c[g, 2 * q], c[g, 2 * q + 1], c[g + 8, 2 * q], c[g + 8, 2 * q + 1]]


def hk_product(H: np.ndarray, X: np.ndarray, K: int, P: int) -> np.ndarray:
    kp, hs, xs = H.shape[0], H.shape[1], X.shape[1]
    hf, xf = H.reshape(-1), X.reshape(-1)
    D = np.full((K, P), np.nan)
    ntiles = min(8, P // 8)
    for warp in range(8):
        for mt in range(warp, kp // 16, 8):
            for p0 in range(0, P, 8 * ntiles):
                d = np.zeros((8, 32, 4))
                for ks in range(kp // 16):
                    a_addr = [
                        (mt * 16 + (lane & 15)) * hs + ks * 16 + (lane >> 4) * 8
                        for lane in range(32)
                    ]
                    a = ldmatrix(hf, a_addr, False)
                    for nt in range(0, ntiles, 2):
                        b_addr = [
                            (ks * 16 + ((lane >> 3) & 1) * 8 + (lane & 7)) * xs
                            + p0
                            + nt * 8
                            + (lane >> 4) * 8
                            for lane in range(32)
                        ]
                        bf = ldmatrix(xf, b_addr, True)
                        mma(d[nt], a, bf[:, 0], bf[:, 1])
                        mma(d[nt + 1], a, bf[:, 2], bf[:, 3])
                for nt in range(ntiles):
                    for t in range(32):
                        r, col = mt * 16 + t // 4, p0 + nt * 8 + 2 * (t % 4)
                        if r < K:
                            D[r, col : col + 2] = d[nt][t, 0:2]
                        if r + 8 < K:
                            D[r + 8, col : col + 2] = d[nt][t, 2:4]
    return D


def main() -> None:
    rng = np.random.default_rng(0)
    for K, P in ((172, 64), (28, 512), (12, 16), (36, 16), (20, 256), (52, 128)):
        kp = (K + 15) // 16 * 16
        H = np.zeros((kp, kp + 8))
        H[:K, :K] = rng.choice([-1.0, 1.0], (K, K))
        X = np.zeros((kp, P + 8))
        X[:K, :P] = rng.standard_normal((K, P))
        err = np.abs(hk_product(H, X, K, P) - H[:K, :K] @ X[:K, :P]).max()
        assert err < 1e-10, (K, P, err)
        print(f"K={K} P={P}: ok")


if __name__ == "__main__":
    main()
