# SPDX-License-Identifier: Apache-2.0
"""numpy model of qtip_hadamard_cluster_kernel's index math (exp/cluster-hadamard):
each of the C CTAs of a cluster transforms its slice, then the cluster finishes
the block as the kernel does; compared with the dense (H_K kron S_P) / sqrt(b)."""

import numpy as np

C = 8


def sylvester(n: int) -> np.ndarray:
    h = np.ones((1, 1))
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h


def local_stages(v: np.ndarray, log2_run: int) -> np.ndarray:
    """Stages 0 .. log2_run - 1 on each 2^log2_run-long run of v."""
    run = 1 << log2_run
    return (v.reshape(-1, run) @ sylvester(run).T).reshape(-1)


def cluster_transform(
    x: np.ndarray, had: np.ndarray | None, transpose: bool, ksplit: int
) -> np.ndarray:
    b = x.size
    K = 1 if had is None else had.shape[0]
    P = b // K
    log2P = P.bit_length() - 1
    H = None if had is None else (had.T if transpose else had)
    y = np.full(b, np.nan)
    if K == 1:
        L, part = b // C, b // C // C
        slices = [local_stages(x[c * L : (c + 1) * L], log2P - 3) for c in range(C)]
        for rank in range(C):
            for g in range(part // 8):
                i0 = rank * part + g * 8
                v = np.stack([slices[c][i0 : i0 + 8] for c in range(C)])  # (C, 8)
                v = sylvester(C) @ v  # butterflies<C> over c
                for c in range(C):
                    y[c * L + i0 : c * L + i0 + 8] = v[c]
    else:

        def k_lo(c):
            return c * K // C

        slices = [
            local_stages(x[k_lo(c) * P : k_lo(c + 1) * P], log2P) for c in range(C)
        ]
        F = np.empty(b)
        for q in range(b // 4):
            k = q * 4 // P
            owner = ((k + 1) * C - 1) // K
            assert k_lo(owner) <= k < k_lo(owner + 1)
            off = (k - k_lo(owner)) * P + q * 4 % P
            F[q * 4 : q * 4 + 4] = slices[owner][off : off + 4]
        rc_pad = ((K + C - 1) // C + 7) // 8 * 8
        for rank in range(C):
            lo, hi = k_lo(rank), k_lo(rank + 1)
            M = np.zeros((K, rc_pad))
            for r in range(lo, hi):
                M[:, r - lo] = H[r, :]
            pairs = P // 2
            items = rc_pad // 8 * pairs
            for it in range(items):
                sub, p = it // pairs, it % pairs * 2
                if lo + sub * 8 >= hi:
                    continue
                acc = np.zeros((8, 2))
                for ks in range(ksplit):  # added in k-range order
                    for k in range(K * ks // ksplit, K * (ks + 1) // ksplit):
                        acc += np.outer(
                            M[k, sub * 8 : sub * 8 + 8], F[k * P + p : k * P + p + 2]
                        )
                for r in range(8):
                    rr = lo + sub * 8 + r
                    if rr >= hi:
                        break
                    y[rr * P + p : rr * P + p + 2] = acc[r]
    return y / np.sqrt(b)


def main() -> None:
    rng = np.random.default_rng(0)
    cases = [(4096, None), (1024, None), (512, None), (16384, None)]
    for K, P in ((172, 64), (28, 512), (12, 128), (20, 256), (52, 128), (36, 64)):
        h = rng.choice([-1.0, 1.0], size=(K, K))  # any matrix checks the indexing
        cases.append((K * P, h))
    for b, had in cases:
        for transpose in (False, True):
            x = rng.standard_normal(b)
            K = 1 if had is None else had.shape[0]
            dense = (
                sylvester(b)
                if had is None
                else np.kron(had.T if transpose else had, sylvester(b // K))
            )
            ref = dense @ x / np.sqrt(b)
            for ksplit in (1, 3, 5):
                y = cluster_transform(x, had, transpose, ksplit)
                err = np.abs(y - ref).max() / np.abs(ref).max()
                assert err < 1e-12, (b, K, transpose, ksplit, err)
        print(f"b={b} K={1 if had is None else had.shape[0]}: ok")


if __name__ == "__main__":
    main()
