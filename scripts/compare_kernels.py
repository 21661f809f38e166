# SPDX-License-Identifier: Apache-2.0
"""Compare two kernel benchmark files (scripts/bench_kernels.py's JSON): a
variant against the baseline of the same device call.

The GPU's speed drifts within one call (fourteenth session: cuBLAS fp16 of the
same shapes 6-10% slower in the later variants), so each layer's change is
also given against the fp16 GEMM timed next to it: (variant qtip / variant
fp16) / (base qtip / base fp16). Fused layers have no fp16 control of their
own; they are normalised by the median fp16 drift of the single layers.

    python3 scripts/compare_kernels.py base.json variant.json [variant2.json ...]
"""

import argparse
import json
import statistics
from pathlib import Path


def _layer_key(row: dict) -> tuple:
    return (f"{row['m']}x{row['n']}", row["K"], row.get("tp_split", 1), row["batch"])


def _fused_key(row: dict) -> tuple:
    return (f"{row['model']} {row['layer']}", row["K"], 1, row["batch"])


def compare(base: dict, variant: dict) -> tuple[float, list[dict]]:
    """The median fp16 drift and, per layer in both files, the raw and the
    fp16-normalised change of the QTIP time (fractions: -0.1 is 10% faster)."""
    base_rows = {_layer_key(r): r for r in base["rows"]}
    var_rows = {_layer_key(r): r for r in variant["rows"]}
    common = [k for k in base_rows if k in var_rows]
    drifts = [var_rows[k]["fp16_us"] / base_rows[k]["fp16_us"] for k in common]
    drift = statistics.median(drifts) if drifts else 1.0
    out = []
    for k in common:
        b, v = base_rows[k], var_rows[k]
        raw = v["qtip_us"] / b["qtip_us"]
        fp16 = v["fp16_us"] / b["fp16_us"]
        out.append(
            dict(layer=k[0], K=k[1], tp_split=k[2], batch=k[3], base_us=b["qtip_us"],
                 variant_us=v["qtip_us"], raw=raw - 1, normalised=raw / fp16 - 1)
        )  # fmt: skip
    base_fused = {_fused_key(r): r for r in base.get("fused_layers", [])}
    for r in variant.get("fused_layers", []):
        k = _fused_key(r)
        if k not in base_fused:
            continue
        raw = r["one_call_us"] / base_fused[k]["one_call_us"]
        out.append(
            dict(layer=k[0], K=k[1], tp_split=1, batch=k[3],
                 base_us=base_fused[k]["one_call_us"], variant_us=r["one_call_us"],
                 raw=raw - 1, normalised=raw / drift - 1)
        )  # fmt: skip
    return drift, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("base", type=Path)
    parser.add_argument("variants", type=Path, nargs="+")
    args = parser.parse_args()
    base = json.loads(args.base.read_text())
    for path in args.variants:
        drift, rows = compare(base, json.loads(path.read_text()))
        print(f"\n{path}: fp16 drift (median) {drift:.3f}")
        print("| layer | K | batch | base us | variant us | change | vs fp16 |")
        print("|---|---|---|---|---|---|---|")
        for r in rows:
            split = f" (tp-split {r['tp_split']})" if r["tp_split"] > 1 else ""
            print(
                f"| {r['layer']}{split} | {r['K']} | {r['batch']} | {r['base_us']:.1f} "
                f"| {r['variant_us']:.1f} | {100 * r['raw']:+.1f}% "
                f"| {100 * r['normalised']:+.1f}% |"
            )


if __name__ == "__main__":
    main()
