# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""Interleaved A/B timing of two builds of the QTIP kernels in one process.

    python3 scripts/ab_kernels.py BASE_LIB OUT.json [--K 2] [--batches 1 16]

The variant is the ``_qtip_C`` that ``vllm._qtip_ops`` imports (the tree
with the patch applied); BASE_LIB is the baseline built with its op namespace
renamed to ``_qtip_C_base`` (``scripts/gpu_kernel_run.sh ab_base``), so both
load side by side. For every layer of bench_kernels.py (its single shapes and
fused layers) each build's qtip_linear runs in a CUDA graph over rotating
trellis copies, and the two graphs are replayed in turn, base and variant,
round after round: both see the same clocks and temperature, which separate
benchmark runs minutes apart do not (drifts of 3-5% within one device call
hid most sub-5% changes until the twenty-first session). The change is the
median of the per-round ratios, with their range; the outputs of the two
builds on the same input are compared too (a variant may legitimately sum in
another order, but not by much).

With ``--isolate`` every call is followed by a one-element kernel launched
without programmatic dependent launch, as vLLM's norms, activations and
attention sit between its QTIP layers: otherwise the graph chains each call's
output transform into the next call's kernels, so a change in when a kernel
lets its dependents launch is measured against neighbours vLLM never runs it
next to. The time includes that small kernel, the same for both builds.

Only the op is timed: a patch that changes ``vllm/_qtip_ops.py`` or the op
schema is not measured as vLLM would run it. A patch that moves the dense
crossover is, with ``--variant-dense-min-rows`` (the base keeps
QTIP_DENSE_MIN_ROWS).

Writes {"gpu", "date", "rounds", "rows": [{"layer", "K", "batch", "base_us",
"variant_us", "change", "change_lo", "change_hi", "max_rel_diff"}]} after
every layer and prints a Markdown table as it goes; outputs that differ by
more than MAX_REL_DIFF are marked.
"""

import argparse
import datetime
import json
import statistics

import torch
from bench_kernels import (
    FUSED_LAYERS,
    SHAPES,
    capture_graph,
    factor,
    random_trellises,
)

from vllm._qtip_ops import (
    QTIP_DENSE_MIN_ROWS,
    QTIP_TLUT_SHAPE,
    qtip_kernels_available,
)

BASE_NS = "_qtip_C_base"
VARIANT_NS = "_qtip_C"
# Largest output difference (relative to the largest output) that a change of
# summation order explains; more is marked in the table.
MAX_REL_DIFF = 1e-2


def summarize(base_us: list[float], variant_us: list[float]) -> dict:
    """Medians of two builds' per-round times and the median, lowest and
    highest of the per-round variant / base ratios, as fractional changes
    (-0.1: the variant is 10% faster)."""
    ratios = sorted(v / b for b, v in zip(base_us, variant_us, strict=True))
    return {
        "base_us": round(statistics.median(base_us), 2),
        "variant_us": round(statistics.median(variant_us), 2),
        "change": round(statistics.median(ratios) - 1, 4),
        "change_lo": round(ratios[0] - 1, 4),
        "change_hi": round(ratios[-1] - 1, 4),
    }


def time_rounds(graphs, calls: int, rounds: int) -> list[list[float]]:
    """Microseconds per call of each graph, one replay of each in turn per
    round, the order reversed every other round (after an untimed round)."""
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    for g in graphs:
        g.replay()
    times: list[list[float]] = [[] for _ in graphs]
    for r in range(rounds):
        order = list(zip(graphs, times))
        for g, t in order if r % 2 == 0 else reversed(order):
            start.record()
            g.replay()
            end.record()
            end.synchronize()
            t.append(start.elapsed_time(end) * 1e3 / calls)
    return times


def linear_op(ns: str):
    return getattr(torch.ops, ns).qtip_linear


def layer_inputs(shard_rows: list[int], n: int, K: int):
    """Random trellis copies (rotated through, more bytes than L2), per-shard
    tables and SU, SV and the Hadamard factors of one layer."""
    m, shards = sum(shard_rows), len(shard_rows)
    trellises = [t.view(m // 32, n // 32, 64 * K) for t in random_trellises(m, n, K)]
    tlut = torch.randn(shards, *QTIP_TLUT_SHAPE, device="cuda").half()
    SU = torch.randn(shards, n, device="cuda")
    SV = torch.rand(m, device="cuda") * 0.01
    return trellises, tlut, SU, SV, factor(n), factor(shard_rows[0])


def ab_layer(
    name: str,
    shard_rows: list[int],
    n: int,
    K: int,
    batches,
    dtype,
    rounds: int,
    variant_dense_min_rows: int,
    isolate: bool,
) -> list[dict]:
    fence = torch.zeros(1, device="cuda")
    trellises, tlut, SU, SV, had_in, had_out = layer_inputs(shard_rows, n, K)
    rows = []
    for batch in batches:
        x = torch.randn(batch, n, device="cuda").to(dtype)

        def call(ns: str, t: torch.Tensor, x=x) -> torch.Tensor:
            dense_min_rows = (
                variant_dense_min_rows if ns == VARIANT_NS else QTIP_DENSE_MIN_ROWS
            )
            y = linear_op(ns)(
                x, t, tlut, SU, SV, had_in, had_out, n, shard_rows, shard_rows,
                dense_min_rows, 0,
            )  # fmt: skip
            if isolate:
                fence.add_(1)
            return y

        base_y, variant_y = call(BASE_NS, trellises[0]), call(VARIANT_NS, trellises[0])
        max_rel_diff = (
            (variant_y.float() - base_y.float()).abs().max()
            / base_y.float().abs().max()
        ).item()
        graphs = [
            capture_graph([lambda t=t, ns=ns: call(ns, t) for t in trellises])
            for ns in (BASE_NS, VARIANT_NS)
        ]
        base_us, variant_us = time_rounds(graphs, len(trellises), rounds)
        del graphs
        rows.append(
            {
                "layer": name,
                "K": K,
                "batch": batch,
                **summarize(base_us, variant_us),
                "max_rel_diff": float(f"{max_rel_diff:.3g}"),
            }
        )
    del trellises
    torch.cuda.empty_cache()
    return rows


def layers() -> list[tuple[str, list[int], int]]:
    """(name, shard rows, n) of every single shape and fused layer."""
    single = {(m, n) for shapes in SHAPES.values() for m, n in shapes}
    out = [(f"{m}x{n}", [m], n) for m, n in sorted(single)]
    out += [(f"{model} {layer}", rows, n) for model, layer, rows, n in FUSED_LAYERS]
    return out


def markdown(rows: list[dict]) -> str:
    lines = [
        "| layer | K | batch | base us | variant us | change (median) | "
        "range over rounds | max rel diff |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        mark = " **differs**" if r["max_rel_diff"] > MAX_REL_DIFF else ""
        lines.append(
            f"| {r['layer']} | {r['K']} | {r['batch']} | {r['base_us']} | "
            f"{r['variant_us']} | {100 * r['change']:+.1f}% | "
            f"{100 * r['change_lo']:+.1f}% .. {100 * r['change_hi']:+.1f}% | "
            f"{r['max_rel_diff']:.2g}{mark} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("base_lib", help="the baseline _qtip_C built as _qtip_C_base")
    parser.add_argument("out", help="JSON output path")
    parser.add_argument("--K", type=int, nargs="+", default=[2])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--dtype", default="bfloat16", choices=["float16", "bfloat16"])
    parser.add_argument(
        "--variant-dense-min-rows",
        type=int,
        default=QTIP_DENSE_MIN_ROWS,
        help="the variant's dense_min_rows (the base keeps QTIP_DENSE_MIN_ROWS): "
        "a dense-path kernel against the fused path below it",
    )
    parser.add_argument(
        "--isolate",
        action="store_true",
        help="a kernel without programmatic dependent launch after every call, "
        "as between vLLM's QTIP layers",
    )
    args = parser.parse_args()
    if not qtip_kernels_available():
        raise SystemExit("the variant's QTIP kernels (vllm._qtip_C) are not available")
    torch.ops.load_library(args.base_lib)
    if not hasattr(getattr(torch.ops, BASE_NS), "qtip_linear"):
        raise SystemExit(f"{args.base_lib} does not register torch.ops.{BASE_NS}")
    dtype = getattr(torch, args.dtype)
    result = {
        "gpu": torch.cuda.get_device_name(),
        "date": datetime.date.today().isoformat(),
        "rounds": args.rounds,
        "isolate": args.isolate,
        "rows": [],
    }
    print(markdown([]), flush=True)
    for K in args.K:
        for name, shard_rows, n in layers():
            try:
                rows = ab_layer(
                    name,
                    shard_rows,
                    n,
                    K,
                    args.batches,
                    dtype,
                    args.rounds,
                    args.variant_dense_min_rows,
                    args.isolate,
                )
            except RuntimeError as e:  # report and go on with the next layer
                print(f"| {name} | {K} | - | failed: {e} |", flush=True)
                continue
            result["rows"] += rows
            print(markdown(rows).split("\n", 2)[2], flush=True)
            with open(args.out, "w") as f:  # what is done survives a timeout
                json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
