# SPDX-License-Identifier: Apache-2.0
# ruff: noqa: E501, E741, UP031, SIM115
# Review models of prefill-rs.patch (twenty-second session, CPU only).
# Dataflow check over SASS: pending HGMMA groups (A regs) from issue to the
# WARPGROUP.DEPBAR that retires them; flags writes to pending A registers and
# any non-HGMMA access to the accumulators R24..R151 while a group is pending.
import re
import sys

# argv[1]: cuobjdump -sass output of the kernel object.
txt = open(sys.argv[1]).read().split("\n")
funcs = []
cur = None
for l in txt:
    if l.startswith("Function"):
        cur = [l.split(":")[1].strip(), []]
        funcs.append(cur)
        continue
    m = re.match(r"([0-9a-f]+)\s+(.*)", l)
    if m and cur:
        cur[1].append((int(m.group(1), 16), m.group(2).strip()))
NOGPRDST = {
    "ST",
    "STS",
    "STG",
    "ISETP",
    "UISETP",
    "FSETP",
    "PLOP3",
    "BRA",
    "EXIT",
    "BAR",
    "SYNCS",
    "LDGSTS",
    "WARPGROUP",
    "DEPBAR",
    "LDGDEPBAR",
    "FENCE",
    "MEMBAR",
    "NOP",
    "BSSY",
    "BSYNC",
    "ACQBULK",
    "USETMAXREG",
    "R2UR",
    "ULDC",
    "UMOV",
    "UIADD3",
    "USHF",
    "UIMAD",
    "ULOP3",
    "ULEA",
    "USEL",
    "S2UR",
    "WARPSYNC",
    "RED",
    "CCTL",
    "ERRBAR",
}


def width(op):
    if ".128" in op:
        return 4
    if ".64" in op or "WIDE" in op:
        return 2
    return 1


def parse(ins):
    pred = None
    m = re.match(r"(@!?U?P[0-9T])\s+(.*)", ins)
    if m:
        pred = m.group(1)
        ins = m.group(2)
    parts = ins.split(None, 1)
    op = parts[0]
    ops = [o.strip() for o in parts[1].split(",")] if len(parts) > 1 else []
    base = op.split(".")[0]
    writes = set()
    if base not in NOGPRDST and base != "HGMMA":
        for o in ops:
            mm = re.fullmatch(r"R(\d+)", o)
            if mm:
                r = int(mm.group(1))
                writes = set(range(r, r + width(op)))
                break
            if re.fullmatch(r"!?U?P(T|\d)", o):
                continue
            break
    reads = set(int(x) for x in re.findall(r"\bR(\d+)\b", " ".join(ops)))
    return pred, op, base, ops, writes, reads


ACC = set(range(24, 152))
for name, ins in funcs:
    K = re.search(r"ILi(\d)E", name).group(1)
    idx = {a: i for i, (a, _) in enumerate(ins)}
    P = [parse(t) for _, t in ins]
    start = (0, ())  # state: tuple of groups; a group = (frozenset(Aregs), closed)
    seen = set()
    work = [start]
    issues = []
    nh = 0
    while work:
        i, st = work.pop()
        if (i, st) in seen or i >= len(ins):
            continue
        seen.add((i, st))
        pred, op, base, ops, writes, reads = P[i]
        addr, text = ins[i]
        groups = list(st)
        pending = [g for g in groups]
        pendA = set().union(*[g[0] for g in pending]) if pending else set()
        if base == "HGMMA":
            a = int(re.fullmatch(r"R(\d+)", ops[1]).group(1))
            A = frozenset(range(a, a + 4))
            closed = "gsb0" in ops[-1] or "gsb0" in text.split(",")[-1]
            if groups and not groups[-1][1]:
                groups[-1] = (groups[-1][0] | A, closed)
            else:
                groups.append((A, closed))
        elif base == "WARPGROUP" and "DEPBAR" in op:
            n = int(ops[-1], 16)
            closedg = [g for g in groups if g[1]]
            groups = [g for g in groups if not g[1]]  # open groups none expected
            groups = closedg[len(closedg) - n :] if n > 0 else []
        else:
            bad = writes & pendA
            if bad:
                issues.append(
                    f"{hex(addr)} {text}  WRITES pending A regs {sorted(bad)}"
                )
            if pending and (reads | writes) & ACC:
                issues.append(
                    f"{hex(addr)} {text}  touches accumulators while {len(pending)} group(s) pending"
                )
        nst = tuple(groups)
        assert len(nst) <= 4
        succ = []
        if base == "BRA":
            tgt = int(ops[-1], 16)
            succ.append(idx[tgt])
            if pred:
                succ.append(i + 1)
        elif base == "EXIT":
            if pred:
                succ.append(i + 1)
        else:
            succ.append(i + 1)
        for s in succ:
            work.append((s, nst))
    hg = [a for a, t in ins if t.startswith("HGMMA")]
    print(
        f"K={K}: {len(hg)} HGMMA, {len(seen)} (pc,state) pairs explored, {len(issues)} issues"
    )
    for x in sorted(set(issues))[:30]:
        print("   ", x)
