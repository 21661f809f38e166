# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""Where one QTIP linear's time goes, launch by launch (issue 11 experiment).

Needs a _qtip_C built with ``timeline.patch`` (this folder): every CTA's
thread 0 of the GEMM and of the transform kernels writes %globaltimer stamps
(entry, before and after its wait on the previous kernel, the GEMM's first
loop start and last loop end, exit) into a buffer whose address this script
passes through QTIP_TIMELINE_PTR. A CUDA graph of back-to-back calls of one
layer (rotating trellis copies, as bench_kernels.py times it) is replayed
once; the launches around one call in its middle are printed in us from that
call's first GEMM CTA entry, with the steady-state period between GEMMs.

    python benchmarks/experiments/layer_timeline.py OUT.json
"""

import argparse
import json
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "scripts"))

# The patch's buffer geometry (qtip_launch.cuh, namespace timeline).
TAGS, BLOCKS, SEQ, EVENTS = 8, 1024, 128, 8
TAG_NAMES = [
    "mma",
    "had_in",
    "syl4096",
    "hk512",
    "hk64",
    "hk64_in",
    "hk_step",
    "had_out",
]
# Event index -> name: the GEMM's, then every transform kernel's.
EVENT_NAMES = {
    0: ["entry", "pre_wait", "waited", "loop0", "loop_end", "exit", "row_X"],
    1: ["entry", "pre_wait", "waited", "exit", "loaded", "hk_done"],
}
GEMM_ORDER = [0, 1, 2, 6, 3, 4, 5]
CALLS = 24

buf = torch.zeros(
    TAGS * BLOCKS * SEQ * EVENTS + TAGS * BLOCKS // 2, dtype=torch.int64, device="cuda"
)
os.environ["QTIP_TIMELINE_PTR"] = str(buf.data_ptr())

from bench_kernels import (  # noqa: E402
    capture_graph,
    factor,
    random_trellises,
    replay_us,
)

from vllm._qtip_ops import qtip_matmul  # noqa: E402


def launches(stamps: torch.Tensor) -> list[dict]:
    """Per (tag, seq) launch: event statistics over its CTAs (ns)."""
    out = []
    for tag in range(len(TAG_NAMES)):
        names = EVENT_NAMES[0 if tag == 0 else 1]
        t = stamps[tag]  # (BLOCKS, SEQ, EVENTS)
        for seq in range(SEQ):
            entry = t[:, seq, 0]
            ctas = (entry > 0).nonzero().flatten()
            if len(ctas) == 0:
                continue
            rec = {"tag": TAG_NAMES[tag], "seq": seq, "ctas": len(ctas)}
            for e, name in enumerate(names):
                v = t[ctas, seq, e]
                v = v[v > 0].tolist()
                if v:
                    rec[name] = (min(v), statistics.median(v), max(v))
            out.append(rec)
    return sorted(out, key=lambda r: r["entry"][0])


def granularity(stamps: torch.Tensor) -> int:
    """Smallest positive difference between two stamps of one CTA (ns)."""
    s = stamps.reshape(-1, EVENTS)
    s = s[(s > 0).sum(1) > 1]
    diffs = []
    for row in s[:2000].tolist():
        v = sorted(x for x in row if x > 0)
        diffs += [b - a for a, b in zip(v, v[1:]) if b > a]
    return min(diffs) if diffs else -1


def chain(recs: list[dict], gemm: dict, next_gemm: dict) -> list[tuple[str, float]]:
    """The critical path from a GEMM's release to the next one's (us): the
    GEMM's x~, loop and tail to its last CTA's exit, then each launch
    released in between (by median release): the gap to its release and its
    run to its median CTA's exit; last the gap to the next GEMM's release."""
    us = 1e-3
    w0 = gemm["waited"][1]
    steps = [
        ("x~", (gemm["loop0"][1] - w0) * us),
        ("loop", (gemm["loop_end"][1] - gemm["loop0"][1]) * us),
        ("tail", (gemm["exit"][2] - gemm["loop_end"][1]) * us),
    ]
    done = gemm["exit"][2]
    end = next_gemm["waited"][1]
    between = [
        r
        for r in recs
        if r["tag"] != "mma" and "waited" in r and w0 < r["waited"][1] < end
    ]
    for r in sorted(between, key=lambda r: r["waited"][1]):
        steps.append((f"{r['tag']}({r['ctas']}) release", (r["waited"][1] - done) * us))
        steps.append((f"{r['tag']} run", (r["exit"][1] - r["waited"][1]) * us))
        done = r["exit"][1]
    steps.append(("release", (end - done) * us))
    return [(k, round(v, 2)) for k, v in steps]


def run_case(name: str, fn_for, trellises) -> dict:
    fns = [lambda t=t: fn_for(t) for t in trellises[:CALLS]]
    graph = capture_graph(fns)
    period_us = replay_us(graph, len(fns))
    buf.zero_()
    graph.replay()
    torch.cuda.synchronize()
    stamps = buf[: TAGS * BLOCKS * SEQ * EVENTS].view(TAGS, BLOCKS, SEQ, EVENTS).cpu()
    del graph
    recs = launches(stamps)
    mma = [r for r in recs if r["tag"] == "mma"]
    c = len(mma) // 2
    t0 = mma[c]["entry"][0]
    periods = [b["entry"][0] - a["entry"][0] for a, b in zip(mma, mma[1:])]
    lo, hi = mma[c - 1]["entry"][0], mma[c + 1]["entry"][0]
    window = [r for r in recs if lo <= r["entry"][0] < hi]
    print(
        f"\n## {name}: graph {period_us:.2f} us per call, GEMM-to-GEMM "
        f"{statistics.median(periods) / 1e3:.2f} us (median), "
        f"timer step {granularity(stamps)} ns"
    )
    print("| launch | CTAs | event | first | median | last |")
    print("|---|---|---|---|---|---|")
    rows = []
    for r in window:
        for key, val in r.items():
            if key in ("tag", "seq", "ctas"):
                continue
            rel = [round((x - t0) / 1e3, 2) for x in val]
            print(
                f"| {r['tag']}#{r['seq']} | {r['ctas']} | {key} | "
                f"{rel[0]} | {rel[1]} | {rel[2]} |"
            )
            rows.append(
                {
                    "launch": f"{r['tag']}#{r['seq']}",
                    "ctas": r["ctas"],
                    "event": key,
                    "us": rel,
                }
            )
    # Per-CTA phases of the GEMM of call c (durations, us).
    t = stamps[0, :, mma[c]["seq"]]
    ok = (t[:, 0] > 0) & (t[:, 3] > 0)
    phases = {}
    names = EVENT_NAMES[0]
    order = [e for e in GEMM_ORDER if (t[ok, e] > 0).any()]
    for a, b in zip(order, order[1:]):
        d = (t[ok, b] - t[ok, a]).double() / 1e3
        d = d[(t[ok, b] > 0) & (t[ok, a] > 0)]
        if len(d):
            phases[f"{names[a]}->{names[b]}"] = (
                round(d.min().item(), 2),
                round(d.median().item(), 2),
                round(d.max().item(), 2),
            )
    print(
        f"GEMM phases per CTA with work ({int(ok.sum())} CTAs; "
        f"min / median / max us): {phases}"
    )
    path = chain(recs, mma[c], mma[c + 1])
    print("critical path (us):", " | ".join(f"{k} {v}" for k, v in path))
    print(f"  sum {sum(v for _, v in path):.2f}")
    return {
        "case": name,
        "graph_us": round(period_us, 2),
        "gemm_period_us": round(statistics.median(periods) / 1e3, 2),
        "launches": rows,
        "gemm_phases": phases,
        "critical_path_us": path,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--K", type=int, default=2)
    args = parser.parse_args()
    K = args.K
    results = []
    cases = [
        (14336, 4096, [1, 16]),
        (4096, 4096, [1, 16]),
        (11008, 4096, [1, 2]),
        (4096, 14336, [1]),
        (4096, 11008, [1]),
    ]
    for m, n, batches in cases:
        trellises = random_trellises(m, n, K)
        tlut = torch.randn(512, 2, device="cuda").half()
        SU = torch.randn(n, device="cuda")
        SV = torch.rand(m, device="cuda") * 0.01
        had_in, had_out = factor(n), factor(m)
        for batch in batches:
            x = torch.randn(batch, n, device="cuda").to(torch.bfloat16)
            results.append(
                run_case(
                    f"{m}x{n} batch {batch}",
                    lambda t, x=x, w=(tlut, SU, SV, had_in, had_out): qtip_matmul(
                        x, t, *w, K
                    ),
                    trellises,
                )
            )
        del trellises
        torch.cuda.empty_cache()
    # Llama-3.1-8B gate_up, one call for both shards.
    shard_rows, n = [14336, 14336], 4096
    m = sum(shard_rows)
    trellises = random_trellises(m, n, K)
    tlut = torch.randn(2, 512, 2, device="cuda").half()
    SU = torch.randn(2, n, device="cuda")
    SV = torch.rand(m, device="cuda") * 0.01
    had_in, had_out = factor(n), factor(shard_rows[0])
    for batch in [1, 16]:
        x = torch.randn(batch, n, device="cuda").to(torch.bfloat16)
        results.append(
            run_case(
                f"Llama-3.1 gate_up batch {batch}",
                lambda t, x=x: qtip_matmul(
                    x, t, tlut, SU, SV, had_in, had_out, K, shard_rows=shard_rows
                ),
                trellises,
            )
        )
    with open(args.out, "w") as f:
        gpu = torch.cuda.get_device_name()
        json.dump({"gpu": gpu, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
