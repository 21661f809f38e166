# SPDX-License-Identifier: Apache-2.0
"""Deterministic stream-K for the fused GEMM (NOTES.md "Eighteenth session",
step 1): the pieces each 16-tile row group's k range falls into when the 132
CTAs of an H200 take equal shares of the (group, k-block) work, and what the
output transform would read. Checks the closed form of the piece count against
a walk over the CTAs for every benchmark layer.

Work w = g * nblk + k (group-major). CTA c takes [start(c), start(c + 1)) with
start(c) = c * W // C. Group g spans [g * nblk, (g + 1) * nblk); its first CTA
is the last c with start(c) <= g * nblk, its pieces run from there to the CTA
holding (g + 1) * nblk - 1. Piece j of group g writes partial slot j; the
output transform adds slots 0 .. pieces(g) - 1 of the group's columns in
order (same bits every run)."""

SMS = 132


def first_cta(w: int, W: int, C: int) -> int:
    """The CTA whose share holds work item w: the largest c with
    c * W // C <= w, i.e. (w * C + C - 1) // W when that start is not past
    w, else one less (integer floors)."""
    c = (w * C + C - 1) // W
    return c if c * W // C <= w else c - 1


def pieces_closed(g: int, nblk: int, W: int, C: int) -> int:
    return first_cta((g + 1) * nblk - 1, W, C) - first_cta(g * nblk, W, C) + 1


def pieces_walk(groups: int, nblk: int, C: int) -> list[int]:
    W = groups * nblk
    count = [0] * groups
    for c in range(C):
        lo, hi = c * W // C, (c + 1) * W // C
        for g in range(lo // nblk, (hi - 1) // nblk + 1) if hi > lo else ():
            count[g] += 1
    return count


LAYERS = {  # m x n: 32-row tiles, k blocks of 32 columns
    "14336x4096": (14336 // 32, 4096 // 32),
    "L3 gate_up (2 x 14336)": (2 * 14336 // 32, 4096 // 32),
    "11008x4096": (11008 // 32, 4096 // 32),
    "4096x4096": (4096 // 32, 4096 // 32),
    "4096x14336": (4096 // 32, 14336 // 32),
}


def main() -> None:
    # kq warps share a tile's k range, so a group (unit) has 16 / kq tiles;
    # each piece of a group is one slot of (rows, 512 / kq columns) partials.
    for name, (tiles, nblk) in LAYERS.items():
        for kq in (1, 2, 4):
            groups = -(-tiles // (16 // kq))
            W = groups * nblk
            walk = pieces_walk(groups, nblk, SMS)
            closed = [pieces_closed(g, nblk, W, SMS) for g in range(groups)]
            assert walk == closed, (name, kq)
            print(
                f"{name:24s} kq {kq}: {groups:3d} groups x {nblk:3d} k-blocks, "
                f"{W / SMS:6.1f} group k-steps per CTA, pieces per group "
                f"{min(walk)}-{max(walk)} (mean {sum(walk) / groups:.2f} "
                f"partial slots per output column)"
            )


if __name__ == "__main__":
    main()
