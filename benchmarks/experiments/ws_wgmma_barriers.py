# SPDX-License-Identifier: Apache-2.0
"""Random-interleaving simulation of qtip_ws_kernel's named-barrier protocol
(exp/ws-wgmma b5fdcc0, qtip_wgmma.cu lines 160-253).

Warps are generators of ops; the hardware barrier model follows the PTX text:
each warp's bar.sync / bar.arrive adds 32 arrivals, the thread count must be
the same for every arrival of one generation, the barrier completes (and
resets) when the count is reached, sync waits for completion, arrive does not.

Checks:
  * no deadlock (some warp runnable until all finished);
  * every completed generation got exactly its count of arrivals (ALL / the producers')
    and every arrival lands in the generation its role intends (a warp never
    arrives twice at one generation: the PTX 'care must be taken' rule);
  * no barrier is left with a partial count at the end;
  * wgmma reads: a group issued at step j reads stage j % S until it is
    retired by a wgmma.wait_group in the consumer's program order; a producer
    write to a stage while a non-retired group reads it is a hazard; when the
    consumer issues step j every producer warp's last write to stage j % S
    must be step j's.
"""

import os
import random
import sys

# WS_PRODUCERS=8: exp/ws-wgmma (4 stages); 16 (default): exp/ws-wgmma16 (3).
# WS_RELEASE=now: exp/ws-wgmma16-early (the consumer waits for its own
# wgmmas, wait_group 0, and hands the stage back in the same step).
NPROD, NCONS = int(os.environ.get("WS_PRODUCERS", "16")), 4  # warps
RELEASE_NOW = os.environ.get("WS_RELEASE") == "now"
S = 4 if NPROD == 8 else 3  # kWsStages
FULL, EMPTY, LUT = 1, 1 + S, 1 + 2 * S
ALL = 32 * (NPROD + NCONS)


class Bar:
    def __init__(self):
        self.count = 0
        self.expected = None
        self.waiting = []
        self.gen = 0
        self.log = []  # arrivals per completed generation


def producer(w, steps):
    yield ("sync", LUT, 32 * NPROD, None)
    # wait_for_producer / allow_dependents: no barrier effect
    for j in range(steps):
        s = j % S
        if j >= S:
            yield ("sync", EMPTY + s, ALL, (j - S) // S)
        yield ("write", s, j)
        yield ("arrive", FULL + s, ALL, j // S)


def consumer(w, steps):
    for j in range(steps):
        s = j % S
        yield ("sync", FULL + s, ALL, j // S)
        yield ("issue", s, j)  # wgmma.fence, 8 wgmma, commit_group
        if RELEASE_NOW:
            yield ("wait", 0)  # wgmma.wait_group 0
            if j + S < steps:
                yield ("arrive", EMPTY + s, ALL, j // S)
            continue
        yield ("wait", 1)  # wgmma.wait_group 1
        if j >= 1 and j - 1 + S < steps:
            yield ("arrive", EMPTY + (j - 1) % S, ALL, (j - 1) // S)
    yield ("wait", 0)


def barrier_op(bars, blocked, errors, w, op, steps, seed):
    """bar.sync / bar.arrive by one warp (32 threads): counts, generations,
    waiters; records count mismatches, wrong generations and over-arrivals."""
    kind, bid, cnt, intended = op
    b = bars[bid]
    if b.count == 0:
        b.expected = cnt
    elif b.expected != cnt:
        errors.append(f"count mismatch bar {bid}")
    if intended is not None and intended != b.gen:
        errors.append(
            f"steps={steps} seed={seed}: warp {w} {kind} bar {bid} "
            f"intended gen {intended}, hardware gen {b.gen}"
        )
    b.count += 32
    if kind == "sync":
        b.waiting.append(w)
        blocked.add(w)
    if b.count == b.expected:
        b.log.append(b.count)
        for x in b.waiting:
            blocked.discard(x)
        b.waiting = []
        b.count = 0
        b.gen += 1
    elif b.count > b.expected:
        errors.append(f"over-arrival bar {bid}")


def ops(warps, bars, rng, errors, steps, seed):
    """Runs random runnable warps until all finish or none can run (a
    deadlock, recorded): applies their bar.sync / bar.arrive and yields every
    other operation as (warp, op)."""
    blocked, done = set(), set()
    while len(done) < len(warps):
        runnable = [w for w in warps if w not in blocked and w not in done]
        if not runnable:
            errors.append(
                f"DEADLOCK steps={steps} seed={seed}: blocked={sorted(blocked)}"
            )
            return
        w = rng.choice(runnable)
        try:
            op = next(warps[w])
        except StopIteration:
            done.add(w)
            continue
        if op[0] in ("sync", "arrive"):
            barrier_op(bars, blocked, errors, w, op, steps, seed)
        else:
            yield w, op


def run(steps, seed):
    rng = random.Random(seed)
    bars = {i: Bar() for i in range(16)}
    warps = {}
    for w in range(NCONS):
        warps[w] = consumer(w, steps)
    for w in range(NCONS, NCONS + NPROD):
        warps[w] = producer(w, steps)
    stage_tag = {(s, w): None for s in range(S) for w in range(NCONS, NCONS + NPROD)}
    # per consumer warp: pending (unretired) groups as list of (step, stage)
    pending = {w: [] for w in range(NCONS)}
    # The async reads belong to the warpgroup: a group is retired only once
    # every consumer warp has passed the wait that retires it (the wgmma
    # instructions are .sync.aligned over the warpgroup, but the
    # conservative union of the four warps' views is what is modelled).
    errors = []

    def unretired_reading(s):
        return [(w, g) for w in pending for g in pending[w] if g[1] == s]

    for w, op in ops(warps, bars, rng, errors, steps, seed):
        kind = op[0]
        if kind == "write":
            _, s, j = op
            rd = unretired_reading(s)
            if rd:
                errors.append(
                    f"HAZARD steps={steps} seed={seed}: producer warp {w} writes "
                    f"stage {s} for step {j} while groups {rd} may read it"
                )
            stage_tag[(s, w)] = j
        elif kind == "issue":
            _, s, j = op
            tags = [stage_tag[(s, p)] for p in range(NCONS, NCONS + NPROD)]
            if any(t != j for t in tags):
                errors.append(
                    f"STALE steps={steps} seed={seed}: consumer warp {w} step {j} "
                    f"sees stage {s} tags {tags}"
                )
            pending[w].append((j, s))
        elif kind == "wait":
            n = op[1]
            while len(pending[w]) > n:
                pending[w].pop(0)
    for bid, b in bars.items():
        if b.count != 0:
            errors.append(
                f"steps={steps} seed={seed}: bar {bid} left with {b.count} arrivals"
            )
        for c in b.log:
            if c != b.expected:
                errors.append(f"bar {bid} generation with {c} arrivals")
    gens = {bid: bars[bid].gen for bid in bars if bars[bid].gen}
    return errors, gens


def main():
    total_err = 0
    seeds = int(sys.argv[1]) if len(sys.argv) > 1 else 300
    for steps in range(1, 21):
        for seed in range(seeds):
            errs, gens = run(steps, seed)
            if errs:
                total_err += len(errs)
                for e in errs[:5]:
                    print(e)
        # expected generations: full(s) = #steps with j%S==s;
        # empty(s) = #steps J>=S with J%S==s; LUT 1
        exp = {}
        for j in range(steps):
            exp[FULL + j % S] = exp.get(FULL + j % S, 0) + 1
            if j >= S:
                exp[EMPTY + j % S] = exp.get(EMPTY + j % S, 0) + 1
        exp[LUT] = 1
        errs, gens = run(steps, 12345)
        status = "ok" if gens == exp else f"MISMATCH {gens} vs {exp}"
        print(f"steps={steps:2d}: generations {gens} {status}")
    print("errors:", total_err)


if __name__ == "__main__":
    main()
