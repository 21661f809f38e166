# SPDX-License-Identifier: Apache-2.0
# ruff: noqa: E501, E741, UP031, SIM115
# Review models of prefill-rs.patch (twenty-second session, CPU only).
import random

M = 0xFFFFFFFF


def bp(x, y, s):
    b = [(x >> (8 * i)) & 255 for i in range(4)] + [
        (y >> (8 * i)) & 255 for i in range(4)
    ]
    return sum(b[(s >> (4 * i)) & 7] << (8 * i) for i in range(4))


def addr(s, lane):  # SignedLut<32>::lookup address
    v = (s * s + s) & M
    return ((v << 1) & 0x1FF80) | (lane << 2)


def shfl(vals):
    return [vals[(l + 1) & 31] for l in range(32)]


def decode_block(K, W):  # W[lane] = list of K words ; returns [lane][i][j] addresses
    out = [[[None] * 4 for _ in range(4)] for _ in range(32)]
    if K == 2:
        n0 = shfl([W[l][0] for l in range(32)])
        n1 = shfl([W[l][1] for l in range(32)])
        for l in range(32):
            w = W[l]
            hi = [
                bp(w[0], n0[l], 0x1054),
                bp(w[0], n0[l], 0x3276),
                bp(w[1], n1[l], 0x1054),
                bp(w[1], n1[l], 0x3276),
            ]
            for i in range(4):
                out[l][i][0] = addr((hi[i] >> 16) if i & 1 else w[i >> 1], l)
                for j in range(1, 4):
                    out[l][i][j] = addr(hi[i] >> (16 - 4 * j), l)
    elif K == 3:
        S = [
            [w[0], bp(w[0], w[1], 0x0543), bp(w[1], w[2], 0x0432), w[2] >> 8] for w in W
        ]
        q0 = shfl([bp(s[0], s[1], 0x6521) for s in S])
        q1 = shfl([bp(s[2], s[3], 0x6521) for s in S])
        for l in range(32):
            n = [q0[l], q1[l]]
            for i in range(4):
                o = 2 * (i & 1)
                hi = bp(S[l][i], n[i >> 1], 0x2100 | (5 + o))
                g = bp(S[l][i], n[i >> 1], ((5 + o) << 4) | (4 + o))
                out[l][i] = [
                    addr(hi >> 16, l),
                    addr(hi >> 10, l),
                    addr(hi >> 4, l),
                    addr(g >> 6, l),
                ]
    else:
        np_ = shfl(
            [bp(bp(w[0], w[1], 0x0073), bp(w[2], w[3], 0x0073), 0x5410) for w in W]
        )
        for l in range(32):
            w = W[l]
            for i in range(4):
                out[l][i] = [
                    addr(w[i] >> 16, l),
                    addr(w[i] >> 8, l),
                    addr(w[i], l),
                    addr(bp(w[i], np_[l], 0x2104 + i), l),
                ]
    return out


def decode_half(K, W, mr, lookup=addr):  # lookup(state, lane)
    out = [[[None] * 4 for _ in range(2)] for _ in range(32)]
    if K == 2:
        n0 = shfl([W[l][0] for l in range(32)])
        n1 = shfl([W[l][1] for l in range(32)])
        sel = 0x3276 if mr else 0x1054
        for l in range(32):
            hi = [bp(W[l][0], n0[l], sel), bp(W[l][1], n1[l], sel)]
            for kc in range(2):
                for j in range(4):
                    out[l][kc][j] = lookup(hi[kc] >> (16 - 4 * j), l)
    elif K == 3:
        S = [
            [w[0], bp(w[0], w[1], 0x0543), bp(w[1], w[2], 0x0432), w[2] >> 8] for w in W
        ]
        q0 = shfl([bp(s[0], s[1], 0x6521) for s in S])
        q1 = shfl([bp(s[2], s[3], 0x6521) for s in S])
        o = 2 * mr
        for l in range(32):
            n = [q0[l], q1[l]]
            for kc in range(2):
                seg = S[l][2 * kc + 1] if mr else S[l][2 * kc]
                hi = bp(seg, n[kc], 0x2100 | (5 + o))
                g = bp(seg, n[kc], ((5 + o) << 4) | (4 + o))
                out[l][kc] = [
                    lookup(hi >> 16, l),
                    lookup(hi >> 10, l),
                    lookup(hi >> 4, l),
                    lookup(g >> 6, l),
                ]
    else:
        np_ = shfl(
            [bp(bp(w[0], w[1], 0x0073), bp(w[2], w[3], 0x0073), 0x5410) for w in W]
        )
        for l in range(32):
            for kc in range(2):
                i = 2 * kc + mr
                seg = W[l][2 * kc + 1] if mr else W[l][2 * kc]
                out[l][kc] = [
                    lookup(seg >> 16, l),
                    lookup(seg >> 8, l),
                    lookup(seg, l),
                    lookup(bp(seg, np_[l], 0x2104 + i), l),
                ]
    return out


def spec(K, W):
    # header: per lane, tiles i=kc*2+mr each K bytes (little-endian int, MSB = first stream bit);
    # lane segment = 8K bits; state t window = 16 bits from stream bit 2Kt (circular); lane l owns states 4l..4l+3
    allb = [b for l in range(32) for w in W[l] for b in w.to_bytes(4, "little")]
    out = [[[None] * 4 for _ in range(4)] for _ in range(32)]
    for i in range(4):
        segs = []
        for l in range(32):
            by = allb[l * 4 * K + i * K : l * 4 * K + (i + 1) * K]
            segs.append(int.from_bytes(bytes(by), "little"))
        bits = "".join(format(s, "0%db" % (8 * K)) for s in segs)
        L = len(bits)
        for l in range(32):
            for j in range(4):
                t = 4 * l + j
                st = 2 * K * t
                win = int("".join(bits[(st + b) % L] for b in range(16)), 2)
                out[l][i][j] = addr(win, l)
    return out


def main():
    random.seed(1)
    for K in (2, 3, 4):
        bad = badspec = 0
        for trial in range(300):
            W = [[random.getrandbits(32) for _ in range(K)] for _ in range(32)]
            if trial == 0:
                W = [[M] * K for _ in range(32)]
            if trial == 1:
                W = [[0] * K for _ in range(32)]
            B = decode_block(K, W)
            S = spec(K, W)
            for mr in (0, 1):
                H = decode_half(K, W, mr)
                for l in range(32):
                    for kc in range(2):
                        if H[l][kc] != B[l][kc * 2 + mr]:
                            bad += 1
            for l in range(32):
                if B[l] != S[l]:
                    badspec += 1
        print(
            f"K={K}: decode_half != decode_block (lane,kc,mr) mismatches: {bad}; decode_block != header spec lanes: {badspec}"
        )


if __name__ == "__main__":
    main()
