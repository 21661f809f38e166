# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""Calibration of the prefill GEMM's split count: per layer and row count, the
whole-layer time of every forced split, graphs replayed in turn.

    patch -p1 < benchmarks/experiments/pf-split-force.patch
    bash scripts/gpu_kernel_run.sh build
    PYTHONPATH=/tmp/qtip-kernels:$PWD/vllm_overlay python3 \\
        benchmarks/experiments/calib_splits.py OUT.json --rows 48 64 96 \\
        [--base /tmp/qtip-kernels-ab/vllm/_qtip_C.abi3.so]

Needs the calibration build (pf-split-force.patch: QTIP_PF_SPLITS=N forces N k
splits, 0 turns the prefill GEMM off, so the fused GEMM or decode + cuBLAS
runs). Columns: base (with --base: another build, e.g. main's from
``gpu_kernel_run.sh ab_base``), rule (the build's own choice), s0, s1, s2, s4,
s8. The twenty-seventh session's table and fit (BENCHMARKS.md "twenty-fourth
run") came from this script.
"""

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
from ab_kernels import (  # noqa: E402
    BASE_NS,
    VARIANT_NS,
    layer_inputs,
    layers,
    linear_op,
    time_rounds,
)
from bench_kernels import capture_graph  # noqa: E402

from vllm._qtip_ops import QTIP_DENSE_MIN_ROWS  # noqa: E402

FORCED = (0, 1, 2, 4, 8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="JSON output path")
    parser.add_argument("--rows", type=int, nargs="+", default=[48, 64, 96, 128])
    parser.add_argument("--K", type=int, default=2)
    parser.add_argument("--base", help="a build with ops in _qtip_C_base")
    parser.add_argument("--rounds", type=int, default=11)
    args = parser.parse_args()
    configs = [("rule", VARIANT_NS, None)]
    if args.base:
        torch.ops.load_library(args.base)
        configs.insert(0, ("base", BASE_NS, None))
    configs += [(f"s{s}", VARIANT_NS, str(s)) for s in FORCED]
    result = []
    print("| layer | rows | " + " | ".join(c[0] for c in configs) + " |")
    for name, shard_rows, n in layers():
        trellises, tlut, SU, SV, had_in, had_out = layer_inputs(shard_rows, n, args.K)
        for rows in args.rows:
            x = torch.randn(rows, n, device="cuda").to(torch.bfloat16)
            graphs, names = [], []
            for cname, ns, force in configs:
                # Read by the op at each call, so also during the capture.
                if force is None:
                    os.environ.pop("QTIP_PF_SPLITS", None)
                else:
                    os.environ["QTIP_PF_SPLITS"] = force

                op = linear_op(ns)
                rest = (tlut, SU, SV, had_in, had_out, n, shard_rows, shard_rows)
                fns = [
                    lambda t=t, op=op, x=x, rest=rest: op(
                        x, t, *rest, QTIP_DENSE_MIN_ROWS, 0
                    )
                    for t in trellises
                ]
                try:
                    graphs.append(capture_graph(fns))
                    names.append(cname)
                except RuntimeError as e:  # a split the shape cannot take
                    print(f"  {name} {rows} {cname}: {str(e)[:120]}")
            os.environ.pop("QTIP_PF_SPLITS", None)
            times = time_rounds(graphs, len(trellises), args.rounds)
            us = {nm: sorted(t)[len(t) // 2] for nm, t in zip(names, times)}
            result.append({"layer": name, "rows": rows, "K": args.K, "us": us})
            cells = [f"{us[c]:.1f}" if c in us else "-" for c, _, _ in configs]
            print(f"| {name} | {rows} | " + " | ".join(cells) + " |", flush=True)
            del graphs
        del trellises
        torch.cuda.empty_cache()
        with open(args.out, "w") as f:  # what is done survives a timeout
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
