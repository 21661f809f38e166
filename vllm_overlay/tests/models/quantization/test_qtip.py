# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""End-to-end QTIP generation on a GPU, against a reference model.

A random but valid tiny Llama QTIP checkpoint (2 layers, hidden 576 =
36 * 16 and intermediate 1536 = 12 * 128, so both need a non-trivial
Hadamard factor; 9 heads of 64, 3 KV heads) runs in `LLM.generate` with
`enforce_eager=True` and with torch.compile + CUDA graphs. Prompt logprobs
are compared with an HF-transformers LlamaForCausalLM whose quantized
linears run the reference QTIP forward (in fp32), and greedy outputs of the
two modes are compared with each other.

The checkpoints are written in the published relaxml layout (quip_params, no
quantization_config) and load with no `quantization` argument.

Run `pytest tests/models/quantization/test_qtip.py`.
"""

import dataclasses
from pathlib import Path

import pytest
import torch

from tests.quantization.reference_qtip import (
    TinyLlamaSpec,
    build_reference_model,
    random_llama_checkpoint,
    reference_logprobs,
)
from tests.quantization.utils import is_quant_method_supported
from vllm import SamplingParams
from vllm.inputs import TokensPrompt

pytestmark = pytest.mark.skipif(
    not is_quant_method_supported("qtip"),
    reason="QTIP needs a CUDA GPU with compute capability 8.0 or newer",
)

SPEC = TinyLlamaSpec(
    hidden_size=576,
    intermediate_size=1536,
    num_attention_heads=9,
    num_key_value_heads=3,
    head_dim=64,
    num_hidden_layers=2,
    vocab_size=512,
    max_position_embeddings=512,
    # Peaked next-token distributions (top-1 probability ~0.6), so that
    # top-1 comparisons are rarely decided by near-ties.
    logit_scale=6.0,
)
NUM_PROMPTS = 4
PROMPT_LEN = 24
MAX_TOKENS = 8
# Prompt logprobs returned per position (plus the prompt token itself).
TOP_LOGPROBS = 5

# Thresholds against the fp32 reference. The QTIP layers compute the same
# math; the differences come from the model dtype (activations, attention
# and logits rounded to fp16/bf16). A CPU emulation (the reference model run
# in fp16/bf16) gives max |diff| of about 0.02 (fp16) and 0.17 (bf16) on
# prompt tokens for this model.
MAX_LOGPROB_DIFF = {torch.float16: 0.1, torch.bfloat16: 0.5}
# Share of positions where vLLM's top-1 token is the reference's.
MIN_TOP1_AGREEMENT = 0.9
# Where the reference's top-2 logprobs are this far apart the top-1 tokens
# must agree.
CONFIDENT_GAP = 0.25
# Eager and CUDA-graph greedy outputs must be equal, except that a sequence
# may part at a near-tie: each mode's token is the other's runner-up and
# their logprobs differ by less than this.
NEAR_TIE = 0.05


def make_prompts(vocab_size: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(0)
    return [
        torch.randint(3, vocab_size, (PROMPT_LEN,), generator=gen).tolist()
        for _ in range(NUM_PROMPTS)
    ]


def run_vllm(
    vllm_runner,
    path: Path,
    prompts: list[list[int]],
    dtype: torch.dtype,
    enforce_eager: bool,
    **kwargs,
):
    params = SamplingParams(
        temperature=0.0,
        max_tokens=MAX_TOKENS,
        ignore_eos=True,
        logprobs=2,
        prompt_logprobs=TOP_LOGPROBS,
        detokenize=False,
    )
    with vllm_runner(
        str(path),
        dtype=dtype,
        enforce_eager=enforce_eager,
        max_model_len=128,
        max_num_seqs=NUM_PROMPTS,
        skip_tokenizer_init=True,
        gpu_memory_utilization=0.3,
        **kwargs,
    ) as runner:
        assert runner.llm.model_config.quantization == "qtip"
        outputs = runner.llm.generate(
            [TokensPrompt(prompt_token_ids=ids) for ids in prompts],
            params,
            use_tqdm=False,
        )
    return outputs


def check_prompt_logprobs(outputs, prompts, ref_model, dtype: torch.dtype) -> None:
    diffs: list[float] = []
    agree = total = 0
    for output, ids in zip(outputs, prompts):
        ref = reference_logprobs(ref_model, ids).cpu()
        assert output.prompt_logprobs[0] is None
        for pos in range(1, len(ids)):
            # Position pos holds the distribution that predicts ids[pos].
            entries = output.prompt_logprobs[pos]
            assert ids[pos] in entries
            diffs += [
                abs(lp.logprob - ref[pos - 1, token].item())
                for token, lp in entries.items()
            ]
            top = next(token for token, lp in entries.items() if lp.rank == 1)
            ref_top = ref[pos - 1].topk(2)
            total += 1
            agree += top == ref_top.indices[0].item()
            gap = (ref_top.values[0] - ref_top.values[1]).item()
            if gap > CONFIDENT_GAP:
                assert top == ref_top.indices[0].item(), (
                    f"position {pos}: top-1 {top} vs reference "
                    f"{ref_top.indices[0].item()} (reference gap {gap:.3f})"
                )
    max_diff = max(diffs)
    print(
        f"{dtype}: max |logprob diff| {max_diff:.4f}, top-1 agreement {agree}/{total}"
    )
    assert max_diff <= MAX_LOGPROB_DIFF[dtype]
    assert agree / total >= MIN_TOP1_AGREEMENT


def check_greedy_equal(eager_outputs, graph_outputs) -> None:
    for eager, graph in zip(eager_outputs, graph_outputs):
        a, b = eager.outputs[0], graph.outputs[0]
        assert len(a.token_ids) == len(b.token_ids) == MAX_TOKENS
        for step, (x, y) in enumerate(zip(a.token_ids, b.token_ids)):
            if x == y:
                continue
            la, lb = a.logprobs[step], b.logprobs[step]
            assert y in la and x in lb, (
                f"eager {a.token_ids} and CUDA-graph {b.token_ids} greedy outputs "
                f"differ at step {step} beyond a near-tie"
            )
            assert abs(la[x].logprob - la[y].logprob) < NEAR_TIE
            # The sequences continue from different tokens.
            break


@pytest.fixture
def no_tf32(monkeypatch):
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)


def reference(path: Path) -> torch.nn.Module:
    return build_reference_model(path, dtype=torch.float32, device="cuda")


@pytest.mark.parametrize("K", [2, 3, 4])
def test_qtip_eager_and_cuda_graphs_match_reference(
    vllm_runner, tmp_path, no_tf32, K: int
):
    path = random_llama_checkpoint(tmp_path / f"qtip-{K}bit", SPEC, K=K)
    prompts = make_prompts(SPEC.vocab_size)
    eager = run_vllm(vllm_runner, path, prompts, torch.float16, enforce_eager=True)
    graph = run_vllm(vllm_runner, path, prompts, torch.float16, enforce_eager=False)
    ref_model = reference(path)
    check_prompt_logprobs(eager, prompts, ref_model, torch.float16)
    check_prompt_logprobs(graph, prompts, ref_model, torch.float16)
    check_greedy_equal(eager, graph)


@pytest.mark.parametrize(
    "overrides, dtype, kwargs",
    [
        # Format drift: skip-listed projections (dense v in the fused qkv_proj
        # of layer 0, dense down_proj of layer 1), every trellis flat, no
        # rcp/tp_rank, a different K for v_proj, our quantization_config
        # form, and the `-q qtip` flag.
        (
            dict(
                K=3,
                K_v_proj=2,
                skip_list=["0_v", "1_down"],
                flat_trellis="all",
                with_rcp=False,
                layout="quantization_config",
                dtype=torch.bfloat16,
            ),
            torch.bfloat16,
            {"quantization": "qtip"},
        ),
        # A split_for_tp (-TP8 style) checkpoint at TP=1: block-diagonal
        # transforms on the output of column layers and the input of row
        # layers.
        (dict(K=4, split_for_tp=True), torch.float16, {}),
    ],
    ids=["drift-bf16", "split-for-tp"],
)
def test_qtip_checkpoint_variants_match_reference(
    vllm_runner, tmp_path, no_tf32, overrides, dtype, kwargs
):
    spec = dataclasses.replace(SPEC, **overrides)
    path = random_llama_checkpoint(tmp_path / "qtip", spec)
    prompts = make_prompts(spec.vocab_size)
    outputs = run_vllm(vllm_runner, path, prompts, dtype, enforce_eager=True, **kwargs)
    check_prompt_logprobs(outputs, prompts, reference(path), dtype)
