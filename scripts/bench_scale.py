# SPDX-License-Identifier: Apache-2.0
"""Scale table: the largest Llama shapes on one H200, and the cost of TP itself.

Every configuration runs in its own process with dummy weights, CUDA graphs
(captured for the measured batch sizes) and torch.compile on, and measures
decode throughput with 32-token prompts and 128 generated tokens per request
at each batch size:

    70b-qtip2, 70b-qtip4   Llama-3.1-70B shape, QTIP 2/4-bit, one GPU
    70b-fp16-tp2           the same shape in FP16 over two GPUs (TP=2)
    405b-qtip2             Llama-3.1-405B shape, QTIP 2-bit, one GPU, with
                           max_model_len=-1: vLLM fits the longest context the
                           KV cache left after the weights holds (4096-token
                           prefill chunks, to leave it more memory)
    7b-qtip2-tp1/-tp2      Llama-2-7B shape, QTIP 2-bit quantized over whole
                           matrices (rcp = 0, all-gathers at TP=2)
    7b-qtip2split-tp1/-tp2 the same with split_for_tp (no extra collective)

    python scripts/bench_scale.py --out benchmarks/scale_h200.json
    python scripts/bench_scale.py --out ... --resume --configs 405b-qtip2

writes `{"gpu", "date", "vllm", "rows": [{"model", "weights", "gpus", "tp",
"pp", "batch", "tok_s", "weights_gib", "kv_cache_gib", "kv_cache_tokens",
"max_model_len", "load_s", "init_s", "host_rss_gib"}]}` and prints Markdown
tables (tok/s per request and per GPU, the memory split, and the TP=2 cost
of rcp = 0 against split_for_tp). weights_gib and kv_cache_gib are summed
over the GPUs, from the workers' parameters and KV cache tensors; load_s is
vLLM's "Model loading took" time (building the model with dummy weights),
init_s the whole LLM start-up (with profiling, compilation and CUDA graphs)
and host_rss_gib the largest peak resident host memory of a worker process.
The JSON is rewritten
after every configuration; --resume keeps those already in it (same GPU), so
a run cut by a time limit continues where it stopped. Configurations that
need more GPUs than the host has are skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_e2e import MODELS as E2E_MODELS
from bench_e2e import (
    PROMPT_LEN,
    QTIP,
    decode_tok_s,
    measured_graphs,
    start_result,
    write_llama_dir,
)

LLAMA_31_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}
MODELS = {
    "llama-2-7b": E2E_MODELS["llama-2-7b"],
    "llama-3.1-70b": dict(
        hidden_size=8192,
        intermediate_size=28672,
        num_hidden_layers=80,
        num_attention_heads=64,
        num_key_value_heads=8,
        vocab_size=128256,
        max_position_embeddings=131072,
        rope_theta=500000.0,
        rope_scaling=LLAMA_31_ROPE,
    ),
    "llama-3.1-405b": dict(
        hidden_size=16384,
        intermediate_size=53248,
        num_hidden_layers=126,
        num_attention_heads=128,
        num_key_value_heads=8,
        vocab_size=128256,
        max_position_embeddings=131072,
        rope_theta=500000.0,
        rope_scaling=LLAMA_31_ROPE,
    ),
}
WEIGHTS = {
    "fp16": None,
    "qtip2": {**QTIP, "K": 2},
    "qtip4": {**QTIP, "K": 4},
    "qtip2-split": {**QTIP, "K": 2, "split_for_tp": True},
}


def config(model: str, weights: str, batches: list[int], **llm_args) -> dict:
    return dict(
        model=model,
        weights=weights,
        batches=batches,
        tp=llm_args.pop("tensor_parallel_size", 1),
        pp=llm_args.pop("pipeline_parallel_size", 1),
        llm_args={
            "max_model_len": 2048,
            "compilation_config": measured_graphs(batches),
            **llm_args,
        },
    )


CONFIGS = {
    "70b-qtip2": config("llama-3.1-70b", "qtip2", [1, 16, 64]),
    "70b-qtip4": config("llama-3.1-70b", "qtip4", [1, 16, 64]),
    "70b-fp16-tp2": config(
        "llama-3.1-70b", "fp16", [1, 16, 64], tensor_parallel_size=2
    ),
    "405b-qtip2": config(
        "llama-3.1-405b",
        "qtip2",
        [1, 16],
        max_model_len=-1,
        max_num_batched_tokens=4096,
    ),
    "7b-qtip2-tp1": config("llama-2-7b", "qtip2", [1, 64]),
    "7b-qtip2-tp2": config("llama-2-7b", "qtip2", [1, 64], tensor_parallel_size=2),
    "7b-qtip2split-tp1": config("llama-2-7b", "qtip2-split", [1, 64]),
    "7b-qtip2split-tp2": config(
        "llama-2-7b", "qtip2-split", [1, 64], tensor_parallel_size=2
    ),
}
GEN_LEN = 128
GIB = 1 << 30
# vLLM's log line after building the model (V1 and V2 model runners).
LOAD_TIME = re.compile(
    r"Model loading took [\d.]+ GiB (?:memory )?and ([\d.]+) seconds"
)


def write_model_dir(root: Path, model: str, weights: str) -> str:
    return str(
        write_llama_dir(root / f"{model}-{weights}", MODELS[model], WEIGHTS[weights])
    )


def _unique_bytes(tensors) -> int:
    """Bytes of the distinct storages behind tensors (tied weights once)."""
    seen = {}
    for t in tensors:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def _memory_split(worker) -> dict:
    """On a worker: bytes of its model's parameters and of its KV cache, and
    its peak resident host memory."""
    import resource

    model = worker.get_model()
    return {
        "weights": _unique_bytes(model.parameters()),
        "kv_cache": _unique_bytes(worker.model_runner.kv_caches),
        # Linux reports KiB.
        "host_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }


def run_one(cfg: dict, model_dir: str) -> dict:
    """Measure one configuration in this process."""
    from vllm import LLM

    batches = cfg["batches"]
    start = time.perf_counter()
    llm = LLM(
        model=model_dir,
        load_format="dummy",
        skip_tokenizer_init=True,
        dtype="float16",
        tensor_parallel_size=cfg["tp"],
        pipeline_parallel_size=cfg["pp"],
        max_num_seqs=max(batches),
        gpu_memory_utilization=0.92,
        seed=0,
        **cfg["llm_args"],
    )
    init_s = time.perf_counter() - start
    vllm_config = llm.llm_engine.vllm_config
    memory = llm.collective_rpc(_memory_split)
    cache = vllm_config.cache_config
    info = {
        "weights_gib": round(sum(m["weights"] for m in memory) / GIB, 2),
        "kv_cache_gib": round(sum(m["kv_cache"] for m in memory) / GIB, 2),
        "kv_cache_tokens": cache.num_gpu_blocks * cache.block_size,
        "max_model_len": vllm_config.model_config.max_model_len,
        "init_s": round(init_s, 1),
        "host_rss_gib": round(max(m["host_rss"] for m in memory) / GIB, 2),
    }
    return {"rows": decode_tok_s(llm, batches, GEN_LEN), **info}


def gpu_count() -> int:
    import torch

    return torch.accelerator.device_count()


def print_tables(result: dict) -> None:
    rows = result["rows"]
    print(
        f"\n{result['gpu']}, {result['date']}, vLLM {result['vllm']}, decode "
        f"({PROMPT_LEN}-token prompts, {GEN_LEN} new tokens), dummy weights\n"
    )
    print(
        "| model | weights | GPUs | TP | PP | batch | tok/s | tok/s per request "
        "| tok/s per GPU |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(
            f"| {r['model']} | {r['weights']} | {r['gpus']} | {r['tp']} | {r['pp']} "
            f"| {r['batch']} | {r['tok_s']} | {r['tok_s'] / r['batch']:.1f} "
            f"| {r['tok_s'] / r['gpus']:.1f} |"
        )
    print(
        "\n| model | weights | GPUs | weights GiB | KV cache GiB | KV cache tokens "
        "| max_model_len | load s | start-up s | worker host RSS GiB |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    seen = set()
    for r in rows:
        key = (r["model"], r["weights"], r["tp"], r["pp"])
        if key in seen:
            continue
        seen.add(key)
        print(
            f"| {r['model']} | {r['weights']} | {r['gpus']} | {r['weights_gib']} "
            f"| {r['kv_cache_gib']} | {r['kv_cache_tokens']} | {r['max_model_len']} "
            f"| {r['load_s']} | {r['init_s']} | {r['host_rss_gib']} |"
        )
    # What the extra all-gathers of rcp = 0 cost at TP=2, against split_for_tp.
    by_key = {(r["model"], r["weights"], r["tp"], r["batch"]): r["tok_s"] for r in rows}
    lines = []
    for (model, weights, tp, batch), tok_s in by_key.items():
        split = by_key.get((model, f"{weights}-split", tp, batch))
        if tp > 1 and split:
            lines.append(
                f"| {model} | {weights} | {tp} | {batch} | {tok_s} | {split} "
                f"| {100 * (split - tok_s) / split:.1f} % |"
            )
    if lines:
        print(
            "\n| model | weights | TP | batch | rcp=0 tok/s | split_for_tp tok/s "
            "| rcp=0 slower by |"
        )
        print("| --- | --- | --- | --- | --- | --- | --- |")
        print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS))
    parser.add_argument("--out", type=Path)
    parser.add_argument(
        "--resume", action="store_true", help="keep the configurations in --out"
    )
    parser.add_argument("--one", help=argparse.SUPPRESS)  # child: config name
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        result = run_one(CONFIGS[args.one], args.model_dir)
        print("RESULT " + json.dumps(result), flush=True)
        return
    unknown = set(args.configs) - set(CONFIGS)
    if unknown:
        parser.error(
            f"unknown configurations {sorted(unknown)}; choose from {list(CONFIGS)}"
        )

    result = start_result(args.out, args.resume)
    rows = result["rows"]
    gpus_here = gpu_count()
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.configs:
            cfg = CONFIGS[name]
            model, weights, tp, pp = (cfg[k] for k in ("model", "weights", "tp", "pp"))
            if any(
                (r["model"], r["weights"], r["tp"], r["pp"]) == (model, weights, tp, pp)
                for r in rows
            ):
                continue
            if tp * pp > gpus_here:
                print(f"{name}: skipped, needs {tp * pp} GPUs", flush=True)
                continue
            cmd = [
                sys.executable,
                __file__,
                "--one",
                name,
                "--model-dir",
                write_model_dir(Path(tmp), model, weights),
            ]
            env = dict(
                os.environ,
                TOKENIZERS_PARALLELISM="false",
                # collective_rpc(_memory_split) sends a function to the workers.
                VLLM_ALLOW_INSECURE_SERIALIZATION="1",
            )
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            found = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode != 0 or not found:
                print(f"{name}: FAILED\n{proc.stderr[-3000:]}", flush=True)
                continue
            measured = json.loads(found[-1][7:])
            # One line per worker; the model is built on all of them at once.
            load = LOAD_TIME.findall(proc.stdout + proc.stderr)
            measured["load_s"] = max((float(t) for t in load), default=None)
            for row in measured.pop("rows"):
                rows.append(
                    {
                        "model": model,
                        "weights": weights,
                        "gpus": tp * pp,
                        "tp": tp,
                        "pp": pp,
                        **row,
                        **measured,
                    }
                )
                print(rows[-1], flush=True)
            if args.out:
                args.out.write_text(json.dumps(result, indent=1) + "\n")
    print_tables(result)


if __name__ == "__main__":
    main()
