# SPDX-License-Identifier: Apache-2.0
# ruff: noqa: E501, E741, UP031, SIM115
# Review models of prefill-rs.patch (twenty-second session, CPU only).
# Random-interleaving model of qtip_prefill_kernel's pipeline (one CTA).
# 3 producer warps (one stage each, stage = walk position % 3), 8 consumer warps
# (2 warpgroups x 4), wgmma groups issued collectively per warpgroup and
# retiring asynchronously but in order. Mirrors qtip_prefill.cu lines 244-391.
import random

S = 3


class Bar:
    def __init__(s, count):
        s.count = count
        s.pending = count
        s.phase = 0  # completed phases

    def arrive(s):
        s.pending -= 1
        assert s.pending >= 0
        if s.pending == 0:
            s.phase += 1
            s.pending = s.count

    def test(s, parity):
        return (s.phase & 1) != parity  # try_wait.parity semantics


class Viol(Exception):
    pass


def run(steps, tiles_shards, seed, advance_cur=True, verbose=False):
    rnd = random.Random(seed)
    ntiles = len(tiles_shards)
    total = steps * ntiles
    full = [Bar(1) for _ in range(S)]
    empty = [Bar(8) for _ in range(S)]
    # wgmma groups: per warpgroup list of dict(g, slot, issued_by:set, started, retired)
    groups = [{} for _ in range(2)]
    writing = [None] * S  # stage -> walk position being written
    stage_pos = [None] * S  # stage -> walk position whose data it holds
    named_bar = {"arrived": 0, "gen": 0}
    lut = {"shard": None, "filling": False}

    def intended_wait(bar, parity, u, who):
        # u = the phase index (0-based) the code intends to wait for
        if bar.phase >= u + 2:
            raise Viol(
                f"{who}: waiter 2 phases behind (phase={bar.phase}, intends {u})"
            )
        if bar.phase < u and bar.test(parity):
            raise Viol(
                f"{who}: parity wait passes early (phase={bar.phase}, intends {u})"
            )

    def producer(p):
        for it in range(p, total, S):
            u = it // S
            if it >= S:
                par = ((it // S) + 1) & 1
                while True:
                    intended_wait(empty[p], par, u - 1, f"producer{p} it{it}")
                    if empty[p].test(par):
                        break
                    yield
                assert empty[p].phase == u
            # start writing stage p: nobody may still be reading it
            for wg in range(2):
                for g, gr in groups[wg].items():
                    if gr["slot"] == p and not gr["retired"]:
                        raise Viol(
                            f"producer{p} overwrites stage {p} (it {it}) while wgmma group {g} of wg{wg} unretired"
                        )
            writing[p] = it
            yield
            yield  # cp.async in flight, wait_all, fence
            writing[p] = None
            stage_pos[p] = it
            full[p].arrive()
            yield

    def wg_group(wg, g, slot, w):
        d = groups[wg].setdefault(
            g,
            {
                "slot": slot,
                "issued": set(),
                "started": False,
                "retired": False,
                "abuf": g % 2,
            },
        )
        assert d["slot"] == slot
        d["issued"].add(w)
        if writing[slot] is not None:
            raise Viol(f"warp{w} wgmma g{g} reads stage {slot} while being written")
        if stage_pos[slot] != g:
            raise Viol(
                f"warp{w} wgmma g{g} reads stage {slot} holding walk pos {stage_pos[slot]}"
            )

    def consumer(w):
        wg = w // 4
        it = 0
        lut_shard = tiles_shards[0]
        # LUT fill + consumer_sync
        yield from csync(w)

        def decode(g):
            # writes A buffer g%2: every group of this warp reading buffer g%2 must be retired
            for gg, gr in groups[wg].items():
                if gg % 2 == g % 2 and w in gr["issued"] and not gr["retired"]:
                    raise Viol(
                        f"warp{w} decodes step-group {g} into A buffer {g % 2} while group {gg} unretired"
                    )
            if lut["filling"]:
                raise Viol(f"warp{w} LUT read during refill")

        def mma(g, step):
            nonlocal it
            assert g == it
            slot = it % S
            par = (it // S) & 1
            while True:
                intended_wait(full[slot], par, it // S, f"warp{w} it{it}")
                if full[slot].test(par):
                    break
                yield
            wg_group(wg, it, slot, w)
            yield
            # wait_group 1: all of this warp's groups < it retired
            while any(
                (not gr["retired"])
                for gg, gr in groups[wg].items()
                if gg < it and w in gr["issued"]
            ):
                yield
            if step > 0:
                empty[(it + S - 1) % S].arrive()
            it += 1
            yield

        cur = 0
        g = 0
        while cur < ntiles:
            # decode_step(step 0) with LUT refill
            if tiles_shards[cur] != lut_shard:
                lut_shard = tiles_shards[cur]
                yield from csync(w)
                lut["filling"] = True
                yield
                lut["filling"] = False  # (model: one warp's fill is enough to flag)
                yield from csync(w)
            decode(g)
            for s in range(0, steps, 2):
                yield from mma(g, s)
                g += 1
                decode(g)
                yield
                yield from mma(g, s + 1)
                g += 1
                if s + 2 < steps:
                    decode(g)
                    yield
            while any(
                (not gr["retired"])
                for gg, gr in groups[wg].items()
                if w in gr["issued"]
            ):
                yield
            empty[(it + S - 1) % S].arrive()
            yield  # epilogue reads acc: all retired
            if advance_cur:
                cur += 1
            if not advance_cur and it >= total + S:  # would hang: stop model
                return
        return

    def csync(w):
        gen = named_bar["gen"]
        named_bar["arrived"] += 1
        if named_bar["arrived"] == 8:
            named_bar["arrived"] = 0
            named_bar["gen"] += 1
        while named_bar["gen"] == gen:
            yield

    procs = {f"P{p}": producer(p) for p in range(S)}
    procs.update({f"C{w}": consumer(w) for w in range(8)})
    idle = 0
    while procs:
        # hardware: start groups issued by all 4 warps; retire oldest started group at random
        for wg in range(2):
            for g in sorted(groups[wg]):
                gr = groups[wg][g]
                if not gr["started"] and len(gr["issued"]) == 4:
                    gr["started"] = True
            unret = [g for g in sorted(groups[wg]) if not groups[wg][g]["retired"]]
            if unret and groups[wg][unret[0]]["started"] and rnd.random() < 0.3:
                groups[wg][unret[0]]["retired"] = True
        name = rnd.choice(list(procs))
        try:
            next(procs[name])
        except StopIteration:
            del procs[name]
        idle += 1
        if idle > 200000:
            raise Viol(
                "deadlock (no completion after 200000 scheduler steps): "
                + ",".join(sorted(procs))
            )
    # post: every phase accounted
    for s in range(S):
        uses = len(range(s, total, S))
        assert full[s].phase == uses, (s, full[s].phase, uses)
        assert empty[s].phase == uses, (s, empty[s].phase, uses)
    return True


if __name__ == "__main__":
    n = 0
    bad = 0
    for steps in (2, 4, 6, 8):
        for ntile in (1, 2, 3):
            for trial in range(60):
                seed = hash((steps, ntile, trial)) & 0xFFFFFFFF
                r = random.Random(seed)
                shards = [r.randrange(2) for _ in range(ntile)]
                try:
                    run(steps, shards, seed)
                    n += 1
                except Viol as e:
                    bad += 1
                    print("VIOLATION", steps, ntile, shards, e)
    print(f"fixed walk (cur advances per tile): {n} runs ok, {bad} violations")
    # the code as written: cur never advances
    for steps in (4,):
        for ntile in (1, 2):
            try:
                run(steps, [0] * ntile, 7, advance_cur=False)
                print("as-written: finished?!")
            except Viol as e:
                print(
                    f"as-written (cur not advanced), steps={steps}, tiles={ntile}:", e
                )
