# SPDX-License-Identifier: Apache-2.0
"""Where one decode step's GPU time goes, through vLLM (torch profiler).

    python scripts/profile_decode.py --model llama-2-7b --weights qtip2 \
        --batch 1 --out decode_profile.json

Builds the same dummy-weight model as bench_e2e.py in this process
(VLLM_ENABLE_V1_MULTIPROCESSING=0, so the profiler sees the engine's kernels),
decodes ``--steps`` tokens for ``--batch`` sequences, and sums the CUDA
kernels by kind: QTIP GEMMs (fused, prefill) / decode / Hadamard, attention,
other GEMMs (cuBLAS/CUTLASS: lm_head, AWQ, FP16 layers) and the rest (norms,
rotary, activation, sampling, copies). Per decode step it reports kernel time
and launches per kind, and the wall time of a step measured without the
profiler (the gap is launch/host time). With CUDA graphs (the default) the
kernels of a replayed graph are still traced one by one; ``--eager`` profiles
without graphs or torch.compile for comparison.

With ``--tp N`` (N > 1) the workers are other processes, so vLLM's own
profiler (``profiler_config``) traces each rank; its Chrome traces are summed
the same way, per rank, and collectives (custom all-reduce, NCCL) get a kind
of their own.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_e2e import MODELS, write_llama_dir  # noqa: E402
from bench_e2e import WEIGHTS as E2E_WEIGHTS  # noqa: E402
from bench_scale import WEIGHTS as SCALE_WEIGHTS  # noqa: E402
from kernel_names import QTIP_TRANSFORM_KERNELS  # noqa: E402

WEIGHTS = {**E2E_WEIGHTS, "qtip2-split": SCALE_WEIGHTS["qtip2-split"]}

# (kind, substrings of the kernel name), first match wins.
KINDS = (
    ("qtip_mma", ("qtip_mma_kernel",)),
    ("qtip_prefill", ("qtip_prefill_kernel",)),
    ("qtip_decode", ("qtip_decode_kernel",)),
    ("qtip_hadamard", QTIP_TRANSFORM_KERNELS),
    ("collective", ("cross_device_reduce", "allreduce", "all_reduce", "nccl")),
    ("attention", ("flash", "attn", "attention", "reshape_and_cache", "paged")),
    ("gemm", ("gemm", "gemv", "cutlass", "xmma", "nvjet", "machete", "cublas")),
)


def kind_of(name: str) -> str:
    low = name.lower()
    for kind, keys in KINDS:
        if any(k in low for k in keys):
            return kind
    return "other"


# Kernel name -> (device us, launches) over one profiled window.
KernelTotals = dict[str, tuple[float, int]]


def in_process_totals(prof) -> KernelTotals:
    import torch

    return {
        e.key: (e.device_time_total, e.count)
        for e in prof.key_averages()
        if e.device_type == torch.autograd.DeviceType.CUDA
    }


def trace_totals(path: Path) -> KernelTotals:
    """Kernel time and launches of one rank's Chrome trace."""
    us: dict[str, float] = defaultdict(float)
    calls: dict[str, int] = defaultdict(int)
    for event in json.loads(path.read_text())["traceEvents"]:
        if event.get("cat") == "kernel":
            us[event["name"]] += event.get("dur", 0.0)
            calls[event["name"]] += 1
    return {name: (us[name], calls[name]) for name in us}


def per_step(long: KernelTotals, short: KernelTotals, steps: int) -> dict:
    """Per decode step: the difference of two windows that share the
    prefill, by kind and for the top kernels."""
    kinds = [k for k, _ in KINDS] + ["other"]
    us: dict[str, float] = defaultdict(float)
    calls: dict[str, float] = defaultdict(float)
    diff = {}
    for name, (t_long, n_long) in long.items():
        t_short, n_short = short.get(name, (0.0, 0))
        diff[name] = ((t_long - t_short) / steps, (n_long - n_short) / steps)
        us[kind_of(name)] += diff[name][0]
        calls[kind_of(name)] += diff[name][1]
    rows = [
        {"kind": k, "us": round(us[k], 1), "launches": round(calls[k], 1)}
        for k in kinds
    ]
    top = sorted(diff.items(), key=lambda item: -item[1][0])[:12]
    return {
        "kernel_ms": round(sum(us.values()) / 1e3, 3),
        "rows": rows,
        "top_kernels": [
            {
                "name": name[:120],
                "us_per_step": round(t, 1),
                "calls_per_step": round(n, 1),
            }
            for name, (t, n) in top
        ],
    }


# Kinds that are not the linear layers (nor lm_head).
NOT_LINEAR = ("attention", "collective", "other")


def linear_layers_us(result: dict) -> float:
    """The step's wall time left to the linear layers and lm_head: the step
    minus the other kinds' kernels. The QTIP kernels' own times overlap
    (under programmatic dependent launch a kernel's time includes its wait),
    so their sum overstates what they cost the step; this does not."""
    rest = sum(r["us"] for r in result["rows"] if r["kind"] in NOT_LINEAR)
    return result["step_ms"] * 1e3 - rest


def print_step(result: dict) -> None:
    step_us = result["step_ms"] * 1e3
    print("| kind | us / step | % of step | launches / step |")
    print("| --- | --- | --- | --- |")
    for r in result["rows"]:
        share = 100 * r["us"] / step_us
        print(f"| {r['kind']} | {r['us']} | {share:.0f}% | {r['launches']} |")
    gap = step_us - result["kernel_ms"] * 1e3
    label = "(no kernel running)" if gap >= 0 else "(kernels overlapping)"
    print(f"| {label} | {gap:.1f} | {100 * gap / step_us:.0f}% | |")
    layers = linear_layers_us(result)
    print(
        f"| linear layers + lm_head (step minus {', '.join(NOT_LINEAR)}) | "
        f"{layers:.1f} | {100 * layers / step_us:.0f}% | |"
    )
    print("\ntop kernels:")
    for k in result["top_kernels"]:
        print(f"  {k['us_per_step']:8.1f} us {k['calls_per_step']:6.1f}x  {k['name']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=list(MODELS), default="llama-2-7b")
    parser.add_argument("--weights", choices=list(WEIGHTS), default="qtip2")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    parser.add_argument("--eager", action="store_true")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"

    import torch
    from torch.profiler import ProfilerActivity, profile

    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    tmp = tempfile.TemporaryDirectory()  # removed at exit
    trace_dir = Path(tmp.name) / "traces"
    llm_args = {}
    if args.tp > 1:
        llm_args["profiler_config"] = {
            "profiler": "torch",
            "torch_profiler_dir": str(trace_dir),
            "torch_profiler_with_stack": False,
            "torch_profiler_use_gzip": False,
            "torch_profiler_dump_cuda_time_total": False,
        }
    model_dir = write_llama_dir(
        Path(tmp.name) / f"{args.model}-{args.weights}",
        MODELS[args.model],
        WEIGHTS[args.weights],
    )
    llm = LLM(
        model=str(model_dir),
        load_format="dummy",
        skip_tokenizer_init=True,
        dtype="float16",
        max_model_len=1024,
        max_num_seqs=max(args.batch, 1),
        gpu_memory_utilization=0.85,
        enforce_eager=args.eager,
        tensor_parallel_size=args.tp,
        seed=0,
        **llm_args,
    )
    prompts = [
        TokensPrompt(
            prompt_token_ids=[(i * 131 + j * 7) % 30000 + 1 for j in range(32)]
        )
        for i in range(args.batch)
    ]

    def decode(steps: int) -> float:
        params = SamplingParams(
            max_tokens=steps, min_tokens=steps, ignore_eos=True, temperature=0.0
        )
        start = time.perf_counter()
        llm.generate(prompts, params, use_tqdm=False)
        return time.perf_counter() - start

    decode(args.steps)  # warm-up (compile, graphs)
    # Wall time per decode step: difference of two lengths cancels prefill.
    short, long = decode(8), decode(8 + args.steps)
    step_ms = (long - short) / args.steps * 1e3

    # Kernel totals of the same two lengths, per rank.
    if args.tp == 1:
        with profile(activities=[ProfilerActivity.CUDA]) as prof_long:
            decode(8 + args.steps)
        with profile(activities=[ProfilerActivity.CUDA]) as prof_short:
            decode(8)
        windows = [(in_process_totals(prof_long), in_process_totals(prof_short))]
    else:
        for steps in (8 + args.steps, 8):
            llm.start_profile()
            decode(steps)
            llm.stop_profile()  # each rank writes its trace before this returns
        windows = []
        for rank in range(args.tp):
            # One trace per window, named after the rank (dp0_pp0_tp<rank>_...).
            traces = sorted(
                trace_dir.glob(f"*_tp{rank}_*.json"), key=lambda t: t.stat().st_mtime
            )
            if len(traces) != 2:
                raise RuntimeError(
                    f"expected 2 traces of rank {rank} in {trace_dir}, found "
                    f"{[t.name for t in traces]}"
                )
            windows.append((trace_totals(traces[0]), trace_totals(traces[1])))

    result = {
        "gpu": torch.cuda.get_device_name(),
        "model": args.model,
        "weights": args.weights,
        "batch": args.batch,
        "tp": args.tp,
        "cuda_graphs": not args.eager,
        "step_ms": round(step_ms, 3),
        **per_step(*windows[0], args.steps),
    }
    if args.tp > 1:
        result["ranks"] = [
            {"rank": rank, **per_step(long_w, short_w, args.steps)}
            for rank, (long_w, short_w) in enumerate(windows)
        ]
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    mode = "eager" if args.eager else "CUDA graphs + torch.compile"
    print(
        f"\n{result['gpu']}: {args.model} {args.weights}, batch {args.batch}, "
        f"TP={args.tp}, {mode}; decode step {step_ms:.3f} ms wall, "
        f"{result['kernel_ms']:.3f} ms in kernels (rank 0)\n"
    )
    print_step(result)


if __name__ == "__main__":
    main()
