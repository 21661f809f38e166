# SPDX-License-Identifier: Apache-2.0
# CPU model of sylvester64_tiles (qtip_gemm.cu): a tile pair's mma C fragments
# (lane l: rows g, g + 8 of each 16-row half mr, columns 2q, 2q + 1) through
# the epilogue's butterflies must equal H_64 (Sylvester, natural order) times
# the 64 rows, for every batch column.
import numpy as np

rng = np.random.default_rng(0)
Y = rng.standard_normal((64, 8))  # 64 W_hat rows x 8 batch columns
H = np.array([[(-1) ** bin(r & c).count("1") for c in range(64)] for r in range(64)])
ref = H @ Y


def row(t, lane, mr, i):
    return t * 32 + mr * 16 + 8 * (i >> 1) + (lane >> 2)


def col(lane, i):
    return 2 * (lane & 3) + (i & 1)


acc = np.zeros((2, 32, 2, 4))  # [tile][lane][mr][i]
for t in range(2):
    for ln in range(32):
        for mr in range(2):
            for i in range(4):
                acc[t, ln, mr, i] = Y[row(t, ln, mr, i), col(ln, i)]

# row bit 3: c0/c1 against c2/c3
for c in range(2):
    a, b = acc[:, :, :, c].copy(), acc[:, :, :, c + 2].copy()
    acc[:, :, :, c], acc[:, :, :, c + 2] = a + b, a - b
# row bit 4: mr
a, b = acc[:, :, 0, :].copy(), acc[:, :, 1, :].copy()
acc[:, :, 0, :], acc[:, :, 1, :] = a + b, a - b
# row bits 0-2: lanes xor 4, 8, 16 (upper ? other - v : v + other)
for h in (4, 8, 16):
    new = acc.copy()
    for ln in range(32):
        other = acc[:, ln ^ h]
        new[:, ln] = other - acc[:, ln] if ln & h else acc[:, ln] + other
    acc = new
# row bit 5: the tile pair through shared memory
lo, hi = acc[0].copy(), acc[1].copy()
acc[0], acc[1] = lo + hi, lo - hi

err = 0.0
for t in range(2):
    for ln in range(32):
        for mr in range(2):
            for i in range(4):
                err = max(
                    err, abs(acc[t, ln, mr, i] - ref[row(t, ln, mr, i), col(ln, i)])
                )
print("max |epilogue - H_64 Y| =", err)
assert err < 1e-9
