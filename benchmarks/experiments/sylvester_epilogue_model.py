# SPDX-License-Identifier: Apache-2.0
"""CPU model of qtip_gemm.cu's sylvester_tiles (out-sylvester-epilogue.patch).

A block of P / 32 tiles' mma C fragments (lane l: rows g, g + 8 of each
16-row half mr, columns 2q, 2q + 1; g = l / 4, q = l % 4) goes through the
epilogue's butterflies (row bit 3 and 4 in registers, bits 0-2 by lane
shuffles) and the cross-tile signed sums in tile order; the result must equal
H_P (Sylvester, natural order) times the P rows, for every batch column.
"""

import numpy as np


def sylvester(p: int) -> np.ndarray:
    return np.array(
        [[(-1) ** bin(r & c).count("1") for c in range(p)] for r in range(p)]
    )


def epilogue(Y: np.ndarray) -> np.ndarray:
    """Y (P, 8) -> the tiles' sums after sylvester_tiles, as (P, 8)."""
    tiles = Y.shape[0] // 32

    def row(t, ln, mr, i):
        return t * 32 + mr * 16 + 8 * (i >> 1) + (ln >> 2)

    def col(ln, i):
        return 2 * (ln & 3) + (i & 1)

    acc = np.zeros((tiles, 32, 2, 4))  # [tile][lane][mr][i]
    for t in range(tiles):
        for ln in range(32):
            for mr in range(2):
                for i in range(4):
                    acc[t, ln, mr, i] = Y[row(t, ln, mr, i), col(ln, i)]
    for c in range(2):  # row bit 3: c0/c1 against c2/c3
        a, b = acc[..., c].copy(), acc[..., c + 2].copy()
        acc[..., c], acc[..., c + 2] = a + b, a - b
    a, b = acc[:, :, 0, :].copy(), acc[:, :, 1, :].copy()  # row bit 4: mr
    acc[:, :, 0, :], acc[:, :, 1, :] = a + b, a - b
    for h in (4, 8, 16):  # row bits 0-2: lanes xor 4, 8, 16
        new = acc.copy()
        for ln in range(32):
            other = acc[:, ln ^ h]
            new[:, ln] = other - acc[:, ln] if ln & h else acc[:, ln] + other
        acc = new
    out = np.zeros_like(acc)  # tile bits: signed sums in tile order
    for t in range(tiles):
        for j in range(tiles):
            sign = -1.0 if bin(t & j).count("1") & 1 else 1.0
            out[t] += sign * acc[j]
    result = np.zeros_like(Y)
    for t in range(tiles):
        for ln in range(32):
            for mr in range(2):
                for i in range(4):
                    result[row(t, ln, mr, i), col(ln, i)] = out[t, ln, mr, i]
    return result


rng = np.random.default_rng(0)
for p in (64, 128, 256, 512):
    Y = rng.standard_normal((p, 8))
    err = np.abs(epilogue(Y) - sylvester(p) @ Y).max()
    print(f"P = {p}: max |epilogue - H_P Y| = {err:.1e}")
    assert err < 1e-9

# out-sylvester-k1: a power-of-two block of K * 512 is H_K (Sylvester of size
# K) times the 512-point part: column c = k * 512 + p.
for k in (2, 4, 8):
    full = sylvester(k * 512)
    kron = np.kron(sylvester(k), sylvester(512))
    assert (full == kron).all(), k
    print(f"H_{k * 512} = H_{k} (x) H_512: exact")
