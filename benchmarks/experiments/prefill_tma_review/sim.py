# SPDX-License-Identifier: Apache-2.0
# ruff: noqa: E501, E741, UP031, SIM115, E701, E702, E731
# Review model of prefill-tma.patch (twenty-second session, CPU only).
#!/usr/bin/env python3
"""Random-interleaving model of qtip_prefill_kernel<K> (exp/prefill-tma).

Agents (each a Python generator yielding at every shared-state access):
  T0      lane 0 of warp 0: decoder lane + the copy issuer
  R0      lanes 1..31 of warp 0 (meet T0 at __syncwarp / shfl)
  W1..W7  producer warps 1..7 (one agent each, lane 0 arrives)
  C0..C7  consumer warps (wgmma groups retire asynchronously, in order)
  DMA     async copies: each issued copy completes after a random delay
          (writes its bytes at some point in [issue, complete], complete_tx at end)

Checks: arrival / complete_tx landing in another phase than intended,
tx-count of a phase going negative at completion, a phase completing while
bytes are still outstanding for it, a wait satisfied by an aliased parity
(barrier >= 2 phases ahead), stage A/B or trellis slot overwritten while
being read, reads of data of the wrong step.
"""

import random
import sys

STAGES, TSLOTS, PWARPS, CWARPS = 3, 4, 8, 8
LATE = [False]


class Bug(Exception):
    pass


class Bar:
    def __init__(s, name, count):
        s.name, s.count, s.pending, s.tx, s.phase = name, count, count, 0, 0

    def _maybe_complete(s):
        if s.pending == 0 and s.tx == 0:
            s.phase += 1
            s.pending = s.count

    def arrive(s, k, who, expect=0):
        if s.phase != k:
            raise Bug(
                f"{who}: arrive on {s.name} meant for phase {k} lands in phase {s.phase}"
            )
        s.tx += expect
        s.pending -= 1
        if s.pending < 0:
            raise Bug(f"{s.name}: pending < 0")
        s._maybe_complete()

    def complete_tx(s, k, b, who):
        if s.phase != k:
            raise Bug(
                f"{who}: complete_tx on {s.name} meant for phase {k} lands in phase {s.phase}"
            )
        s.tx -= b
        s._maybe_complete()

    def done(s, k):
        """try_wait.parity(k & 1) for intended phase k."""
        ok = (s.phase & 1) != (k & 1)
        if ok and s.phase < k:
            raise Bug(
                f"{s.name}: wait for phase {k} satisfied at phase count {s.phase} (aliased)"
            )
        if ok and s.phase > k + 1:
            raise Bug(f"{s.name}: waiter 2 phases behind (k={k}, phase={s.phase})")
        return ok


class Sim:
    def __init__(s, tiles_per_cta, steps, rng, fix=True, delay=30):
        s.rng, s.fix, s.delay = rng, fix, delay
        s.late_tempty = LATE[0]
        s.steps = steps
        s.tiles = tiles_per_cta  # one CTA, its tile walk is 0..tiles-1
        s.total = tiles_per_cta * steps
        s.full = [Bar(f"full[{i}]", PWARPS + 1) for i in range(STAGES)]
        s.empty = [Bar(f"empty[{i}]", CWARPS) for i in range(STAGES)]
        s.tfull = [Bar(f"tfull[{i}]", 1) for i in range(TSLOTS)]
        s.tempty = [Bar(f"tempty[{i}]", PWARPS) for i in range(TSLOTS)]
        # data: step id present in each region, and a version counter
        s.A = [None] * STAGES
        s.Aw = [0] * STAGES  # writes in flight / done counter
        s.B = [[None] * PWARPS for _ in range(STAGES)]
        s.Bver = [0] * STAGES
        s.T = [None] * TSLOTS
        s.Tbusy = [False] * TSLOTS
        s.Abusy = [False] * STAGES
        s.dma = []  # pending copies: [deadline, kind, slot, step, phase_k, bytes, wrote]
        s.now = 0
        s.syncwarp = {}  # rendezvous for warp 0 lanes
        s.reading = {}  # (kind, slot) -> set of readers

    # ---- helpers -------------------------------------------------------
    def wait(s, bar, k):
        while not bar.done(k):
            yield

    def issue_copy(s, kind, slot, step, k, nbytes):
        if kind == "A":
            if s.reading.get(("A", slot)):
                raise Bug(f"TMA into stage {slot} (step {step}) while wgmma reads it")
            s.Abusy[slot] = True
        else:
            if s.reading.get(("T", slot)):
                raise Bug(f"bulk copy into trellis slot {slot} while decoders read it")
            s.Tbusy[slot] = True
        s.dma.append(
            [s.now + s.rng.randint(1, s.delay), kind, slot, step, k, nbytes, False]
        )

    def dma_agent(s):
        while True:
            for c in list(s.dma):
                deadline, kind, slot, step, k, nbytes, wrote = c
                if not wrote and s.rng.random() < 0.3:
                    c[6] = True
                    if kind == "A":
                        s.A[slot] = step
                    else:
                        s.T[slot] = step
                if s.now >= deadline:
                    if not c[6]:
                        if kind == "A":
                            s.A[slot] = step
                        else:
                            s.T[slot] = step
                    s.dma.remove(c)
                    if kind == "A":
                        s.Abusy[slot] = False
                        s.full[slot].complete_tx(k, nbytes, f"TMA step {step}")
                    else:
                        s.Tbusy[slot] = False
                        s.tfull[slot].complete_tx(k, nbytes, f"bulk step {step}")
            yield

    def rendezvous(s, key, n=2):
        s.syncwarp.setdefault(key, 0)
        s.syncwarp[key] += 1
        while s.syncwarp[key] < n:
            yield

    # ---- producers -----------------------------------------------------
    def producer(s, w, lane0_part=True, is_t0=False, is_r0=False):
        """w: warp index. For warp 0 two agents: T0 (is_t0) and R0 (is_r0)."""
        who = f"W{w}" + ("T0" if is_t0 else "R0" if is_r0 else "")
        st = {"t_issued": 0, "x_issued": 0, "tpos": 0, "xpos": 0}

        def issue_trellis():
            t = st["t_issued"]
            ts = t % TSLOTS
            if t >= TSLOTS:
                yield from s.wait(s.tempty[ts], t // TSLOTS - 1)
            s.tfull[ts].arrive(t // TSLOTS, "T0 expect_tx", expect=4)
            yield
            for _ in range(4):
                s.issue_copy("T", ts, st["tpos"], t // TSLOTS, 1)
                yield
            st["tpos"] += 1
            st["t_issued"] += 1

        def issue_x():
            x = st["x_issued"]
            slot = x % STAGES
            if x >= STAGES:
                yield from s.wait(s.empty[slot], x // STAGES - 1)
            s.full[slot].arrive(x // STAGES, "T0 expect_tx", expect=1)
            yield
            s.issue_copy("A", slot, st["xpos"], x // STAGES, 1)
            yield
            st["xpos"] += 1
            st["x_issued"] += 1

        if is_t0:
            for _ in range(min(TSLOTS - 1, s.total)):
                yield from issue_trellis()
            for _ in range(min(STAGES - 1, s.total)):
                yield from issue_x()
        if is_t0 or is_r0:
            yield from s.rendezvous(("start",))
        for it in range(s.total):
            slot, ts = it % STAGES, it % TSLOTS
            yield from s.wait(s.tfull[ts], it // TSLOTS)
            # loads of the slot's words
            s.reading.setdefault(("T", ts), set()).add(who)
            yield
            if s.Tbusy[ts]:
                raise Bug(f"{who}: reads trellis slot {ts} while a copy writes it")
            if s.T[ts] != it:
                raise Bug(f"{who}: trellis slot {ts} holds step {s.T[ts]}, wanted {it}")
            s.reading[("T", ts)].discard(who)
            if is_t0 or is_r0:
                yield from s.rendezvous((it, "sw1"))
            if not is_r0 and not s.late_tempty:
                s.tempty[ts].arrive(it // TSLOTS, f"{who} tempty step {it}")
            yield  # decode
            if s.fix and it >= STAGES:
                yield from s.wait(s.empty[slot], it // STAGES - 1)
            if s.reading.get(("B", slot)):
                raise Bug(
                    f"{who}: stores step {it} into stage {slot} B while wgmma "
                    f"reads step {next(iter(s.reading[('B', slot)]))[1]}"
                )
            s.B[slot][w] = it
            s.Bver[slot] += 1
            yield  # fence.proxy.async
            if is_t0 or is_r0:
                yield from s.rendezvous((it, "sw2"))
            if not is_r0 and s.late_tempty:
                s.tempty[ts].arrive(it // TSLOTS, f"{who} tempty step {it}")
            if not is_r0:
                s.full[slot].arrive(it // STAGES, f"{who} full step {it}")
            yield
            if is_t0:
                if st["tpos"] < s.total:
                    yield from issue_trellis()
                if st["xpos"] < s.total:
                    yield from issue_x()

    # ---- consumers -----------------------------------------------------
    def consumer(s, c):
        who = f"C{c}"
        groups = []  # in-flight wgmma groups: (step, slot, retire_time)
        it = 0

        def retire_until(n_pending):
            while len(groups) > n_pending:
                step, slot, t = groups[0]
                while s.now < t:
                    yield
                # reads happen throughout; check at the end too
                if s.A[slot] != step or any(b != step for b in s.B[slot]):
                    raise Bug(
                        f"{who}: stage {slot} changed under wgmma of step {step}: "
                        f"A={s.A[slot]} B={s.B[slot]}"
                    )
                s.reading[("A", slot)].discard((who, step))
                s.reading[("B", slot)].discard((who, step))
                groups.pop(0)

        for tile in range(s.tiles):
            prev = None
            for step in range(s.steps):
                slot = it % STAGES
                yield from s.wait(s.full[slot], it // STAGES)
                if s.A[slot] != it or any(b != it for b in s.B[slot]):
                    raise Bug(
                        f"{who}: full[{slot}] done for step {it} but A={s.A[slot]} "
                        f"B={s.B[slot]}"
                    )
                s.reading.setdefault(("A", slot), set()).add((who, it))
                s.reading.setdefault(("B", slot), set()).add((who, it))
                groups.append((it, slot, s.now + s.rng.randint(1, s.delay)))
                yield
                yield from retire_until(1)
                if step > 0:
                    s.empty[prev[0]].arrive(prev[1], f"{who} empty step {prev[2]}")
                prev = (slot, it // STAGES, it)
                it += 1
                yield
            yield from retire_until(0)
            s.empty[prev[0]].arrive(prev[1], f"{who} empty step {prev[2]}")
            # epilogue: a long stretch of global stores
            for _ in range(s.rng.randint(0, 3 * s.delay)):
                yield

    def run(s, max_ticks=200000):
        agents = {"DMA": s.dma_agent()}
        agents["T0"] = s.producer(0, is_t0=True)
        agents["R0"] = s.producer(0, is_r0=True)
        for w in range(1, PWARPS):
            agents[f"W{w}"] = s.producer(w)
        for c in range(CWARPS):
            agents[f"C{c}"] = s.consumer(c)
        speed = {k: s.rng.choice([0.2, 0.5, 1.0]) for k in agents}
        live = dict(agents)
        while len(live) > 1:
            s.now += 1
            if s.now > max_ticks:
                raise Bug(f"deadlock / livelock: live agents {sorted(live)}")
            order = list(live)
            s.rng.shuffle(order)
            for k in order:
                if k != "DMA" and s.rng.random() > speed[k]:
                    continue
                try:
                    next(live[k])
                except StopIteration:
                    del live[k]
        if s.dma:
            raise Bug("copies still in flight at exit")
        return True


def main():
    fix = "--nofix" not in sys.argv
    LATE[0] = "--late-tempty" in sys.argv
    seeds = int(sys.argv[1]) if len(sys.argv) > 1 and sys.argv[1].isdigit() else 2000
    fails = {}
    for seed in range(seeds):
        rng = random.Random(seed)
        tiles = rng.randint(1, 3)
        steps = rng.randint(1, 7)
        try:
            Sim(tiles, steps, rng, fix=fix).run()
        except Bug as e:
            key = str(e).split(":")[0] + ": " + ":".join(str(e).split(":")[1:])[:90]
            fails.setdefault((tiles, key), []).append((seed, steps))
    print(f"fix={fix}: {seeds} runs, {sum(len(v) for v in fails.values())} failures")
    for (tiles, key), v in sorted(fails.items(), key=lambda kv: -len(kv[1]))[:15]:
        print(f"  tiles/CTA={tiles} x{len(v)} e.g. seed,steps={v[0]}: {key}")


if __name__ == "__main__":
    main()
