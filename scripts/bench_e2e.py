# SPDX-License-Identifier: Apache-2.0
"""End-to-end decode speed through vLLM: FP16 vs AWQ 4-bit vs QTIP 2/3/4-bit.

Every configuration runs in its own process, with dummy weights, CUDA graphs
(captured for the measured batch sizes) and torch.compile on. Decode
throughput is measured with 32-token prompts and 256 generated tokens at each
batch size; time to first token with one 2048-token prompt.

    python scripts/bench_e2e.py --out benchmarks/e2e_h100.json

writes the JSON (`{"gpu", "date", "vllm", "rows": [{"model", "weights",
"batch", "tok_s", "ttft_ms"}]}`) and prints a Markdown table. The JSON is
rewritten after every configuration; ``--resume`` keeps the configurations
already in it (same GPU), so a run cut by a time limit continues where it
stopped.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODELS = {
    "llama-2-7b": dict(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32000,
        max_position_embeddings=4096,
        rope_theta=10000.0,
    ),
    "llama-3.1-8b": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        max_position_embeddings=8192,
        rope_theta=500000.0,
    ),
}
QTIP = {
    "quant_method": "qtip",
    "L": 16,
    "V": 2,
    "tlut_bits": 9,
    "decode_mode": "quantlut_sym",
    "td_x": 16,
    "td_y": 16,
}
WEIGHTS = {
    "fp16": None,
    "awq4": {
        "quant_method": "awq",
        "bits": 4,
        "group_size": 128,
        "zero_point": True,
        "version": "gemm",
    },
    "qtip2": {**QTIP, "K": 2},
    "qtip3": {**QTIP, "K": 3},
    "qtip4": {**QTIP, "K": 4},
}
PROMPT_LEN, GEN_LEN, TTFT_LEN = 32, 256, 2048


def write_llama_dir(path: Path, dims: dict, quant: dict | None, **extra) -> Path:
    """A Llama model folder holding only its config.json (for dummy weights):
    the shape `dims`, the quantization_config `quant` and any `extra` keys."""
    path.mkdir(parents=True, exist_ok=True)
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "torch_dtype": "float16",
        "rms_norm_eps": 1e-5,
        **dims,
        **extra,
    }
    if quant is not None:
        config["quantization_config"] = quant
    (path / "config.json").write_text(json.dumps(config))
    return path


def write_model_dir(root: Path, model: str, weights: str) -> str:
    return str(
        write_llama_dir(root / f"{model}-{weights}", MODELS[model], WEIGHTS[weights])
    )


def start_result(out: Path | None, resume: bool) -> dict:
    """A new result (GPU, date, vLLM version, no rows), or with ``resume`` the
    one in ``out`` when it was measured on the same GPU."""
    import torch

    import vllm

    result = {
        "gpu": torch.cuda.get_device_name(),
        "date": datetime.date.today().isoformat(),
        "vllm": vllm.__version__,
        "rows": [],
    }
    if resume and out and out.exists():
        previous = json.loads(out.read_text())
        if previous["gpu"] != result["gpu"]:
            raise SystemExit(
                f"--resume: {out} was measured on {previous['gpu']}, "
                f"this is {result['gpu']}"
            )
        result = previous
    return result


def token_prompts(vocab: int, n: int, length: int, salt: int = 0) -> list:
    """n deterministic prompts of `length` token ids below `vocab` (a new
    salt gives new prompts, which the prefix cache has not seen)."""
    from vllm.inputs import TokensPrompt

    return [
        TokensPrompt(
            prompt_token_ids=[
                (i * 7919 + j * 31 + salt * 104729) % (vocab - 1) + 1
                for j in range(length)
            ]
        )
        for i in range(n)
    ]


def measured_graphs(batches: list[int]) -> dict:
    """vLLM compilation_config with CUDA graphs for the measured batch sizes
    only: a decode step of each batch runs the same graph as with vLLM's
    default sizes, and start-up (up to 150 s for 405B on the H200) captures
    no sizes nobody runs. Prompts longer than the largest size run without a
    graph either way."""
    return {"cudagraph_capture_sizes": sorted(batches)}


def decode_tok_s(llm, batches: list[int], gen_len: int) -> list[dict]:
    """Decode tok/s at each batch size: PROMPT_LEN-token prompts, gen_len
    new tokens each, after one warm-up at the largest batch."""
    from vllm import SamplingParams

    vocab = llm.llm_engine.model_config.get_vocab_size()
    decode = SamplingParams(
        max_tokens=gen_len,
        min_tokens=gen_len,
        ignore_eos=True,
        temperature=0.0,
        detokenize=False,
    )
    llm.generate(token_prompts(vocab, max(batches), PROMPT_LEN), decode, use_tqdm=False)
    rows = []
    for batch in batches:
        start = time.perf_counter()
        llm.generate(token_prompts(vocab, batch, PROMPT_LEN), decode, use_tqdm=False)
        elapsed = time.perf_counter() - start
        rows.append({"batch": batch, "tok_s": round(batch * gen_len / elapsed, 1)})
    return rows


def run_one(model_dir: str, batches: list[int]) -> list[dict]:
    """Measure one configuration in this process."""
    from vllm import LLM, SamplingParams

    llm = LLM(
        model=model_dir,
        load_format="dummy",
        skip_tokenizer_init=True,
        dtype="float16",
        max_model_len=TTFT_LEN + 64,
        max_num_seqs=max(batches),
        gpu_memory_utilization=0.85,
        seed=0,
        compilation_config=measured_graphs(batches),
    )
    vocab = llm.llm_engine.model_config.get_vocab_size()
    rows = decode_tok_s(llm, batches, GEN_LEN)
    first = SamplingParams(max_tokens=1, temperature=0.0, detokenize=False)
    times = []
    for rep in range(5):
        start = time.perf_counter()
        # A new prompt each time: a repeated one would hit the prefix cache.
        llm.generate(
            token_prompts(vocab, 1, TTFT_LEN, salt=rep + 1), first, use_tqdm=False
        )
        times.append(time.perf_counter() - start)
    ttft_ms = round(sorted(times)[len(times) // 2] * 1000, 1)
    for row in rows:
        row["ttft_ms"] = ttft_ms
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--weights", nargs="+", default=list(WEIGHTS))
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 16, 64])
    parser.add_argument("--out", type=Path)
    parser.add_argument(
        "--resume", action="store_true", help="keep the configurations in --out"
    )
    parser.add_argument("--one", help=argparse.SUPPRESS)  # child: model dir
    args = parser.parse_args()
    if args.one:
        print("ROWS " + json.dumps(run_one(args.one, args.batches)), flush=True)
        return

    result = start_result(args.out, args.resume)
    rows = result["rows"]
    done = {(r["model"], r["weights"]) for r in rows}
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models:
            for weights in args.weights:
                if (model, weights) in done:
                    continue
                model_dir = write_model_dir(Path(tmp), model, weights)
                cmd = [
                    sys.executable,
                    __file__,
                    "--one",
                    model_dir,
                    "--batches",
                    *map(str, args.batches),
                ]
                proc = subprocess.run(
                    cmd,
                    capture_output=True,
                    text=True,
                    env=dict(os.environ, TOKENIZERS_PARALLELISM="false"),
                )
                found = [
                    ln for ln in proc.stdout.splitlines() if ln.startswith("ROWS ")
                ]
                if proc.returncode != 0 or not found:
                    print(
                        f"{model} {weights}: FAILED\n{proc.stderr[-3000:]}", flush=True
                    )
                    continue
                for row in json.loads(found[-1][5:]):
                    rows.append({"model": model, "weights": weights, **row})
                    print(rows[-1], flush=True)
                if args.out:
                    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(
        f"\n{result['gpu']}, {result['date']}, vLLM {result['vllm']}, decode tok/s "
        f"({PROMPT_LEN}-token prompts, {GEN_LEN} new tokens); "
        f"TTFT at {TTFT_LEN} tokens\n"
    )
    print(
        "| model | weights | "
        + " | ".join(f"batch {b}" for b in args.batches)
        + " | TTFT ms |"
    )
    print("| --- | --- |" + " --- |" * (len(args.batches) + 1))
    for model in args.models:
        for weights in args.weights:
            mine = {
                r["batch"]: r
                for r in rows
                if r["model"] == model and r["weights"] == weights
            }
            if mine:
                cells = [
                    str(mine[b]["tok_s"]) if b in mine else "-" for b in args.batches
                ]
                ttft = next(iter(mine.values()))["ttft_ms"]
                print(f"| {model} | {weights} | " + " | ".join(cells) + f" | {ttft} |")


if __name__ == "__main__":
    main()
