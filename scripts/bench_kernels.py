# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""Per-layer timings of the QTIP kernels against torch FP16 matmul.

    python scripts/bench_kernels.py OUT.json [--K 2 3 4] [--batches 1 4 16]

For the linear shapes of Llama-2-7B and Llama-3.1-8B, every K and batch size,
it times one whole QTIP linear (qtip_matmul: input Hadamard, fused GEMM,
Hopper's prefill GEMM or decode + cuBLAS, output Hadamard), the trellis GEMM
kernel it ran (gemm_us), the same layer as three separate ops (qtip_hadamard,
qtip_gemm, qtip_hadamard: the baseline a fusion inside qtip_matmul must beat;
BENCHMARKS.md has the measured fused-prologue experiment), and torch.matmul
with an fp16 weight of the same shape. Fused layers (q/k/v, gate/up) are
timed as one qtip_matmul call for all shards against one call per shard.
``--tp-split N`` makes both transforms block-diagonal with blocks of 1/N, as a
split_for_tp checkpoint for N ranks runs at TP=1. The
device-to-device copy bandwidth is measured in the same run. Each time is the
median over replays of a CUDA graph that runs the op on rotating copies of the
weights (more bytes than L2 holds), divided by the number of ops in the graph.

Writes {"gpu", "date", "copy_gbs", "rows": [{"m", "n", "K", "batch", "qtip_us",
"fp16_us", "qtip_gbs", "kernels_us", ...}], "fused_layers": [...]} and prints
Markdown tables. qtip_gbs is the compressed weight bytes (m*n*K/8) over
qtip_us; kernels_us is the layer's device time per kernel kind (hadamard, mma,
prefill, decode, cublas, other) from the torch profiler, outside a CUDA graph (a
kernel launched early by programmatic dependent launch counts its wait too).
"""

import argparse
import datetime
import json
import math
import statistics

import torch
from kernel_names import QTIP_TRANSFORM_KERNELS

from vllm._qtip_ops import (
    QTIP_DENSE_MIN_ROWS,
    qtip_gemm,
    qtip_hadamard,
    qtip_kernels_available,
    qtip_matmul,
)
from vllm.model_executor.layers.quantization.utils.qtip_utils import (
    get_hadamard_factor,
)

# (m, n) = (out_features, in_features) of the projections.
SHAPES = {
    "Llama-2-7B": [(4096, 4096), (11008, 4096), (4096, 11008)],
    "Llama-3.1-8B": [(4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336)],
}
# Fused layers: (model, layer, shard rows, n).
FUSED_LAYERS = [
    ("Llama-2-7B", "qkv_proj", [4096, 4096, 4096], 4096),
    ("Llama-2-7B", "gate_up_proj", [11008, 11008], 4096),
    ("Llama-3.1-8B", "qkv_proj", [4096, 1024, 1024], 4096),
    ("Llama-3.1-8B", "gate_up_proj", [14336, 14336], 4096),
]
ROTATE_BYTES = 256 << 20  # > 4x the 50 MB L2 of an H100


def capture_graph(fns) -> torch.cuda.CUDAGraph:
    """A CUDA graph of all of fns, captured after one warm-up run of them."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for fn in fns:  # warm-up outside capture
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in fns:
            fn()
    return graph


def replay_us(graph: torch.cuda.CUDAGraph, calls: int, replays: int = 7) -> float:
    """Median microseconds per call of a graph of `calls` calls, over
    `replays` timed replays after an untimed one."""
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    graph.replay()
    times = []
    for _ in range(replays):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / calls)
    return statistics.median(times)


def time_graph(fns, replays: int = 7) -> float:
    """Median microseconds per fn, replaying a CUDA graph of all of fns."""
    graph = capture_graph(fns)
    us = replay_us(graph, len(fns), replays)
    del graph
    return us


def copy_bandwidth() -> float:
    """Device-to-device copy GB/s, counting bytes read plus bytes written."""
    nbytes = 2 << 30
    a = torch.empty(nbytes, dtype=torch.uint8, device="cuda").random_()
    b = torch.empty_like(a)
    us = time_graph([lambda a=a, b=b: b.copy_(a)] * 4)
    del a, b
    return 2 * nbytes / (us * 1e-6) / 1e9


# Kernel kinds of one QTIP linear, by a substring of the kernel's name (the
# first that matches); cuBLAS's kernels are named gemm, xmma or nvjet.
KERNEL_KINDS = (
    ("hadamard", QTIP_TRANSFORM_KERNELS),
    ("mma", ("qtip_mma_kernel",)),
    ("prefill", ("qtip_prefill_kernel",)),
    ("decode", ("qtip_decode_kernel",)),
    ("cublas", ("gemm", "xmma", "nvjet")),
)


def kernel_kind(name: str) -> str:
    for kind, keys in KERNEL_KINDS:
        if any(key in name for key in keys):
            return kind
    return "other"


def kernel_breakdown(fn, trellises) -> dict[str, float]:
    """Device microseconds per call of fn by kernel kind, from the torch
    profiler over one eager call per rotated trellis."""
    for t in trellises[:2]:
        fn(t)
    torch.cuda.synchronize()
    with torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CUDA]
    ) as prof:
        for t in trellises:
            fn(t)
        torch.cuda.synchronize()
    kinds: dict[str, float] = {}
    for evt in prof.key_averages():
        kind = kernel_kind(evt.key)
        kinds[kind] = kinds.get(kind, 0.0) + evt.self_device_time_total
    return {kind: round(us / len(trellises), 2) for kind, us in kinds.items() if us}


def linear_on_path(x, t, tlut, SU, SV, had_in, had_out, K, blocks, fused: bool):
    """qtip_linear forced onto the fused (True) or the dense (False) path."""
    m, n = SV.shape[0], SU.shape[-1]
    in_block, out_block = blocks
    return torch.ops._qtip_C.qtip_linear(
        x,
        t.view(m // 32, n // 32, 64 * K),
        tlut.reshape(1, 512, 2),
        SU.reshape(1, n),
        SV,
        had_in,
        had_out,
        in_block,
        [out_block],
        [m],
        1 << 30 if fused else 0,
    )


def factor(size: int):
    _, had = get_hadamard_factor(size)
    return None if had is None else had.cuda()


def random_trellises(m: int, n: int, K: int) -> list[torch.Tensor]:
    """Enough random m x n trellis copies to rotate through more than L2."""
    copies = max(2, math.ceil(ROTATE_BYTES / (m * n * K // 8)))
    return [
        torch.randint(-(2**15), 2**15, (m * n * K // 16,), device="cuda").to(
            torch.int16
        )
        for _ in range(copies)
    ]


def bench_shape(m: int, n: int, K: int, batches, dtype, split: int) -> list[dict]:
    nbytes = m * n * K // 8
    # Hadamard blocks: whole dimensions, or split_for_tp's blocks of 1/split.
    in_block, out_block = n // split, m // split
    blocks = dict(in_block=in_block, out_blocks=[out_block])
    trellises = random_trellises(m, n, K)
    tlut = torch.randn(512, 2, device="cuda").half()
    SU = torch.randn(n, device="cuda")
    SV = torch.rand(m, device="cuda") * 0.01
    had_in, had_out = factor(in_block), factor(out_block)
    w16 = [
        torch.randn(m, n, device="cuda").half()
        for _ in range(max(2, math.ceil(ROTATE_BYTES / (2 * m * n))))
    ]
    rows = []
    for batch in batches:
        x = torch.randn(batch, n, device="cuda").to(dtype)
        xh = x.half()
        qtip_us = time_graph(
            [
                lambda t=t, x=x: qtip_matmul(
                    x, t, tlut, SU, SV, had_in, had_out, K, **blocks
                )
                for t in trellises
            ]
        )
        # Where the layer's time goes, kernel by kernel (both paths).
        kernels = kernel_breakdown(
            lambda t, x=x: qtip_matmul(
                x, t, tlut, SU, SV, had_in, had_out, K, **blocks
            ),
            trellises,
        )
        # The GEMM kernel the layer ran: the fused one, or Hopper's prefill GEMM.
        gemm_us = kernels.get("mma", kernels.get("prefill"))
        unfused_us = dense_us = None
        if batch < QTIP_DENSE_MIN_ROWS:

            def unfused(t, x=x):
                xh = qtip_hadamard(
                    x,
                    had_in,
                    transpose=True,
                    block_size=in_block,
                    in_scale=SU,
                    factor=1 / 32,
                    out_dtype=torch.float16,
                )
                acc = qtip_gemm(xh, t, tlut, m, K)
                return qtip_hadamard(
                    acc,
                    had_out,
                    block_size=out_block,
                    out_scale=SV,
                    factor=32.0,
                    out_dtype=x.dtype,
                )

            unfused_us = time_graph([lambda t=t: unfused(t) for t in trellises])
        if batch >= 64:
            # The other side of the crossover (fused <-> decode + cuBLAS).
            other_fused = batch >= QTIP_DENSE_MIN_ROWS
            dense_us = time_graph(
                [
                    lambda t=t, x=x, f=other_fused: linear_on_path(
                        x, t, tlut, SU, SV, had_in, had_out, K, (in_block, out_block), f
                    )
                    for t in trellises
                ]
            )
        fp16_us = time_graph([lambda w=w, xh=xh: torch.matmul(xh, w.t()) for w in w16])
        rows.append(
            {
                "m": m,
                "n": n,
                "K": K,
                "tp_split": split,
                "batch": batch,
                "qtip_us": round(qtip_us, 2),
                "fp16_us": round(fp16_us, 2),
                "qtip_gbs": round(nbytes / (qtip_us * 1e-6) / 1e9, 1),
                "gemm_us": None if gemm_us is None else round(gemm_us, 2),
                "unfused_us": None if unfused_us is None else round(unfused_us, 2),
                "other_path_us": None if dense_us is None else round(dense_us, 2),
                "kernels_us": kernels,
                "gemm_gbs": None
                if gemm_us is None
                else round(nbytes / (gemm_us * 1e-6) / 1e9, 1),
                "gemm_tws": None
                if gemm_us is None
                else round(m * n / (gemm_us * 1e-6) / 1e12, 2),
            }
        )
    del trellises, w16
    torch.cuda.empty_cache()
    return rows


def bench_fused_layer(
    model: str, layer: str, shard_rows: list[int], n: int, K: int, batches, dtype
) -> list[dict]:
    """One qtip_matmul call for all shards vs one call per shard."""
    m = sum(shard_rows)
    trellises = random_trellises(m, n, K)
    S = len(shard_rows)
    tlut = torch.randn(S, 512, 2, device="cuda").half()
    SU = torch.randn(S, n, device="cuda")
    SV = torch.rand(m, device="cuda") * 0.01
    had_in, had_out = factor(n), factor(shard_rows[0])
    starts = [sum(shard_rows[:i]) for i in range(S)]

    def per_shard(t, x):
        return torch.cat(
            [
                qtip_matmul(
                    x,
                    t[r0 * n * K // 16 : (r0 + r) * n * K // 16],
                    tlut[i],
                    SU[i],
                    SV[r0 : r0 + r],
                    had_in,
                    had_out,
                    K,
                )
                for i, (r0, r) in enumerate(zip(starts, shard_rows))
            ],
            dim=-1,
        )

    rows = []
    for batch in batches:
        x = torch.randn(batch, n, device="cuda").to(dtype)
        one = time_graph(
            [
                lambda t=t, x=x: qtip_matmul(
                    x, t, tlut, SU, SV, had_in, had_out, K, shard_rows=shard_rows
                )
                for t in trellises
            ]
        )
        each = time_graph([lambda t=t, x=x: per_shard(t, x) for t in trellises])
        rows.append(
            {
                "model": model,
                "layer": layer,
                "shard_rows": shard_rows,
                "n": n,
                "K": K,
                "batch": batch,
                "one_call_us": round(one, 2),
                "per_shard_us": round(each, 2),
            }
        )
    del trellises
    torch.cuda.empty_cache()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="JSON output path")
    parser.add_argument("--K", type=int, nargs="+", default=[2, 3, 4])
    parser.add_argument(
        "--batches", type=int, nargs="+", default=[1, 4, 16, 64, 128, 256, 2048]
    )
    parser.add_argument(
        "--models", nargs="+", default=list(SHAPES), choices=list(SHAPES)
    )
    parser.add_argument("--dtype", default="bfloat16", choices=["float16", "bfloat16"])
    parser.add_argument(
        "--tp-split",
        type=int,
        default=1,
        help="Hadamard blocks of 1/N of each dimension, as a split_for_tp "
        "checkpoint made for N ranks runs at TP=1 (both sides block-diagonal); "
        "the fused-layer table is skipped",
    )
    parser.add_argument(
        "--ceiling-log",
        help="output of hyb_decode_bench.cu from the same run: its best rate is "
        "the decode-only ceiling the fused GEMM is measured against",
    )
    args = parser.parse_args()
    ceiling = decode_ceiling(args.ceiling_log) if args.ceiling_log else None
    if not qtip_kernels_available():
        raise SystemExit("the QTIP kernels are not available on this machine")
    dtype = getattr(torch, args.dtype)

    copy_gbs = copy_bandwidth()
    gpu = torch.cuda.get_device_name()
    print(f"{gpu}, copy {copy_gbs:.0f} GB/s, activations {args.dtype}")
    if args.tp_split > 1:
        print(f"Hadamard blocks of 1/{args.tp_split} of m and n (split_for_tp at TP=1)")
    if ceiling:
        print(f"decode-only ceiling (hyb_decode_bench, K=2): {ceiling:.2f} T weights/s")
    print()
    print(
        "| m | n | K | batch | qtip_us | other path us | 3 ops us | gemm_us "
        "| hadamard us | fp16_us | qtip GB/s | % copy | gemm % copy | fp16/qtip "
        "| gemm T w/s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    shapes = sorted({s for model in args.models for s in SHAPES[model]})
    rows = []
    for K in args.K:
        for m, n in shapes:
            try:
                shape_rows = bench_shape(m, n, K, args.batches, dtype, args.tp_split)
            except RuntimeError as e:  # report and go on with the next shape
                print(f"| {m} | {n} | {K} | failed: {e} |", flush=True)
                torch.cuda.synchronize()
                continue
            for r in shape_rows:
                rows.append(r)
                print_row(r, copy_gbs)
    print(
        "\nFused layers, K=2: one qtip_matmul for all shards vs one per shard\n\n"
        "| model | layer | shards x n | batch | one call us | per shard us |\n"
        "|---|---|---|---|---|---|"
    )
    fused = []
    for model, layer, shard_rows, n in FUSED_LAYERS:
        if model not in args.models or args.tp_split > 1:
            continue
        for r in bench_fused_layer(model, layer, shard_rows, n, 2, args.batches, dtype):
            fused.append(r)
            print(
                f"| {model} | {layer} | {'+'.join(map(str, shard_rows))} x {n} | "
                f"{r['batch']} | {r['one_call_us']:.1f} | {r['per_shard_us']:.1f} |",
                flush=True,
            )
    result = {
        "gpu": gpu,
        "date": datetime.date.today().isoformat(),
        "copy_gbs": round(copy_gbs, 1),
        "decode_ceiling_tws": ceiling,
        "dtype": args.dtype,
        "torch": torch.__version__,
        "rows": rows,
        "fused_layers": fused,
    }
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


def decode_ceiling(path: str) -> float | None:
    """Best T weights/s that hyb_decode_bench printed."""
    rates = []
    with open(path) as f:
        for line in f:
            if "Tweights/s" in line:
                rates.append(float(line.rsplit(";", 1)[1].split()[0]))
    return max(rates) if rates else None


def print_row(r: dict, copy_gbs: float) -> None:
    gemm = "-" if r["gemm_us"] is None else f"{r['gemm_us']:.1f}"
    other = "-" if r["other_path_us"] is None else f"{r['other_path_us']:.1f}"
    unfused = "-" if r["unfused_us"] is None else f"{r['unfused_us']:.1f}"
    had = r["kernels_us"].get("hadamard", 0.0)
    gemm_pct = (
        "-" if r["gemm_gbs"] is None else f"{100 * r['gemm_gbs'] / copy_gbs:.0f}%"
    )
    print(
        f"| {r['m']} | {r['n']} | {r['K']} | {r['batch']} | "
        f"{r['qtip_us']:.1f} | {other} | {unfused} | {gemm} | {had:.1f} | "
        f"{r['fp16_us']:.1f} | "
        f"{r['qtip_gbs']:.0f} | {100 * r['qtip_gbs'] / copy_gbs:.0f}% | "
        f"{gemm_pct} | {r['fp16_us'] / r['qtip_us']:.2f} | {r['gemm_tws'] or '-'} |",
        flush=True,
    )


if __name__ == "__main__":
    main()
