# SPDX-License-Identifier: Apache-2.0
"""Summarise `ncu --page source --csv --print-source sass` output.

    python scripts/ncu_source_top.py kernel.csv --top 30

Prints the kernel's stall-sample columns summed over all instructions, then
the instructions with the most warp samples, each with its three largest
stall columns, so a profile shows which instruction the warps wait at and
why (long scoreboard after a global load, short scoreboard after a shared
load, a wgmma or mbarrier wait, ...).
"""

import argparse
import csv
import io


def number(text: str) -> float:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return 0.0


def top_stalls(row: dict, stalls: list[str], k: int) -> list[tuple[float, str]]:
    """The k stall columns with the most samples at one instruction."""
    return [
        vc
        for vc in sorted(((number(row[c]), c) for c in stalls), reverse=True)[:k]
        if vc[0]
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("csv_file")
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument(
        "--listing",
        help="also write every instruction in address order (offset from the "
        "kernel's start, times executed, samples, top stalls, SASS) to this "
        "file, to read a loop's share of the samples",
    )
    args = parser.parse_args()
    with open(args.csv_file) as f:
        lines = f.read().splitlines()
    # ncu prints notes before the table; the header names the Source column.
    start = next(
        (i for i, line in enumerate(lines) if '"Source"' in line and "Address" in line),
        None,
    )
    if start is None:
        print(f"{args.csv_file}: no source table found")
        return
    rows = list(csv.DictReader(io.StringIO("\n".join(lines[start:]))))
    columns = list(rows[0].keys()) if rows else []
    samples = next((c for c in columns if "All Samples" in c), None)
    # One column per stall reason (each also has a "(Not Issued)" twin).
    stalls = [c for c in columns if c.startswith("stall_") and "Not Issued" not in c]
    if samples is None:
        print(f"{args.csv_file}: no sample column; columns: {columns}")
        return
    total = sum(number(r[samples]) for r in rows) or 1.0
    print(f"{len(rows)} instructions, {total:.0f} samples")
    sums = {c: sum(number(r[c]) for r in rows) for c in stalls}
    for c, v in sorted(sums.items(), key=lambda kv: -kv[1])[:12]:
        if v:
            print(f"  {v / total:7.1%}  {c}")
    address = next((c for c in columns if "Address" in c), columns[0])
    if args.listing:
        executed = next((c for c in columns if c == "Instructions Executed"), None)
        base = int(rows[0][address], 16)
        with open(args.listing, "w") as out:
            for r in rows:
                why = " ".join(f"{c}:{v:.0f}" for v, c in top_stalls(r, stalls, 2))
                runs = number(r[executed]) if executed else 0
                out.write(
                    f"{int(r[address], 16) - base:6x} {runs:8.0f} "
                    f"{number(r[samples]):5.0f}  {r['Source'].strip()[:60]:60} {why}\n"
                )
    print(f"\nhottest {args.top} instructions (share of samples, top stalls):")
    for r in sorted(rows, key=lambda r: -number(r[samples]))[: args.top]:
        why = ", ".join(f"{c} {v:.0f}" for v, c in top_stalls(r, stalls, 3))
        share = number(r[samples]) / total
        print(f"{share:6.1%} {r[address]:>6} {r['Source'][:60]:60} {why}")


if __name__ == "__main__":
    main()
