# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""QTIP checkpoints at tensor_parallel_size=2 and pipeline_parallel_size=2.

A random but valid tiny Llama QTIP checkpoint of each kind (whole-matrix
rcp = 0 and split_for_tp, K = 2 and 4, fused q/k/v with GQA: 12 query heads
and 4 KV heads, or one KV head replicated on both ranks) runs in
`LLM.generate` at TP=1 (eager), TP=2 (torch.compile + CUDA graphs, the
default) and PP=2 (eager). Each parallel run must give TP=1's greedy tokens
(up to a near-tie, as in test_qtip.py), its logprobs within the tolerance
that test uses against the fp32 reference, and pass that reference check
itself.

Those need two GPUs. On one GPU, the kernel path of whole-matrix layers at
TP > 1 (qtip_parallel: input transform, W_hat product, all-gather, output
transform) runs with a single rank, where the all-gathers are identities,
against the layers' usual kernel calls.

Run `pytest tests/models/quantization/test_qtip_parallel.py`.
"""

import dataclasses

import pytest
import torch

from tests.models.quantization.test_qtip import (
    MAX_LOGPROB_DIFF,
    NEAR_TIE,
    check_prompt_logprobs,
    make_prompts,
    reference,
    run_vllm,
)
from tests.quantization.reference_qtip import (
    TinyLlamaSpec,
    quip_params,
    random_llama_checkpoint,
    random_llama_tensors,
)
from tests.quantization.test_qtip import LlamaLinears
from tests.quantization.utils import is_quant_method_supported
from vllm._qtip_ops import QTIP_DENSE_MIN_ROWS
from vllm.model_executor.layers.quantization.qtip import QTIPConfig

pytestmark = pytest.mark.skipif(
    not is_quant_method_supported("qtip"),
    reason="QTIP needs a CUDA GPU with compute capability 8.0 or newer",
)

# Splits over two ranks in whole 32 x 32 trellis blocks (q: 384 rows per
# rank, k/v: 128, gate/up: 768, o/down: 384/768 input columns); hidden 768 =
# 12 * 64 and intermediate 1536 = 12 * 128 transform with H_12, and the
# split_for_tp blocks (768/8 = 96, 256/8 = 32, 1536/8 = 192) are valid
# Hadamard sizes.
SPEC = TinyLlamaSpec(
    hidden_size=768,
    intermediate_size=1536,
    num_attention_heads=12,
    num_key_value_heads=4,
    head_dim=64,
    num_hidden_layers=2,
    vocab_size=512,
    max_position_embeddings=512,
    logit_scale=6.0,
)

CHECKPOINTS = {
    # The published relaxml checkpoints: transforms over whole matrices,
    # all-gathered around them at TP > 1.
    "rcp0-k2": (dict(K=2), torch.float16),
    # One KV head, replicated on both ranks.
    "rcp0-k4-mqa": (dict(K=4, num_key_value_heads=1), torch.float16),
    # -TP8 style: block-diagonal transforms, no communication of their own.
    "split-k2": (dict(K=2, split_for_tp=True), torch.float16),
    # Saved by the reference's end-to-end fine-tuning: no rcp/tp_rank, SV in
    # the model dtype.
    "split-k4-no-rcp": (
        dict(
            K=4,
            split_for_tp=True,
            with_rcp=False,
            sv_in_model_dtype=True,
            dtype=torch.bfloat16,
        ),
        torch.bfloat16,
    ),
}

# name: (enforce_eager, vLLM parallel arguments)
PARALLEL_RUNS: dict[str, tuple[bool, dict[str, int]]] = {
    "tp2": (False, dict(tensor_parallel_size=2)),
    "pp2": (True, dict(pipeline_parallel_size=2)),
}


@pytest.fixture
def no_tf32(monkeypatch):
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)


def check_same_as_tp1(base_outputs, outputs, dtype: torch.dtype, name: str) -> None:
    """Greedy tokens equal to TP=1's up to a near-tie, logprobs close."""
    max_diff = 0.0
    for base, other in zip(base_outputs, outputs):
        # Prompt logprobs of the tokens both runs list.
        for pos in range(1, len(base.prompt_token_ids)):
            a, b = base.prompt_logprobs[pos], other.prompt_logprobs[pos]
            for token in a.keys() & b.keys():
                max_diff = max(max_diff, abs(a[token].logprob - b[token].logprob))
        x, y = base.outputs[0], other.outputs[0]
        assert len(x.token_ids) == len(y.token_ids)
        for step, (s, t) in enumerate(zip(x.token_ids, y.token_ids)):
            la, lb = x.logprobs[step], y.logprobs[step]
            if s == t:
                max_diff = max(max_diff, abs(la[s].logprob - lb[s].logprob))
                continue
            assert t in la and s in lb, (
                f"TP=1 {x.token_ids} and {name} {y.token_ids} greedy outputs "
                f"differ at step {step} beyond a near-tie"
            )
            assert abs(la[s].logprob - la[t].logprob) < NEAR_TIE
            # The sequences continue from different tokens.
            break
    print(f"{name}: max |logprob diff| to TP=1 {max_diff:.4f}")
    assert max_diff <= MAX_LOGPROB_DIFF[dtype]


@pytest.mark.skipif(
    torch.accelerator.device_count() < 2,
    reason="tensor and pipeline parallelism need at least two GPUs",
)
@pytest.mark.parametrize("checkpoint", list(CHECKPOINTS))
def test_qtip_parallel_matches_tp1(vllm_runner, tmp_path, no_tf32, checkpoint):
    overrides, dtype = CHECKPOINTS[checkpoint]
    spec = dataclasses.replace(SPEC, **overrides)
    path = random_llama_checkpoint(tmp_path / checkpoint, spec)
    prompts = make_prompts(spec.vocab_size)
    base = run_vllm(vllm_runner, path, prompts, dtype, enforce_eager=True)
    ref_model = reference(path)
    check_prompt_logprobs(base, prompts, ref_model, dtype)
    for name, (eager, kwargs) in PARALLEL_RUNS.items():
        outputs = run_vllm(vllm_runner, path, prompts, dtype, eager, **kwargs)
        check_prompt_logprobs(outputs, prompts, ref_model, dtype)
        check_same_as_tp1(base, outputs, dtype, name)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    assert torch.isfinite(a).all()
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


# The fused decode GEMM, and decode + cuBLAS.
@pytest.mark.parametrize("rows", [5, QTIP_DENSE_MIN_ROWS])
def test_gathered_forward_kernels_on_one_rank(dist_init, rows):
    # q/k with K=2 and v with K=4: the W_hat products of q/k/v run in two
    # calls, gate/up in one.
    spec = dataclasses.replace(SPEC, num_hidden_layers=1, K_v_proj=4)
    params = quip_params(spec.code_params, K_v_proj=4)
    cfg = QTIPConfig.from_config({"quant_method": "qtip", **params})
    with torch.device("cuda"):
        linears = LlamaLinears(spec, cfg, torch.float16)
    linears.load(random_llama_tensors(spec))
    block = linears.model.layers[0]
    gen = torch.Generator(device="cuda").manual_seed(rows)
    for module, gather in (
        (block.self_attn.qkv_proj, "output"),
        (block.self_attn.o_proj, "input"),
        (block.mlp.gate_up_proj, "output"),
        (block.mlp.down_proj, "input"),
    ):
        assert module.qtip_use_kernels and module.qtip_gather is None
        x = torch.randn(rows, module.qtip_in_size, generator=gen, device="cuda")
        x = x.half()
        expected = module(x)[0]
        module.qtip_gather = gather
        out = module(x)[0]
        assert out.shape == expected.shape and out.dtype == torch.float16
        assert rel_err(out, expected) < 2e-3
        compiled = torch.compile(module, fullgraph=True, dynamic=True)
        assert rel_err(compiled(x)[0], out) < 1e-4

    # The W_hat product op: schema, fake (meta) kernel, dynamic shapes.
    qkv = block.self_attn.qkv_proj
    shard = qkv.qtip_shards[0]
    n = qkv.qtip_in_size
    xh = torch.randn(1, rows, n, generator=gen, device="cuda").half()
    trellis = qkv.trellis.narrow(0, shard.word_offset, shard.num_words(n))
    torch.library.opcheck(
        torch.ops.vllm.qtip_hat_product.default,
        (xh, trellis, qkv.tlut[:1], [shard.out_size], shard.params.K),
    )
