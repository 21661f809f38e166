# SPDX-License-Identifier: Apache-2.0
"""Where one decode step's GPU time goes, through vLLM (torch profiler).

    python scripts/profile_decode.py --model llama-2-7b --weights qtip2 \
        --batch 1 --out decode_profile.json

Builds the same dummy-weight model as bench_e2e.py in this process
(VLLM_ENABLE_V1_MULTIPROCESSING=0, so the profiler sees the engine's
kernels), decodes ``--steps`` tokens for ``--batch`` sequences, and sums the
CUDA kernels by kind: QTIP GEMM / decode / Hadamard, attention, other GEMMs
(cuBLAS/CUTLASS: lm_head, AWQ, FP16 layers) and the rest (norms, rotary,
activation, sampling, copies). Per decode step it reports kernel time and
launches per kind, and the wall time of a step measured without the profiler
(the gap is launch/host time). With CUDA graphs (the default) the kernels of
a replayed graph are still traced one by one; ``--eager`` profiles without
graphs or torch.compile for comparison.
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
from bench_e2e import MODELS, WEIGHTS, write_model_dir  # noqa: E402

# (kind, substrings of the kernel name), first match wins.
KINDS = (
    ("qtip_mma", ("qtip_mma_kernel",)),
    ("qtip_decode", ("qtip_decode_kernel",)),
    # Every transform kernel, as bench_kernels.py's KERNEL_KINDS counts them.
    (
        "qtip_hadamard",
        (
            "qtip_hadamard_kernel",
            "qtip_sylvester4096_kernel",
            "qtip_hk512_kernel",
            "qtip_hk64_",  # qtip_hk64_kernel, qtip_hk64_in_kernel
        ),
    ),
    ("attention", ("flash", "attn", "attention", "reshape_and_cache", "paged")),
    ("gemm", ("gemm", "gemv", "cutlass", "xmma", "nvjet", "machete", "cublas")),
)


def kind_of(name: str) -> str:
    low = name.lower()
    for kind, keys in KINDS:
        if any(k in low for k in keys):
            return kind
    return "other"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=list(MODELS), default="llama-2-7b")
    parser.add_argument("--weights", choices=list(WEIGHTS), default="qtip2")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--eager", action="store_true")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"

    import torch
    from torch.profiler import ProfilerActivity, profile

    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    tmp = tempfile.TemporaryDirectory()  # removed at exit
    llm = LLM(
        model=write_model_dir(Path(tmp.name), args.model, args.weights),
        load_format="dummy",
        skip_tokenizer_init=True,
        dtype="float16",
        max_model_len=1024,
        max_num_seqs=max(args.batch, 1),
        gpu_memory_utilization=0.85,
        enforce_eager=args.eager,
        seed=0,
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

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        decode(8 + args.steps)
    with profile(activities=[ProfilerActivity.CUDA]) as prof_short:
        decode(8)

    cuda = torch.autograd.DeviceType.CUDA

    def totals(p) -> tuple[dict, dict]:
        us: dict[str, float] = defaultdict(float)
        calls: dict[str, int] = defaultdict(int)
        for evt in p.key_averages():
            if evt.device_type != cuda:
                continue
            kind = kind_of(evt.key)
            us[kind] += evt.device_time_total
            calls[kind] += evt.count
        return us, calls

    (us_l, calls_l), (us_s, calls_s) = totals(prof), totals(prof_short)
    kinds = [k for k, _ in KINDS] + ["other"]
    rows = []
    for kind in kinds:
        per_step = (us_l[kind] - us_s[kind]) / args.steps
        launches = (calls_l[kind] - calls_s[kind]) / args.steps
        rows.append(
            {"kind": kind, "us": round(per_step, 1), "launches": round(launches, 1)}
        )
    kernel_us = sum(r["us"] for r in rows)
    result = {
        "gpu": torch.cuda.get_device_name(),
        "model": args.model,
        "weights": args.weights,
        "batch": args.batch,
        "cuda_graphs": not args.eager,
        "step_ms": round(step_ms, 3),
        "kernel_ms": round(kernel_us / 1e3, 3),
        "rows": rows,
    }
    top = sorted(
        (
            e
            for e in prof.key_averages()
            if e.device_type == torch.autograd.DeviceType.CUDA
        ),
        key=lambda e: -e.device_time_total,
    )[:12]
    result["top_kernels"] = [
        {
            "name": e.key[:120],
            "us_per_step": round(e.device_time_total / (args.steps + 8), 1),
            "calls_per_step": round(e.count / (args.steps + 8), 1),
        }
        for e in top
    ]
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    mode = "eager" if args.eager else "CUDA graphs + torch.compile"
    print(
        f"\n{result['gpu']}: {args.model} {args.weights}, batch {args.batch}, {mode}; "
        f"decode step {step_ms:.3f} ms wall, {kernel_us / 1e3:.3f} ms in kernels\n"
    )
    print("| kind | us / step | % of step | launches / step |")
    print("| --- | --- | --- | --- |")
    for r in rows:
        share = 100 * r["us"] / (step_ms * 1e3)
        print(f"| {r['kind']} | {r['us']} | {share:.0f}% | {r['launches']} |")
    gap = step_ms * 1e3 - kernel_us
    print(f"| (no kernel running) | {gap:.1f} | {100 * gap / (step_ms * 1e3):.0f}% | |")
    print("\ntop kernels:")
    for k in result["top_kernels"]:
        print(f"  {k['us_per_step']:8.1f} us {k['calls_per_step']:6.1f}x  {k['name']}")


if __name__ == "__main__":
    main()
