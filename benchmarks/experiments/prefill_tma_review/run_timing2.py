# SPDX-License-Identifier: Apache-2.0
# ruff: noqa: E501, E741, UP031, SIM115, E701, E702, E731, UP028, SIM223
# Review model of prefill-tma.patch (twenty-second session, CPU only).
# Unfixed vs fixed protocol with GPU-like relative costs: decode of a 32x32 block
# (DEC ticks per step per warp) >> wgmma retire and copy latency; consumers idle
# for an epilogue of EPI ticks between tiles. Counts stage reads that saw B/A data
# of another step, split into the first 3 steps of a tile vs the rest.
import collections
import random
import re
import sys

sys.path.insert(0, "/tmp/tma_hunt")
import sim_phys as S

S.PHYSICAL[0] = True
DEC, COPY, MMA, EPI = 12, 8, 3, 60


class T(S.Sim):
    def issue_copy(s, kind, slot, step, k, nbytes):
        super().issue_copy(kind, slot, step, k, nbytes)
        s.dma[-1][0] = s.now + s.rng.randint(COPY // 2, COPY)


def patch_gen(s):
    orig_prod = s.producer

    def producer(w, **kw):
        g = orig_prod(w, **kw)
        # insert a decode delay after each tempty arrival point: crude: slow every yield
        for x in g:
            yield x

    return producer


def run(fix, tiles, steps, seeds):
    where = collections.Counter()
    bad_runs = 0
    hard = collections.Counter()
    for seed in range(seeds):
        rng = random.Random(seed)
        s = T(tiles, steps, rng, fix=fix, delay=MMA)
        s.epi_lo, s.epi_hi = EPI // 2, EPI
        s.hw_window = True
        S.SOFT.clear()
        agents = {
            "DMA": s.dma_agent(),
            "T0": s.producer(0, is_t0=True),
            "R0": s.producer(0, is_r0=True),
        }
        for w in range(1, 8):
            agents[f"W{w}"] = s.producer(w)
        for c in range(8):
            agents[f"C{c}"] = s.consumer(c)
        # producers: each resume costs ~DEC/6 ticks (about 6 yields per step); jitter per warp
        cost = {
            k: (max(1, int(DEC / 6 * rng.uniform(0.8, 1.25))) if k[0] in "WTR" else 1)
            for k in agents
        }
        nextt = {k: 0 for k in agents}
        live = dict(agents)
        try:
            while len(live) > 1:
                s.now += 1
                if s.now > 300000:
                    raise S.Bug("deadlock")
                for k in list(live):
                    if s.now < nextt[k]:
                        continue
                    nextt[k] = s.now + cost[k]
                    try:
                        next(live[k])
                    except StopIteration:
                        del live[k]
        except S.Bug as e:
            hard[re.sub(r"\d+", "#", str(e))[:80]] += 1
        bad = [
            m
            for m in S.SOFT
            if m.startswith("C") and ("done for step" in m or "changed under" in m)
        ]
        if bad:
            bad_runs += 1
        for m in set(bad):
            st = int(re.search(r"step (\d+)", m).group(1))
            where["first 3 steps of a tile" if st % steps < 3 else "other steps"] += 1
    print(
        f"fix={fix} tiles/CTA={tiles} steps={steps}: runs with corrupted stage reads {bad_runs}/{seeds} {dict(where)} hard={dict(hard)}"
    )


for fix in (False, True):
    for tiles in (1, 2, 3):
        run(fix, tiles, 12, 150)
