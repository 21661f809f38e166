# SPDX-License-Identifier: Apache-2.0
"""Interleaving model of qtip_prefill_kernel (exp/prefill-mc-helpers).

One cluster of 2 CTAs. Per CTA: producer (warp 0 lane 0), 3 helper warps,
8 consumer warps. Warps are generators yielding ('wait', pred, info) or
('step',). TMA multicast deliveries are asynchronous events. The scheduler
picks a random runnable item; no runnable item while work remains = deadlock.
Checks: mbarrier parity aliasing, stage read before fill / overwrite before
release, A-stage contents (tile, step, half-unit), LUT shard at each lookup,
trellis (tile, step) of every decode, named-barrier / cluster-barrier matching.
"""
import random, sys

class Fail(Exception):
    pass

def check(c, msg):
    if not c:
        raise Fail(msg)

class Mbar:
    def __init__(s, name, count):
        s.name, s.count, s.pending, s.tx, s.k = name, count, count, 0, 0
    def _maybe(s):
        if s.pending == 0 and s.tx == 0:
            s.k += 1; s.pending = s.count; s.tx = 0
    def arrive(s, n=1):
        check(s.pending >= n, f"{s.name}: too many arrivals")
        s.pending -= n; s._maybe()
    def expect_tx(s, b):
        s.tx += b
    def complete_tx(s, b):
        s.tx -= b; s._maybe()
    def ready(s, parity):  # try_wait.parity
        return (s.k & 1) != parity

class Named:  # barrier.sync 1, 352 (11 warps)
    def __init__(s, warps):
        s.warps, s.n, s.gen = warps, 0, 0
    def arrive(s):
        g = s.gen; s.n += 1
        if s.n == s.warps: s.n = 0; s.gen += 1
        return g

# ---------------------------------------------------------------- config
S = 4          # kPfStages
AST = 2        # kPfAStages
EVERY = 4      # kPfHelperEvery
HW = 3         # helper warps
UNITS = 16
RING = 3
RINGH = 2
STAGE_BYTES = 32768

class Pos:
    """PrefillPos over a list of tiles (indices into cta tile list)."""
    def __init__(s, sim, c, ti=0, step=0):
        s.sim, s.c, s.ti, s.step = sim, c, ti, step
    def copy(s):
        return Pos(s.sim, s.c, s.ti, s.step)
    def valid(s):
        return s.ti < s.sim.ntiles
    def advance(s):
        s.step += 1
        if s.step == s.sim.steps:
            s.ti += 1; s.step = 0
    def shard(s):
        return s.sim.shards[s.c][s.ti]
    def key(s):
        return (s.ti, s.step)

class Sim:
    def __init__(s, steps, ntiles, shards, rng, mut=None):
        s.steps, s.ntiles, s.shards, s.rng, s.mut = steps, ntiles, shards, rng, mut or set()
        s.cta = []
        for c in range(2):
            d = dict(
                full=[Mbar(f"c{c}.full{i}", 1) for i in range(S)],
                empty=[Mbar(f"c{c}.empty{i}", 16) for i in range(S)],
                afull=[Mbar(f"c{c}.afull{i}", UNITS * 32) for i in range(AST)],
                aempty=[Mbar(f"c{c}.aempty{i}", 256) for i in range(AST)],
                stage=[[None, None] for _ in range(S)],   # iteration per half
                readers=[set() for _ in range(S)],        # (cw, it) in flight
                consumed=[[-1] * 8 for _ in range(S)],    # last it retired per warp
                astage=[[None] * UNITS for _ in range(AST)],
                aloaded=[[-1] * 8 for _ in range(AST)],   # last hs loaded per warp
                lut=[None] * 8,                           # portions (by filler warp)
                bar1=Named(11),
            )
            s.cta.append(d)
        s.events = []     # pending TMA deliveries
        s.cluster_arrived = 0
        s.nwarps = 2 * 12
        s.walk = [(t, st) for t in range(ntiles) for st in range(steps)]

    # ---- helpers
    def lut_check(s, c, shard, who):
        check(all(p == shard for p in s.cta[c]['lut']),
              f"{who}: LUT lookup for shard {shard} sees {s.cta[c]['lut']}")

    def wait_mbar(s, bar, parity, target, who):
        # target = index of the phase that must have completed
        def pred():
            if bar.k > target + 1:
                raise Fail(f"{who}: {bar.name} waiter 2 phases behind (k={bar.k}, target={target})")
            return bar.ready(parity)
        yield ('wait', pred, who)
        check(bar.k == target + 1, f"{who}: {bar.name} passed at k={bar.k}, wanted {target + 1}")

    def use_codebook(s, c, st, shard, who, filler):
        if shard == st['lut_shard']:
            return
        st['lut_shard'] = shard
        b = s.cta[c]['bar1']
        g = b.arrive(); yield ('wait', lambda: b.gen > g, who + " lut_sync1")
        if filler is not None:
            s.cta[c]['lut'][filler] = 'garbage'; yield ('step',)
            s.cta[c]['lut'][filler] = shard; yield ('step',)
        if 'skip_second_sync' not in s.mut:
            g = b.arrive(); yield ('wait', lambda: b.gen > g, who + " lut_sync2")

    def cluster_sync(s, who):
        s.cluster_arrived += 1
        yield ('wait', lambda: s.cluster_arrived == s.nwarps, who + " cluster_sync")

    # ---- roles
    def producer(s, c):
        who = f"c{c}.prod"
        D = s.cta[c]
        if s.ntiles > 0:
            pos = Pos(s, c)
            it = 0
            while pos.valid():
                slot = it % S
                if it >= S:
                    yield from s.wait_mbar(D['empty'][slot], ((it // S) + 1) & 1, it // S - 1, who)
                check(D['full'][slot].k == it // S, f"{who}: full phase {D['full'][slot].k} != {it // S}")
                D['full'][slot].expect_tx(STAGE_BYTES); D['full'][slot].arrive()
                for dst in range(2):
                    s.events.append((dst, slot, c, it))
                yield ('step',)
                pos.advance(); it += 1
        yield from s.cluster_sync(who)

    def deliver(s, ev):
        dst, slot, half, it = ev
        D = s.cta[dst]
        check(not D['readers'][slot], f"TMA it={it} into c{dst} slot {slot} while wgmma reads {D['readers'][slot]}")
        if it >= S:
            check(all(x >= it - S for x in D['consumed'][slot]),
                  f"TMA it={it} into c{dst} slot {slot} before release: {D['consumed'][slot]}")
        check(D['full'][slot].k == it // S, f"complete_tx it={it} lands on c{dst} full{slot} phase {D['full'][slot].k}")
        D['stage'][slot][half] = it
        D['full'][slot].complete_tx(STAGE_BYTES // 2)

    def helper(s, c, j):
        who = f"c{c}.helper{j}"
        D = s.cta[c]
        st = {'lut_shard': -1}
        if s.ntiles > 0:
            def advance(p):
                p['u'] += HW
                if p['u'] >= UNITS:
                    p['u'] -= UNITS; p['hs'] += 1
                    for _ in range(EVERY): p['pos'].advance()
            cur = {'pos': Pos(s, c), 'u': j, 'hs': 0}
            far = {'pos': cur['pos'].copy(), 'u': cur['u'], 'hs': cur['hs']}
            ring = [None] * RINGH
            def words(p):
                return (p['pos'].ti, p['pos'].step, p['u'])
            for i in range(RINGH):
                if far['pos'].valid(): ring[i] = words(far)
                far['pos'] = far['pos']; advance(far)
            while cur['pos'].valid():
                for r in range(RINGH):
                    if not cur['pos'].valid(): break
                    if 'helper_no_codebook' not in s.mut:
                        yield from s.use_codebook(c, st, cur['pos'].shard(), who, None)
                    hs = cur['hs']; slot = hs % AST; use = hs // AST
                    if use > 0:
                        par = (use - 1) & 1
                        if 'aempty_parity' in s.mut: par ^= 1
                        yield from s.wait_mbar(D['aempty'][slot], par, use - 1, who)
                    u = cur['u']; h = u >> 1
                    check(ring[r] == (cur['pos'].ti, cur['pos'].step, u),
                          f"{who}: ring has {ring[r]} for {(cur['pos'].ti, cur['pos'].step, u)}")
                    check(cur['pos'].step % EVERY == 0, f"{who}: helper on step {cur['pos'].step}")
                    s.lut_check(c, cur['pos'].shard(), who)
                    # overwrite check: warp h must have loaded hs - 2
                    if hs >= AST:
                        check(D['aloaded'][slot][h] >= hs - AST,
                              f"{who}: A stage {slot} unit {u} overwritten (hs={hs}) before warp {h} loaded hs={hs - AST}")
                    D['astage'][slot][u] = (hs, cur['pos'].ti, cur['pos'].step)
                    yield ('step',)
                    D['afull'][slot].arrive(32)
                    if far['pos'].valid(): ring[r] = words(far)
                    advance(far); advance(cur)
                    yield ('step',)
        yield from s.cluster_sync(who)

    def consumer(s, c, cw):
        who = f"c{c}.cons{cw}"
        D = s.cta[c]
        st = {'lut_shard': -1}
        if s.ntiles > 0:
            cur = Pos(s, c)
            def advance_own(p):
                while True:
                    p.advance()
                    if not (p.valid() and p.step % EVERY == 0): break
            far = cur.copy(); advance_own(far)
            ring = [None] * RING
            for i in range(RING):
                if far.valid(): ring[i] = far.key()
                advance_own(far)
            state = dict(slot=0, phase=0, prev=0, aslot=0, aphase=0, it=0, hs=0)
            afrag = [None, None]
            inflight = []   # (slot, it, buf)
            def write_af(b, tag):
                check(all(x[2] != b for x in inflight), f"{who}: afrag[{b}] rewritten while a wgmma reads it")
                afrag[b] = tag
            def retire(keep):
                while len(inflight) > keep:
                    sl, it_, b = inflight.pop(0)
                    D['readers'][sl].discard((cw, it_))
                    D['consumed'][sl][cw] = it_
            def mma_step(b, first, key):
                slot, phase = state['slot'], state['phase']
                it = state['it']
                yield from s.wait_mbar(D['full'][slot], phase, it // S, who)
                check(D['stage'][slot] == [it, it], f"{who}: reads stage {slot} = {D['stage'][slot]}, wants it={it}")
                check(s.walk[it] == key, f"{who}: x~ iteration {it} is {s.walk[it]}, step is {key}")
                check(afrag[b] == key, f"{who}: afrag[{b}] holds {afrag[b]} for step {key}")
                D['readers'][slot].add((cw, it)); inflight.append((slot, it, b))
                yield ('step',)
                retire(1)   # wgmma.wait_group 1
                if 'release_current' in s.mut:
                    for r in range(2):
                        s.cta[r]['empty'][slot].arrive()
                elif not first:
                    for r in range(2):
                        s.cta[r]['empty'][state['prev']].arrive()
                state['prev'] = slot
                state['slot'] += 1; state['it'] += 1
                if state['slot'] == S:
                    state['slot'] = 0; state['phase'] ^= 1
                yield ('step',)
            def decode_step(ri, b, key):
                nonlocal far
                check(ring[ri] == key, f"{who}: ring[{ri}] holds {ring[ri]} for own step {key}")
                s.lut_check(c, s.shards[c][key[0]], who)
                write_af(b, key)
                if far.valid(): ring[ri] = far.key()
                advance_own(far)
                yield ('step',)
            def load_helper_step(b, key):
                aslot = state['aslot']; hs = state['hs']
                yield from s.wait_mbar(D['afull'][aslot], state['aphase'], hs // AST, who)
                for u in (2 * cw, 2 * cw + 1):
                    check(D['astage'][aslot][u] == (hs, key[0], key[1]),
                          f"{who}: A stage {aslot} unit {u} = {D['astage'][aslot][u]}, wants {(hs,) + key}")
                write_af(b, key)
                D['aloaded'][aslot][cw] = hs
                D['aempty'][aslot].arrive(32)
                state['hs'] += 1; state['aslot'] += 1
                if state['aslot'] == AST:
                    state['aslot'] = 0; state['aphase'] ^= 1
                yield ('step',)
            while cur.valid():
                ti = cur.ti
                yield from s.use_codebook(c, st, cur.shard(), who, cw)
                for step in range(0, s.steps, EVERY):
                    yield from load_helper_step(0, (ti, step))
                    yield from mma_step(0, step == 0, (ti, step))
                    yield from decode_step(0, 1, (ti, step + 1))
                    yield from mma_step(1, False, (ti, step + 1))
                    yield from decode_step(1, 0, (ti, step + 2))
                    yield from mma_step(0, False, (ti, step + 2))
                    yield from decode_step(2, 1, (ti, step + 3))
                    yield from mma_step(1, False, (ti, step + 3))
                retire(0)  # wait_group 0
                for r in (range(2) if 'release_current' not in s.mut else []):
                    s.cta[r]['empty'][state['prev']].arrive()
                yield ('step',)
                cur.ti += 1; cur.step = 0
        yield from s.cluster_sync(who)

    def run(s, bias):
        warps = []
        for c in range(2):
            warps.append((f"c{c}.prod", s.producer(c)))
            for j in range(1, 4):
                warps.append((f"c{c}.h{j}", s.helper(c, j - 1)))
            for cw in range(8):
                warps.append((f"c{c}.w{cw}", s.consumer(c, cw)))
        cur = {}
        for name, g in warps:
            cur[name] = next(g, 'done')
        gens = dict(warps)
        weight = {name: (bias[name] if name in bias else 1.0) for name in gens}
        steps = 0
        while True:
            runnable = [n for n, y in cur.items() if y != 'done' and (y[0] == 'step' or y[1]())]
            cands = runnable + [('ev', i) for i in range(len(s.events))]
            if not cands:
                if all(y == 'done' for y in cur.values()):
                    check(not s.events, "TMA events pending at exit")
                    return steps
                blocked = {n: y[2] for n, y in cur.items() if y != 'done'}
                raise Fail(f"DEADLOCK: {blocked}")
            ws = [weight.get(x, 0.7) if isinstance(x, str) else 0.7 for x in cands]
            pick = s.rng.choices(cands, ws)[0]
            if isinstance(pick, tuple):
                ev = s.events.pop(pick[1]); s.deliver(ev)
            else:
                cur[pick] = next(gens[pick], 'done')
            steps += 1

def shard_patterns(ntiles):
    pats = [[0] * ntiles, list(range(ntiles)), [0] + [1] * (ntiles - 1) if ntiles else []]
    if ntiles >= 3: pats.append([0, 0, 1][:ntiles] + [1] * (ntiles - 3))
    if ntiles >= 3: pats.append([2, 0, 2])
    return pats

def main():
    mut = set(sys.argv[1].split(',')) if len(sys.argv) > 1 and sys.argv[1] else set()
    runs = int(sys.argv[2]) if len(sys.argv) > 2 else 300
    rng = random.Random(1234)
    total = fails = 0
    msgs = {}
    for steps in (4, 8, 12):
        for ntiles in (0, 1, 2, 3):
            for pat in shard_patterns(ntiles):
                for r in range(runs):
                    # random role speeds (starve / favour roles)
                    bias = {}
                    for c in range(2):
                        bias[f"c{c}.prod"] = rng.choice([0.05, 1, 5])
                        for j in range(1, 4): bias[f"c{c}.h{j}"] = rng.choice([0.05, 1, 5])
                        for w in range(8): bias[f"c{c}.w{w}"] = rng.choice([0.05, 1, 5])
                    sim = Sim(steps, ntiles, [pat, pat], random.Random(rng.random()), mut)
                    total += 1
                    try:
                        sim.run(bias)
                    except Fail as e:
                        fails += 1
                        m = str(e)[:160]
                        msgs.setdefault(m, (steps, ntiles, pat))
    print(f"mutations={sorted(mut) or 'none'}: {total} schedules, {fails} failures")
    for m, cfg in list(msgs.items())[:4]:
        print("  e.g.", cfg, m)

if __name__ == '__main__':
    main()
