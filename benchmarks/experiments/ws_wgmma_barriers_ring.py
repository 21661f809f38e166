# SPDX-License-Identifier: Apache-2.0
"""barrier_sim for the branch head 6b86bac: producers claim stage (j+1)%S
(empty barrier) and issue step j+1's x~ cp.async group before decoding step j;
cp.async.wait_group 1 before the full-barrier arrive.  A and B parts of a
stage are tracked separately; a cp.async group's data counts as landed only
once a wait_group retires it in the producer's program order."""

import random
import sys

import ws_wgmma_barriers as bs

S, FULL, EMPTY, LUT, ALL = bs.S, bs.FULL, bs.EMPTY, bs.LUT, bs.ALL


def producer_v2(w, steps):
    yield ("sync", LUT, 32 * bs.NPROD, None)
    if steps > 0:
        yield ("writeB", 0, 0)
        yield ("commit",)
    for j in range(steps):
        r = j % S
        r1 = (j + 1) % S
        if j + 1 < steps:
            if j + 1 >= S:
                yield ("sync", EMPTY + r1, ALL, (j + 1 - S) // S)
            yield ("writeB", r1, j + 1)
            yield ("commit",)
        else:
            yield ("commit",)  # empty group
        yield ("writeA", r, j)
        yield ("cpwait", 1)
        yield ("arrive", FULL + r, ALL, j // S)


def run(steps, seed):
    rng = random.Random(seed)
    bars = {i: bs.Bar() for i in range(16)}
    warps = {w: bs.consumer(w, steps) for w in range(bs.NCONS)}
    for w in range(bs.NCONS, bs.NCONS + bs.NPROD):
        warps[w] = producer_v2(w, steps)
    errors = []
    tagA = {}
    tagB = {}
    pend_wg = {w: [] for w in range(bs.NCONS)}
    cp_groups = {
        w: [] for w in range(bs.NCONS, bs.NCONS + bs.NPROD)
    }  # committed groups: list of lists of (stage, step)
    cp_open = {w: [] for w in range(bs.NCONS, bs.NCONS + bs.NPROD)}

    def unretired(s):
        return [(w, g) for w in pend_wg for g in pend_wg[w] if g[1] == s]

    for w, op in bs.ops(warps, bars, rng, errors, steps, seed):
        k = op[0]
        if k == "writeA":
            _, s, j = op
            if unretired(s):
                errors.append(
                    f"HAZARD A steps={steps} seed={seed} stage {s} step {j}: {unretired(s)}"
                )
            tagA[(s, w)] = j
        elif k == "writeB":
            _, s, j = op
            if unretired(s):
                errors.append(
                    f"HAZARD B steps={steps} seed={seed} stage {s} step {j}: {unretired(s)}"
                )
            tagB[(s, w)] = None  # in flight: contents undefined
            cp_open[w].append((s, j))
        elif k == "commit":
            cp_groups[w].append(cp_open[w])
            cp_open[w] = []
        elif k == "cpwait":
            n = op[1]
            while len(cp_groups[w]) > n:
                for s, j in cp_groups[w].pop(0):
                    tagB[(s, w)] = j
        elif k == "issue":
            _, s, j = op
            ta = [tagA.get((s, p)) for p in range(bs.NCONS, bs.NCONS + bs.NPROD)]
            tb = [tagB.get((s, p)) for p in range(bs.NCONS, bs.NCONS + bs.NPROD)]
            if any(t != j for t in ta + tb):
                errors.append(
                    f"STALE steps={steps} seed={seed} step {j}: A {ta} B {tb}"
                )
            pend_wg[w].append((j, s))
        elif k == "wait":
            while len(pend_wg[w]) > op[1]:
                pend_wg[w].pop(0)
    for bid, b in bars.items():
        if b.count:
            errors.append(f"steps={steps}: bar {bid} left with {b.count}")
    return errors


if __name__ == "__main__":
    seeds = int(sys.argv[1]) if len(sys.argv) > 1 else 200
    tot = 0
    for steps in range(1, 21):
        e = []
        for seed in range(seeds):
            e += run(steps, seed)
        tot += len(e)
        print(f"steps={steps:2d}: {len(e)} errors", e[:2])
    print("errors:", tot)
