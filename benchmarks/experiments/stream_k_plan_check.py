# SPDX-License-Identifier: Apache-2.0
"""Model check of the stream-K plan in `stream-k.patch` (exp/stream-k).

Replays PrefillPos's stream-K walk and stream_k_fixup's indexing in Python for
every Llama-sized plan and checks: each (pair, step) is covered once; a split
pair's owner expects exactly the pieces that count into it; every slot is
written once, by a cluster's first piece; no pair has more than three pieces.

    python3 benchmarks/experiments/stream_k_plan_check.py
"""


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def stream_k_width(pairs: int, steps: int, multiple: int, clusters: int) -> int:
    """As in qtip_prefill.cu."""
    width = multiple * ceil_div(pairs * steps, multiple * clusters)
    whole = ceil_div(pairs, clusters) * steps
    return width if 2 * width >= steps and width + 4 < whole else 0


def check(pairs: int, steps: int, multiple: int, resident: int) -> int | None:
    """The plan's most pieces per split pair, or None where stream-K is off."""
    width = stream_k_width(pairs, steps, multiple, resident)
    if not width:
        return None
    total = pairs * steps
    clusters = ceil_div(total, width)
    assert clusters <= resident, "the spin needs every cluster resident"
    covered = [[0] * steps for _ in range(pairs)]
    arrivals: dict[int, int] = {}
    owned: dict[int, tuple[int, int, list[int]]] = {}
    slots: dict[int, int] = {}
    for c in range(clusters):
        lo, hi = c * width, min(c * width + width, total)
        tile, first = lo // steps, True
        while tile < pairs and tile * steps < hi:
            base = tile * steps
            start, end = max(lo - base, 0), min(hi - base, steps)
            assert start % multiple == 0 and (end % multiple == 0 or end == steps)
            for s in range(start, end):
                covered[tile][s] += 1
            if start > 0 or end < steps:
                owner = base // width
                if start > 0:
                    assert first and c not in slots
                    slots[c] = tile
                    arrivals[owner] = arrivals.get(owner, 0) + 1
                else:
                    assert owner == c and c not in owned
                    last = (base + steps - 1) // width
                    owned[c] = (last - owner, tile, list(range(owner + 1, last + 1)))
            first = False
            tile += 1
    assert all(v == 1 for row in covered for v in row)
    for c, (count, tile, sources) in owned.items():
        assert arrivals.get(c, 0) == count
        assert all(slots[s] == tile for s in sources)
        assert count <= 2
    assert sum(arrivals.values()) == len(slots)
    return max((count for count, _, _ in owned.values()), default=0) + 1


def main() -> None:
    plans = 0
    for m in range(256, 32768 + 1, 256):
        for steps in (16, 32, 64, 86, 172, 224, 448):
            for x_tiles in (1, 2, 3, 4, 8, 32):
                for resident in (60, 64, 66):
                    if check(x_tiles * m // 256, steps, 2, resident) is not None:
                        plans += 1
    print(f"{plans} stream-K plans checked")
    # The kernel tests' plans (tile pairs, steps; 66 clusters on an H200).
    for pairs, steps in ((48, 32), (96, 32), (86, 64), (40, 64), (43, 64)):
        print(f"{pairs} pairs x {steps} steps: {check(pairs, steps, 2, 66)} pieces")


if __name__ == "__main__":
    main()
