# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""QTIP config, linear method and checkpoint loading, on CPU.

Layers are built with vLLM's real parallel linear classes (and a whole
LlamaForCausalLM) under a gloo process group, loaded from random but valid
QTIP checkpoints and compared with the reference forward.

Run `pytest tests/quantization/test_qtip.py`.
"""

import dataclasses
import json
import multiprocessing as mp
import traceback

import pytest
import torch

from tests.quantization.reference_qtip import (
    LLAMA_PROJECTIONS,
    QTIPReferenceLinear,
    TinyLlamaSpec,
    build_reference_model,
    checkpoint_qtip_params,
    dequantize_weight,
    quip_params,
    random_llama_checkpoint,
    random_llama_tensors,
    read_checkpoint,
    reference_logprobs,
    write_checkpoint,
)
from vllm import _qtip_ops as qtip_ops
from vllm.config import (
    DeviceConfig,
    LoadConfig,
    ModelConfig,
    VllmConfig,
    set_current_vllm_config,
)
from vllm.distributed import (
    cleanup_dist_env_and_memory,
    init_distributed_environment,
    initialize_model_parallel,
)
from vllm.model_executor.layers.linear import (
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
    UnquantizedLinearMethod,
)
from vllm.model_executor.layers.quantization import get_quantization_config, qtip
from vllm.model_executor.layers.quantization.qtip import (
    QTIPConfig,
    QTIPFusedCall,
    QTIPLinearMethod,
)
from vllm.model_executor.layers.quantization.utils.qtip_utils import (
    QTIPCodeParams,
    decode_weight,
    get_hadamard_factor,
    hadamard_transform,
    qtip_linear_forward,
)
from vllm.model_executor.model_loader import get_model_loader
from vllm.model_executor.model_loader.weight_utils import initialize_dummy_weights
from vllm.model_executor.models.llama import LlamaForCausalLM, LlamaModel
from vllm.model_executor.models.utils import AutoWeightsLoader

# Every test that sets up vLLM's process groups tears them down itself, so
# vLLM's per-test global cleanup (about a second each) is not needed.
pytestmark = pytest.mark.skip_global_cleanup

# quip_params of a published relaxml checkpoint (Llama-2-7b-QTIP-2Bit).
RELAXML_PARAMS = {
    "codebook": "bitshift",
    "codebook_version": 0,
    "L": 16,
    "K": 2,
    "V": 2,
    "tlut_bits": 9,
    "decode_mode": "quantlut_sym",
    "td_x": 16,
    "td_y": 16,
    "split_for_tp": False,
    "skip_list": None,
}


def qtip_config(**overrides) -> dict:
    """A quantization_config as synthesized from quip_params at load."""
    return {"quant_method": "qtip", **RELAXML_PARAMS, **overrides}


# ---------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------


def test_qtip_method_is_registered():
    assert get_quantization_config("qtip") is QTIPConfig
    assert QTIPConfig.get_name() == "qtip"
    assert QTIPConfig.get_min_capability() == 80
    assert QTIPConfig.get_supported_act_dtypes() == [torch.float16, torch.bfloat16]
    # Hand-written configs, by the names GPTQ/AWQ checkpoints use.
    assert QTIPConfig.get_config_filenames() == [
        "quantize_config.json",
        "quant_config.json",
    ]


@pytest.mark.parametrize(
    "config",
    [
        qtip_config(),
        # Our own quantization_config form: no informational keys.
        {k: v for k, v in qtip_config().items() if not k.startswith("codebook")},
    ],
    ids=["quip_params", "quantization_config"],
)
def test_from_config(config):
    cfg = QTIPConfig.from_config(config)
    assert cfg.params == QTIPCodeParams(K=2)
    assert cfg.params.uses_kernel_layout
    assert cfg.v_params == cfg.params
    assert cfg.split_for_tp is False
    assert cfg.skip_list == []


def test_from_config_optional_keys():
    # Configs written before split_for_tp / skip_list existed lack the keys.
    config = qtip_config()
    del config["split_for_tp"], config["skip_list"]
    cfg = QTIPConfig.from_config(config)
    assert (cfg.split_for_tp, cfg.skip_list, cfg.K_v_proj) == (False, [], None)
    assert cfg.v_params.K == 2

    cfg = QTIPConfig.from_config(
        qtip_config(K=4, split_for_tp=True, skip_list=["0_v", "31_down"], K_v_proj=3)
    )
    assert cfg.params.K == 4 and cfg.v_params.K == 3
    assert cfg.split_for_tp is True
    assert cfg.skip_list == ["0_v", "31_down"]


@pytest.mark.parametrize(
    "overrides",
    [
        {"decode_mode": "3inst", "V": 1},
        {"decode_mode": "1mad", "V": 1, "K": 3},
        {"decode_mode": "quantlut", "V": 2, "K": 2},
        {"decode_mode": "lut", "V": 1, "K": 2, "tlut_bits": 16},
    ],
)
def test_from_config_other_codes(overrides):
    cfg = QTIPConfig.from_config(qtip_config(**overrides))
    assert cfg.params.decode_mode == overrides["decode_mode"]
    assert not cfg.params.uses_kernel_layout


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"decode_mode": "5mad"}, r"decode_mode='5mad'"),
        ({"K": 1}, r"K=1 is not supported with decode_mode='quantlut_sym'"),
        ({"K": 5}, r"K=5 is not supported with decode_mode='quantlut_sym'"),
        ({"L": 12}, r"L=12 is not supported"),
        ({"td_x": 8}, r"td_x=8 is not supported"),
        ({"td_y": 32}, r"td_y=32 is not supported"),
        ({"V": 1}, r"V=1 is not supported with decode_mode='quantlut_sym'"),
        ({"tlut_bits": 16}, r"tlut_bits=16 is not supported"),
        ({"decode_mode": "1mad"}, r"V=2 is not supported with decode_mode='1mad'"),
        ({"decode_mode": "lut", "V": 1}, r"tlut_bits=9 must equal L=16"),
        ({"K_v_proj": 5}, r"K_v_proj=5 is not supported"),
        ({"K": "2"}, r"K='2'"),
        ({"codebook": "E8P12"}, r"codebook='E8P12' is not supported"),
        ({"quant_method": "gptq"}, r"quant_method='gptq'"),
        ({"split_for_tp": "yes"}, r"split_for_tp='yes'"),
        ({"skip_list": ["0_x"]}, r"skip_list entry '0_x'"),
        ({"skip_list": "0_v"}, r"skip_list='0_v'"),
    ],
)
def test_from_config_rejects(overrides, match):
    with pytest.raises(ValueError, match=match):
        QTIPConfig.from_config(qtip_config(**overrides))


def test_from_config_missing_key():
    config = qtip_config()
    del config["K"]
    with pytest.raises(ValueError, match=r"missing the key\(s\) \['K'\]"):
        QTIPConfig.from_config(config)


def test_model_config_detects_relaxml_checkpoint(tmp_path):
    path = random_llama_checkpoint(tmp_path / "ckpt", num_hidden_layers=1)
    assert "quantization_config" not in json.loads((path / "config.json").read_text())
    model_config = ModelConfig(str(path), skip_tokenizer_init=True, dtype="float16")
    assert model_config.quantization == "qtip"
    vllm_config = VllmConfig(
        model_config=model_config, device_config=DeviceConfig(device="cpu")
    )
    assert isinstance(vllm_config.quant_config, QTIPConfig)
    assert vllm_config.quant_config.params.K == 2


# ---------------------------------------------------------------------------
# Layers
# ---------------------------------------------------------------------------


def init_gloo_tp_group(
    store: str, world_size: int = 1, rank: int = 0, pipeline_parallel_size: int = 1
) -> None:
    """vLLM's process groups over gloo (CPU): pipeline_parallel_size stages,
    tensor parallel over the ranks of each."""
    init_distributed_environment(
        world_size=world_size,
        rank=rank,
        local_rank=rank,
        distributed_init_method=f"file://{store}",
        backend="gloo",
    )
    initialize_model_parallel(
        world_size // pipeline_parallel_size, pipeline_parallel_size
    )


@pytest.fixture
def tp1(tmp_path):
    """A gloo process group of one rank, as in a TP=1 CPU run."""
    with set_current_vllm_config(VllmConfig(device_config=DeviceConfig(device="cpu"))):
        init_gloo_tp_group(f"{tmp_path}/dist_store")
        yield
        cleanup_dist_env_and_memory()


class LlamaLinears(torch.nn.Module):
    """The linear layers of a Llama model, named as in LlamaForCausalLM."""

    def __init__(
        self, spec: TinyLlamaSpec, quant_config: QTIPConfig, dtype: torch.dtype
    ) -> None:
        super().__init__()
        self.quant_config = quant_config
        # What LlamaForCausalLM (SupportsQuant) registers with its config.
        quant_config.packed_modules_mapping.update(
            LlamaForCausalLM.packed_modules_mapping
        )
        self.model = torch.nn.Module()
        self.model.layers = torch.nn.ModuleList()
        h, i = spec.hidden_size, spec.intermediate_size
        q = spec.num_attention_heads * spec.head_dim
        for layer in range(spec.num_hidden_layers):
            prefix = f"model.layers.{layer}"
            block = torch.nn.Module()
            block.self_attn = torch.nn.Module()
            block.mlp = torch.nn.Module()
            kwargs = dict(bias=False, quant_config=quant_config, params_dtype=dtype)
            block.self_attn.qkv_proj = QKVParallelLinear(
                h,
                spec.head_dim,
                spec.num_attention_heads,
                spec.num_key_value_heads,
                prefix=f"{prefix}.self_attn.qkv_proj",
                **kwargs,
            )
            block.self_attn.o_proj = RowParallelLinear(
                q, h, prefix=f"{prefix}.self_attn.o_proj", **kwargs
            )
            block.mlp.gate_up_proj = MergedColumnParallelLinear(
                h, [i, i], prefix=f"{prefix}.mlp.gate_up_proj", **kwargs
            )
            block.mlp.down_proj = RowParallelLinear(
                i, h, prefix=f"{prefix}.mlp.down_proj", **kwargs
            )
            self.model.layers.append(block)

    def load(self, tensors: dict[str, torch.Tensor]) -> None:
        linear = {
            name: t
            for name, t in tensors.items()
            if any(f".{module}." in name for module, _, _ in LLAMA_PROJECTIONS)
        }
        AutoWeightsLoader(self).load_weights(
            linear.items(), mapper=LlamaModel.hf_to_vllm_mapper
        )
        for module in self.modules():
            quant_method = getattr(module, "quant_method", None)
            if quant_method is not None:
                quant_method.process_weights_after_loading(module)


def reference_projection(
    x: torch.Tensor,
    tensors: dict[str, torch.Tensor],
    prefix: str,
    params: QTIPCodeParams,
) -> torch.Tensor:
    if f"{prefix}.weight" in tensors:
        return torch.nn.functional.linear(x, tensors[f"{prefix}.weight"].to(x.dtype))
    return qtip_linear_forward(
        x,
        tensors[f"{prefix}.trellis"],
        tensors[f"{prefix}.SU"],
        tensors[f"{prefix}.SV"],
        tensors.get(f"{prefix}.tlut"),
        params,
        rcp=int(tensors.get(f"{prefix}.rcp", 0)),
        tp_rank=int(tensors.get(f"{prefix}.tp_rank", 8)),
    )


def check_layers_match_reference(
    linears: LlamaLinears, spec: TinyLlamaSpec, tensors: dict[str, torch.Tensor]
) -> None:
    dtype = linears.model.layers[0].self_attn.o_proj.params_dtype
    gen = torch.Generator().manual_seed(1)
    cfg = linears.quant_config
    for layer, block in enumerate(linears.model.layers):
        base = f"model.layers.{layer}"

        def ref(module: str, x: torch.Tensor, base=base) -> torch.Tensor:
            params = cfg.v_params if module.endswith("v_proj") else cfg.params
            return reference_projection(x, tensors, f"{base}.{module}", params)

        x = torch.randn(5, spec.hidden_size, generator=gen).to(dtype)
        xq = torch.randn(5, spec.num_attention_heads * spec.head_dim, generator=gen)
        xi = torch.randn(3, 2, spec.intermediate_size, generator=gen).to(dtype)
        cases = [
            (
                block.self_attn.qkv_proj,
                x,
                ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
            ),
            (block.self_attn.o_proj, xq.to(dtype), ["self_attn.o_proj"]),
            (block.mlp.gate_up_proj, x, ["mlp.gate_proj", "mlp.up_proj"]),
            (block.mlp.down_proj, xi, ["mlp.down_proj"]),
        ]
        for module, inp, projections in cases:
            out, _ = module(inp)
            expected = torch.cat([ref(p, inp) for p in projections], dim=-1)
            assert out.dtype == dtype
            # The same reference math runs on the same tensors.
            torch.testing.assert_close(out, expected, rtol=0, atol=0)
            assert expected.float().std() > 0.1


@pytest.mark.parametrize(
    "spec, layer_dtype",
    [
        (TinyLlamaSpec(K=2), torch.float16),
        (TinyLlamaSpec(K=3, flat_trellis="all"), torch.bfloat16),
        (
            TinyLlamaSpec(K=4, flat_trellis=["q", "up", "down"], with_rcp=False),
            torch.float16,
        ),
        (TinyLlamaSpec(K=2, skip_list=["0_v", "1_down", "1_gate"]), torch.bfloat16),
        (TinyLlamaSpec(K=2, K_v_proj=4, skip_list=["1_v"]), torch.float16),
        (TinyLlamaSpec(K=3, split_for_tp=True), torch.bfloat16),
        # Checkpoint floats in another dtype than the model's.
        (TinyLlamaSpec(K=2, dtype=torch.bfloat16), torch.float16),
        (TinyLlamaSpec(K=2, dtype=torch.float16), torch.bfloat16),
    ],
    ids=[
        "k2",
        "k3-flat",
        "k4-mixed-no-rcp",
        "skip",
        "k-v-proj",
        "split",
        "bf16-ckpt",
        "fp16-ckpt-bf16-model",
    ],
)
def test_layers_match_reference(tp1, spec, layer_dtype):
    tensors = random_llama_tensors(spec)
    params = quip_params(
        spec.code_params,
        split_for_tp=spec.split_for_tp,
        skip_list=spec.skip_list,
        K_v_proj=spec.K_v_proj,
    )
    cfg = QTIPConfig.from_config({"quant_method": "qtip", **params})
    linears = LlamaLinears(spec, cfg, layer_dtype)
    for layer, block in enumerate(linears.model.layers):
        for module, keys in (
            (block.self_attn.qkv_proj, "qkv"),
            (block.self_attn.o_proj, ["o"]),
            (block.mlp.gate_up_proj, ["gate", "up"]),
            (block.mlp.down_proj, ["down"]),
        ):
            skipped = [f"{layer}_{k}" in spec.skip_list for k in keys]
            method = module.quant_method
            if all(skipped):
                assert isinstance(method, UnquantizedLinearMethod)
            else:
                assert isinstance(method, QTIPLinearMethod)
                assert [p is None for _, p in method.shard_specs] == skipped
    linears.load(tensors)
    check_layers_match_reference(linears, spec, tensors)


def test_layer_parameters_and_hadamard_buffers(tp1):
    spec = TinyLlamaSpec(K=3, K_v_proj=4, skip_list=["0_k"], split_for_tp=True)
    tensors = random_llama_tensors(spec)
    cfg = QTIPConfig.from_config(
        checkpoint_qtip_params(
            {"quip_params": quip_params(spec.code_params, **_spec_options(spec))}
        )
    )
    linears = LlamaLinears(spec, cfg, torch.float16)
    linears.load(tensors)
    qkv = linears.model.layers[0].self_attn.qkv_proj
    h, hd = spec.hidden_size, spec.head_dim
    q_rows, kv_rows = spec.num_attention_heads * hd, spec.num_key_value_heads * hd
    # q (K=3) and v (K_v_proj=4) quantized, k dense.
    assert qkv.trellis.dtype == torch.int16
    assert qkv.trellis.numel() == (q_rows * 3 + kv_rows * 4) * h // 16
    assert qkv.SU.shape == (2, h) and qkv.SU.dtype == torch.float32
    assert qkv.SV.shape == (q_rows + kv_rows,) and qkv.SV.dtype == torch.float32
    assert qkv.tlut.shape == (2, 512, 2) and qkv.tlut.dtype == torch.float16
    assert qkv.weight.shape == (kv_rows, h) and qkv.weight.dtype == torch.float16
    assert qkv.rcp.tolist() == [2, 2] and qkv.qtip_tp_rank.tolist() == [8, 8]
    # Column split: full input transform, output blocks of m/8.
    assert [(t.rcp, t.blocks) for t in qkv.qtip_transforms] == [(2, 8), (2, 8)]
    _, had_192 = get_hadamard_factor(h)
    torch.testing.assert_close(qkv.qtip_had_in_0, had_192)
    assert qkv.qtip_had_in_1 is qkv.qtip_had_in_0
    # 192/8 = 24 = 12 * 2; 64/8 = 8 is a power of two.
    assert qkv.qtip_had_out_0 is qkv.qtip_had_in_0
    assert qkv.qtip_had_out_1 is None
    # Row split: input blocks of n/8.
    down = linears.model.layers[1].mlp.down_proj
    assert [(t.rcp, t.blocks) for t in down.qtip_transforms] == [(1, 8)]
    # All layers share one tensor per Hadamard factor.
    assert linears.model.layers[1].self_attn.qkv_proj.qtip_had_in_0 is qkv.qtip_had_in_0
    # Kernel calls: q/k/v mixes K=3, K=4 and a dense shard, so it runs shard by
    # shard; gate/up (both K=3) is one call with per-shard output blocks.
    assert qkv.qtip_fused_call is None
    gate_up = linears.model.layers[0].mlp.gate_up_proj
    i = spec.intermediate_size
    assert gate_up.qtip_fused_call == QTIPFusedCall(
        K=3, in_block=h, out_blocks=[i // 8, i // 8], shard_rows=[i, i]
    )


def test_fused_kernel_call_of_a_plain_checkpoint(tp1):
    spec = TinyLlamaSpec(K=2)
    cfg = QTIPConfig.from_config(
        {"quant_method": "qtip", **quip_params(spec.code_params)}
    )
    linears = LlamaLinears(spec, cfg, torch.float16)
    linears.load(random_llama_tensors(spec))
    h, i = spec.hidden_size, spec.intermediate_size
    block = linears.model.layers[0]
    assert block.mlp.gate_up_proj.qtip_fused_call == QTIPFusedCall(
        K=2, in_block=h, out_blocks=[i, i], shard_rows=[i, i]
    )
    assert block.mlp.down_proj.qtip_fused_call == QTIPFusedCall(
        K=2, in_block=i, out_blocks=[h], shard_rows=[h]
    )
    # q's 192 outputs transform with H_12, k/v's 64 with none: the output
    # transform takes one H_K per call, so q/k/v runs shard by shard.
    assert block.self_attn.qkv_proj.qtip_fused_call is None


def test_layers_compile_without_graph_breaks(tp1):
    # vLLM compiles the model with dynamic batch sizes; the QTIP forward must
    # trace as one graph (no host syncs, no Python-side state).
    spec = TinyLlamaSpec(num_hidden_layers=1, skip_list=["0_v"], split_for_tp=True)
    tensors = random_llama_tensors(spec)
    cfg = QTIPConfig.from_config(
        {"quant_method": "qtip", **quip_params(spec.code_params, **_spec_options(spec))}
    )
    linears = LlamaLinears(spec, cfg, torch.float16)
    linears.load(tensors)
    block = linears.model.layers[0]
    for module, width in (
        (block.self_attn.qkv_proj, spec.hidden_size),
        (block.mlp.down_proj, spec.intermediate_size),
    ):
        compiled = torch.compile(
            module, fullgraph=True, dynamic=True, backend="aot_eager"
        )
        for tokens in (3, 5):
            x = torch.randn(tokens, width, dtype=torch.float16)
            torch.testing.assert_close(compiled(x)[0], module(x)[0], rtol=0, atol=0)


def _layer_with_v_k4_and_dense_gate() -> torch.nn.Module:
    """One decoder layer whose v_proj has K=4 and whose gate_proj is dense."""
    spec = TinyLlamaSpec(num_hidden_layers=1, K_v_proj=4, skip_list=["0_gate"])
    cfg = QTIPConfig.from_config(
        {"quant_method": "qtip", **quip_params(spec.code_params, **_spec_options(spec))}
    )
    linears = LlamaLinears(spec, cfg, torch.float16)
    linears.load(random_llama_tensors(spec))
    return linears.model.layers[0]


def test_gathered_forward_on_one_rank(tp1):
    # The rcp = 0 path of TP > 1 (qtip_parallel) with one rank, where the
    # all-gathers are identities: the same outputs as the layers' usual path.
    block = _layer_with_v_k4_and_dense_gate()
    gen = torch.Generator().manual_seed(0)
    for module, gather in (
        (block.self_attn.qkv_proj, "output"),
        (block.self_attn.o_proj, "input"),
        (block.mlp.gate_up_proj, "output"),
        (block.mlp.down_proj, "input"),
    ):
        assert module.qtip_gather is None
        x = torch.randn(2, 3, module.qtip_in_size, generator=gen).half()
        expected = module(x)[0]
        module.qtip_gather = gather
        torch.testing.assert_close(module(x)[0], expected, rtol=0, atol=0)


def test_gathered_kernel_path_shares_calls(tp1, monkeypatch):
    # The kernel path of the rcp = 0 forward runs each step once for all
    # shards that can share a kernel call. The kernel ops are replaced by
    # the reference math (the CUDA kernels do not run here), so the test
    # checks the call grouping and the values it produces.
    block = _layer_with_v_k4_and_dense_gate()
    params_by_bits = {
        sh.params.K: sh.params
        for module in (block.self_attn.qkv_proj, block.mlp.gate_up_proj)
        for sh in module.qtip_shards
        if sh.params is not None
    }
    calls: list[str] = []

    def hadamard(
        x,
        had_k=None,
        *,
        transpose=False,
        block_size=None,
        segment_sizes=None,
        in_scale=None,
        out_scale=None,
        factor=1.0,
        out_dtype=None,
    ):
        calls.append("transform")
        assert out_scale is None
        segments = segment_sizes or [x.shape[-1]]
        if isinstance(block_size, list):
            blocks = block_size
        else:
            blocks = [block_size or segments[0]] * len(segments)

        def one(v: torch.Tensor) -> torch.Tensor:
            parts = v.float().split(segments, dim=-1)
            out = [
                hadamard_transform(p, transpose=transpose, block_size=b, had_k=had_k)
                for p, b in zip(parts, blocks)
            ]
            return torch.cat(out, dim=-1) * factor

        # The gathered path passes SU as (shards, n), or no input scale.
        if in_scale is None:
            y = one(x)
        else:
            y = torch.stack([one(x.float() * su) for su in in_scale])
        return y.to(out_dtype or x.dtype)

    def hat_product(xh, trellis, tlut, shard_rows, K):
        calls.append(f"product K={K} x{len(shard_rows)}")
        # What the fused GEMM reads as it is: one fp16 row-major x~ per shard.
        assert xh.dtype == torch.float16 and xh.is_contiguous()
        assert xh.dim() == 3 and xh.shape[0] == len(shard_rows)
        params = params_by_bits[K]
        n = xh.shape[-1]
        words = [rows * n * K // 16 for rows in shard_rows]
        products = [
            x_s.float() @ decode_weight(t, lut, rows, n, params).T
            for x_s, t, lut, rows in zip(xh, trellis.split(words), tlut, shard_rows)
        ]
        return torch.cat(products, dim=-1)

    def matmul(
        x,
        trellis,
        tlut,
        SU,
        SV,
        had_in,
        had_out,
        K,
        *,
        in_block=None,
        out_blocks=None,
        shard_rows=None,
        gemm_cols=None,
    ):
        # One whole layer (the row-parallel path): the reference steps, with
        # the GEMM over the gemm_cols window of the transformed input.
        calls.append(f"linear K={K}")
        n, m = SU.shape[-1], SV.shape[0]
        offset, cols = gemm_cols or (0, n)
        params = params_by_bits[K]
        su = SU.reshape(n)
        xh = hadamard_transform(
            x.float() * su, transpose=True, block_size=in_block or n, had_k=had_in
        )
        xh = (xh / 32).half()[:, offset : offset + cols]
        w_hat = decode_weight(trellis, tlut.reshape(512, 2), m, cols, params)
        acc = xh.float() @ w_hat.T
        y = hadamard_transform(acc, block_size=out_blocks[0], had_k=had_out)
        return (y * SV * 32).to(x.dtype)

    monkeypatch.setattr(qtip_ops, "qtip_hadamard", hadamard)
    monkeypatch.setattr(qtip_ops, "qtip_matmul", matmul)
    monkeypatch.setattr(torch.ops.vllm, "qtip_hat_product", hat_product, raising=False)
    gen = torch.Generator().manual_seed(0)
    for module, gather, expected_calls in (
        # q/k (K=2) share a product, v (K=4) has its own; q's output (192:
        # H_12) and k/v's (64: none) need two output transforms.
        (
            block.self_attn.qkv_proj,
            "output",
            ["transform", "product K=2 x2", "product K=4 x1", "transform", "transform"],
        ),
        # The row-parallel layer is one qtip_matmul over its column window.
        (block.self_attn.o_proj, "input", ["linear K=2"]),
        # gate is skip-listed (dense): up alone.
        (
            block.mlp.gate_up_proj,
            "output",
            ["transform", "product K=2 x1", "transform"],
        ),
    ):
        x = torch.randn(3, module.qtip_in_size, generator=gen).half()
        expected = module(x)[0]
        module.qtip_gather = gather
        module.qtip_use_kernels = True
        calls.clear()
        out = module(x)[0]
        assert calls == expected_calls
        torch.testing.assert_close(out, expected, rtol=2e-3, atol=2e-3)


def _spec_options(spec: TinyLlamaSpec) -> dict:
    return dict(
        split_for_tp=spec.split_for_tp,
        skip_list=spec.skip_list,
        K_v_proj=spec.K_v_proj,
    )


def _load_error(spec: TinyLlamaSpec, tensors: dict[str, torch.Tensor], cfg=None):
    cfg = cfg or QTIPConfig.from_config(
        {"quant_method": "qtip", **quip_params(spec.code_params, **_spec_options(spec))}
    )
    linears = LlamaLinears(spec, cfg, torch.float16)
    with pytest.raises(ValueError) as excinfo:
        linears.load(tensors)
    return str(excinfo.value)


ONE_LAYER = TinyLlamaSpec(num_hidden_layers=1)


def test_missing_su_is_reported(tp1):
    tensors = random_llama_tensors(ONE_LAYER)
    del tensors["model.layers.0.self_attn.k_proj.SU"]
    msg = _load_error(ONE_LAYER, tensors)
    assert "model.layers.0.self_attn.qkv_proj" in msg
    assert "model.layers.0.self_attn.k_proj.SU was not found" in msg


@pytest.mark.parametrize("flat", [False, True])
def test_truncated_trellis_is_reported(tp1, flat):
    tensors = random_llama_tensors(ONE_LAYER)
    name = "model.layers.0.mlp.down_proj.trellis"
    trellis = tensors[name]
    tensors[name] = trellis.reshape(-1)[:-16] if flat else trellis[:-1]
    msg = _load_error(ONE_LAYER, tensors)
    m, n = ONE_LAYER.projection_shape("mlp.down_proj")
    assert name in msg
    assert f"expected m*n*K/16 = {m * n * 2 // 16} elements" in msg


def test_unexpected_dense_and_quantized_tensors(tp1):
    skip_v = dataclasses.replace(ONE_LAYER, skip_list=["0_v"])
    tensors = random_llama_tensors(skip_v)
    tensors["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(192, 192)
    msg = _load_error(skip_v, tensors)
    assert "model.layers.0.self_attn.q_proj.weight" in msg
    assert "not in skip_list" in msg

    tensors = random_llama_tensors(ONE_LAYER)
    tensors["model.layers.0.self_attn.o_proj.weight"] = torch.zeros(192, 192)
    assert "model.layers.0.self_attn.o_proj.weight" in _load_error(ONE_LAYER, tensors)

    skip_up = dataclasses.replace(ONE_LAYER, skip_list=["0_up"])
    tensors = random_llama_tensors(skip_up)
    tensors["model.layers.0.mlp.up_proj.SU"] = torch.ones(192)
    msg = _load_error(skip_up, tensors)
    assert "model.layers.0.mlp.up_proj.SU" in msg and "skip-listed" in msg


def test_rcp_must_agree_with_split_for_tp(tp1):
    tensors = random_llama_tensors(ONE_LAYER)
    tensors["model.layers.0.self_attn.o_proj.rcp"] = torch.tensor(1)
    msg = _load_error(ONE_LAYER, tensors)
    assert "model.layers.0.self_attn.o_proj.rcp is 1" in msg
    assert "split_for_tp=False" in msg

    # A present rcp is checked even where a missing one would be inferred.
    split = dataclasses.replace(ONE_LAYER, split_for_tp=True)
    tensors = random_llama_tensors(split)
    tensors["model.layers.0.mlp.up_proj.rcp"] = torch.tensor(0)
    msg = _load_error(split, tensors)
    assert "model.layers.0.mlp.up_proj.rcp is 0" in msg
    assert "split_for_tp=True means rcp=2" in msg


def test_dimension_without_hadamard_factor(tp1):
    cfg = QTIPConfig.from_config(qtip_config())
    # 2272 = 71 * 32: whole trellis blocks, but no QTIP Hadamard transform.
    with pytest.raises(ValueError) as excinfo:
        RowParallelLinear(
            2272,
            64,
            bias=False,
            quant_config=cfg,
            prefix="model.layers.3.mlp.down_proj",
        )
    msg = str(excinfo.value)
    assert "model.layers.3.mlp.down_proj" in msg
    assert "unsupported input dimension" in msg and "2272" in msg


def test_dimension_not_in_whole_blocks(tp1):
    cfg = QTIPConfig.from_config(qtip_config())
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.down_proj.*48"):
        RowParallelLinear(
            48, 64, bias=False, quant_config=cfg, prefix="model.layers.0.mlp.down_proj"
        )


@pytest.fixture
def dummy_load_format(tp1):
    """The current vLLM config says load_format="dummy", as the worker does."""
    config = VllmConfig(
        device_config=DeviceConfig(device="cpu"),
        load_config=LoadConfig(load_format="dummy"),
    )
    with set_current_vllm_config(config):
        yield


def process_weights(linears: torch.nn.Module) -> None:
    for module in linears.modules():
        if isinstance(getattr(module, "quant_method", None), QTIPLinearMethod):
            module.quant_method.process_weights_after_loading(module)


def test_dummy_weights_run(dummy_load_format):
    # load_format="dummy" loads no tensor; the layers must still work.
    cfg = QTIPConfig.from_config(qtip_config(split_for_tp=True))
    linears = LlamaLinears(ONE_LAYER, cfg, torch.float16)
    initialize_dummy_weights(linears, model_config=None)
    process_weights(linears)
    qkv = linears.model.layers[0].self_attn.qkv_proj
    assert qkv.rcp.tolist() == [2, 2, 2]
    # A numerically sane model: random trellis states, N(0, 1) codewords,
    # +-1 input signs, and outputs with about the inputs' spread
    # (W entries ~ 1/sqrt(n)).
    assert qkv.trellis.unique().numel() > qkv.trellis.numel() // 2
    assert 0.9 < qkv.tlut.float().std() < 1.1
    assert set(qkv.SU.unique().tolist()) == {-1.0, 1.0}
    x = torch.randn(64, 192, dtype=torch.float16)
    out, _ = qkv(x)
    assert out.shape == (64, 192 + 64 + 64)
    assert torch.isfinite(out).all()
    assert 0.7 < out.float().std() / x.float().std() < 1.4
    # Seeded by layer name: the same on every rank and run, distinct per layer.
    again = LlamaLinears(ONE_LAYER, cfg, torch.float16)
    again_qkv = again.model.layers[0].self_attn.qkv_proj
    again_qkv.quant_method.process_weights_after_loading(again_qkv)
    assert torch.equal(again_qkv.trellis, qkv.trellis)
    down = linears.model.layers[0].mlp.down_proj
    assert not torch.equal(down.SU[0, :64], qkv.SU[0, :64])


def test_layer_that_received_no_tensor_is_reported(tp1):
    # Without load_format="dummy", a layer no tensor reached is an error.
    linears = LlamaLinears(ONE_LAYER, QTIPConfig.from_config(qtip_config()), torch.half)
    with pytest.raises(ValueError, match=r"self_attn\.q_proj\.trellis was not found"):
        process_weights(linears)


def test_reference_path_is_logged_with_its_reason(tp1, monkeypatch):
    # On this machine the layers cannot run the CUDA kernels (CPU weights, or
    # no GPU at all): each layer says so at debug level, and the reason is
    # warned once (warning_once).
    warned, debug = [], []
    monkeypatch.setattr(
        qtip.logger, "warning_once", lambda msg, *args: warned.append(msg % args)
    )
    monkeypatch.setattr(qtip.logger, "debug", lambda msg, *a: debug.append(msg % a))
    spec = TinyLlamaSpec(num_hidden_layers=1)
    linears = LlamaLinears(spec, QTIPConfig.from_config(qtip_config()), torch.half)
    linears.load(random_llama_tensors(spec))
    reason = qtip_ops.qtip_kernels_unavailable(torch.device("cpu"))
    assert reason is not None
    assert all(reason in msg and "reference decoder" in msg for msg in warned)
    assert len(warned) == 4  # one per layer here; vLLM's logger dedups them
    layers = ("mlp.down_proj", "mlp.gate_up_proj", "self_attn.o_proj", "qkv_proj")
    assert sorted(msg.split(":")[0] for msg in debug) == [
        f"QTIP layer model.layers.0.{'self_attn.' * (m == 'qkv_proj')}{m}"
        for m in layers
    ]
    assert all(f"reference decoder ({reason})" in msg for msg in debug)
    qkv = linears.model.layers[0].self_attn.qkv_proj
    assert qkv.qtip_use_kernels is False


def test_kernel_path_reasons():
    hyb, other = QTIPCodeParams(K=2), QTIPCodeParams(K=2, V=1, decode_mode="1mad")
    transform = qtip.QTIPTransform(
        rcp=0, blocks=1, in_block=192, out_block=192, in_factor=12, out_factor=12
    )

    def shard(params: QTIPCodeParams) -> qtip.QTIPShard:
        return qtip.QTIPShard("q_proj", params, 192, 192, 0, 0, 0, 0, 32, 32)

    cuda = torch.device("cuda", 0)
    reason = qtip._reference_path_reason([shard(hyb)], [transform], cuda)
    if qtip_ops.qtip_kernels_available(cuda):
        assert reason is None
        reason = qtip._reference_path_reason([shard(other)], [transform], cuda)
        assert reason is not None and "decode_mode='1mad'" in reason
    else:
        assert reason == qtip_ops.qtip_kernels_unavailable(cuda)


def force_reference_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """The tests' switch: QTIP layers built from now on (until monkeypatch
    undoes it) run the reference decoder, whether the kernels could run or not.
    """
    monkeypatch.setattr(
        qtip, "_reference_path_reason", lambda *args: "forced by the test"
    )


@pytest.mark.skipif(
    not qtip_ops.qtip_kernels_available(), reason="needs the QTIP CUDA kernels"
)
@pytest.mark.parametrize("tokens", [1, 5, 70])
def test_kernel_path_matches_reference_path(tmp_path, monkeypatch, tokens):
    # The same checkpoint through vLLM's layers on the GPU, once with the
    # CUDA kernels and once with the reference decoder (the test switch).
    spec = TinyLlamaSpec(num_hidden_layers=1, K=3, skip_list=["0_v"])
    tensors = random_llama_tensors(spec)
    cfg = QTIPConfig.from_config(
        {"quant_method": "qtip", **quip_params(spec.code_params, **_spec_options(spec))}
    )

    def build() -> LlamaLinears:
        with torch.device("cuda"):
            linears = LlamaLinears(spec, cfg, torch.float16)
        linears.load({name: t.cuda() for name, t in tensors.items()})
        return linears

    config = VllmConfig(device_config=DeviceConfig(device="cuda"))
    with set_current_vllm_config(config):
        init_gloo_tp_group(f"{tmp_path}/dist_store")
        try:
            kernels = build()
            with monkeypatch.context() as patch:
                force_reference_path(patch)
                reference = build()
            gen = torch.Generator(device="cuda").manual_seed(tokens)
            for name in ("self_attn.qkv_proj", "mlp.gate_up_proj", "mlp.down_proj"):
                ours = kernels.model.layers[0].get_submodule(name)
                ref = reference.model.layers[0].get_submodule(name)
                assert ours.qtip_use_kernels and not ref.qtip_use_kernels
                x = torch.randn(
                    tokens, ours.input_size, generator=gen, device="cuda"
                ).half()
                y, y_ref = ours(x)[0].double(), ref(x)[0].double()
                assert ((y - y_ref).norm() / y_ref.norm()).item() < 2e-3, name
        finally:
            cleanup_dist_env_and_memory()


# ---------------------------------------------------------------------------
# Whole model through vLLM's model classes
# ---------------------------------------------------------------------------


def _cpu_attention_backend(*args, **kwargs) -> str:
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    return AttentionBackendEnum.CPU_ATTN.get_path()


@pytest.fixture
def cpu_attention(monkeypatch):
    """Let Attention layers be built on a machine without an accelerator."""
    from vllm.platforms import current_platform
    from vllm.v1.attention import selector

    monkeypatch.setattr(
        current_platform, "get_attn_backend_cls", _cpu_attention_backend
    )
    selector._cached_get_attn_backend.cache_clear()
    yield
    selector._cached_get_attn_backend.cache_clear()


def build_vllm_llama(
    path, dtype=torch.float16, quantization: str | None = None
) -> LlamaForCausalLM:
    """The model of a checkpoint through vLLM's own loader, in the current
    process groups: it builds the model, streams the safetensors files
    through load_weights and runs process_weights_after_loading."""
    model_config = ModelConfig(
        str(path), quantization=quantization, skip_tokenizer_init=True, dtype=dtype
    )
    assert model_config.quantization == "qtip"
    vllm_config = VllmConfig(
        model_config=model_config,
        device_config=DeviceConfig(device="cpu"),
        load_config=LoadConfig(),
    )
    with set_current_vllm_config(vllm_config):
        model = get_model_loader(vllm_config.load_config).load_model(
            vllm_config=vllm_config, model_config=model_config
        )
    assert isinstance(model, LlamaForCausalLM)
    return model


def load_vllm_llama(
    path, tmp_path, dtype=torch.float16, quantization: str | None = None
) -> LlamaForCausalLM:
    """build_vllm_llama in a new one-rank gloo process group."""
    with set_current_vllm_config(VllmConfig(device_config=DeviceConfig(device="cpu"))):
        init_gloo_tp_group(f"{tmp_path}/dist_store")
    return build_vllm_llama(path, dtype, quantization)


@pytest.mark.parametrize(
    "spec, max_shard_bytes",
    [
        (TinyLlamaSpec(K=2, skip_list=["0_v", "1_down"], flat_trellis=["q"]), None),
        (TinyLlamaSpec(K=4, with_rcp=False, layout="quantization_config"), 200_000),
    ],
    ids=["relaxml-skip", "ours-sharded-no-rcp"],
)
def test_llama_checkpoint_loads_through_model_classes(
    cpu_attention, tmp_path, spec, max_shard_bytes
):
    path = tmp_path / "ckpt"
    tensors = random_llama_tensors(spec)
    for entry in spec.skip_list:
        # Scalars left for an unquantized (skip-listed) layer are ignored.
        layer, key = entry.split("_")
        if key == "down":
            prefix = f"model.layers.{layer}.mlp.down_proj"
            tensors[f"{prefix}.rcp"] = torch.tensor(0)
            tensors[f"{prefix}.tp_rank"] = torch.tensor(8)
    write_checkpoint(
        path,
        spec.hf_config(),
        tensors,
        quip_params(spec.code_params, **_spec_options(spec)),
        layout=spec.layout,
        max_shard_bytes=max_shard_bytes,
    )
    assert len(list(path.glob("*.safetensors"))) == (
        1 if max_shard_bytes is None else 3
    )
    model = load_vllm_llama(path, tmp_path)
    try:
        assert_matches_reference(model, path, spec)
    finally:
        cleanup_dist_env_and_memory()


def assert_matches_reference(
    model: LlamaForCausalLM, path, spec: TinyLlamaSpec
) -> None:
    """vLLM's layers of a loaded checkpoint match the reference model's."""
    ref = build_reference_model(path, dtype=torch.float16)
    assert torch.equal(model.model.embed_tokens.weight, ref.model.embed_tokens.weight)
    assert torch.equal(model.lm_head.weight, ref.lm_head.weight)
    assert torch.equal(model.model.norm.weight, ref.model.norm.weight)
    gen = torch.Generator().manual_seed(0)
    for layer, (ours, theirs) in enumerate(zip(model.model.layers, ref.model.layers)):
        assert torch.equal(ours.input_layernorm.weight, theirs.input_layernorm.weight)
        x = torch.randn(4, spec.hidden_size, generator=gen).half()
        attn = theirs.self_attn
        qkv, _ = ours.self_attn.qkv_proj(x)
        expected = torch.cat([attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)], -1)
        torch.testing.assert_close(qkv, expected, rtol=0, atol=0)
        o, _ = ours.self_attn.o_proj(qkv[:, : spec.hidden_size])
        torch.testing.assert_close(
            o, attn.o_proj(qkv[:, : spec.hidden_size]), rtol=0, atol=0
        )
        # The whole MLP: fused gate_up, SiluAndMul, down.
        torch.testing.assert_close(ours.mlp(x), theirs.mlp(x), rtol=2e-3, atol=2e-3)
        qkv_layer = ours.self_attn.qkv_proj
        quantized = [p is not None for _, p in qkv_layer.quant_method.shard_specs]
        assert quantized == [True, True, f"{layer}_v" not in spec.skip_list]


def _qtip_layer_outputs(model: torch.nn.Module) -> dict[str, tuple]:
    """Per QTIP layer: rcp, tp_rank, transforms, SV and the output of a fixed
    random input."""
    outputs: dict[str, tuple] = {}
    for name, module in model.named_modules():
        if not isinstance(getattr(module, "quant_method", None), QTIPLinearMethod):
            continue
        gen = torch.Generator().manual_seed(len(outputs))
        x = torch.randn(4, module.qtip_in_size, generator=gen).to(module.params_dtype)
        outputs[name] = (
            module.rcp.tolist(),
            module.qtip_tp_rank.tolist(),
            module.qtip_transforms,
            module.SV.clone(),
            module(x)[0],
        )
    return outputs


def test_split_for_tp_checkpoint_without_rcp(cpu_attention, tmp_path, monkeypatch):
    # The reference's end-to-end fine-tuning saves split_for_tp checkpoints
    # without .rcp (nor .tp_rank) and with SV in the model dtype. The rcp is
    # then the one split_for_tp means for the layer: the same model as the
    # same weights saved with .rcp and fp32 SV.
    spec = TinyLlamaSpec(
        K=2, split_for_tp=True, dtype=torch.bfloat16, sv_in_model_dtype=True
    )
    tensors = random_llama_tensors(spec)
    assert tensors["model.layers.0.mlp.down_proj.SV"].dtype == torch.bfloat16
    checkpoints = {
        "rcp": {k: t.float() if k.endswith(".SV") else t for k, t in tensors.items()},
        "no-rcp": {
            k: t for k, t in tensors.items() if not k.endswith((".rcp", ".tp_rank"))
        },
    }
    assert len(checkpoints["rcp"]) - len(checkpoints["no-rcp"]) == 2 * 7 * 2
    params = quip_params(spec.code_params, **_spec_options(spec))
    logged: list[str] = []
    monkeypatch.setattr(
        qtip.logger,
        "info_once",
        lambda msg, *args, **kwargs: logged.append(msg % args),
    )
    results = {}
    logits = {}
    for name, ckpt in checkpoints.items():
        path = write_checkpoint(tmp_path / name, spec.hf_config(), ckpt, params)
        (tmp_path / f"dist-{name}").mkdir()
        model = load_vllm_llama(path, tmp_path / f"dist-{name}", dtype=torch.bfloat16)
        try:
            results[name] = _qtip_layer_outputs(model)
        finally:
            cleanup_dist_env_and_memory()
        logits[name] = reference_logprobs(build_reference_model(path), [1, 7, 42, 99])
        if name == "rcp":
            assert not logged
    assert len(logged) == 8 and len(set(logged)) == 1
    assert "rcp=2 for column-parallel and rcp=1 for row-parallel" in logged[0]
    with_rcp, without = results["rcp"], results["no-rcp"]
    assert with_rcp.keys() == without.keys() and len(with_rcp) == 8
    # Column-parallel 2, row-parallel 1.
    inferred = {"qkv_proj": [2] * 3, "gate_up_proj": [2] * 2, "o_proj": [1]}
    inferred["down_proj"] = [1]
    for name, (rcp, tp_rank, transforms, sv, out) in without.items():
        assert rcp == inferred[name.rsplit(".", 1)[-1]]
        assert tp_rank == with_rcp[name][1]
        assert transforms == with_rcp[name][2]
        torch.testing.assert_close(sv, with_rcp[name][3], rtol=0, atol=0)
        torch.testing.assert_close(out, with_rcp[name][4], rtol=0, atol=0)
    torch.testing.assert_close(logits["no-rcp"], logits["rcp"], rtol=0, atol=0)


# ---------------------------------------------------------------------------
# Checkpoint writer and reference model
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "layout", ["relaxml", "quantization_config", "quantize_config"]
)
def test_checkpoint_writer_layout(tmp_path, layout):
    spec = TinyLlamaSpec(
        num_hidden_layers=1,
        K=3,
        K_v_proj=2,
        skip_list=["0_o"],
        flat_trellis=["k"],
        layout=layout,
    )
    path = random_llama_checkpoint(tmp_path / "c", spec)
    config, tensors = read_checkpoint(path)
    expected_params = {
        **RELAXML_PARAMS,
        "K": 3,
        "skip_list": ["0_o"],
        "K_v_proj": 2,
    }
    if layout == "relaxml":
        assert config["quip_params"] == expected_params
        assert "quantization_config" not in config
    elif layout == "quantization_config":
        assert config["quantization_config"] == {
            "quant_method": "qtip",
            **expected_params,
        }
        assert "quip_params" not in config
    else:
        assert "quip_params" not in config and "quantization_config" not in config
        quant_config = json.loads((path / "quantize_config.json").read_text())
        assert quant_config == {"quant_method": "qtip", **expected_params}
    # The reference model reads all three the same way.
    expected_config = {"quant_method": "qtip", **expected_params}
    assert checkpoint_qtip_params(config, path) == expected_config
    assert config["architectures"] == ["LlamaForCausalLM"]
    base = "model.layers.0.self_attn"
    assert tensors[f"{base}.q_proj.trellis"].shape == (192 * 192 // 256, 48)
    assert tensors[f"{base}.k_proj.trellis"].shape == (64 * 192 * 3 // 16,)
    assert tensors[f"{base}.v_proj.trellis"].shape == (64 * 192 // 256, 32)
    assert tensors[f"{base}.q_proj.trellis"].dtype == torch.int16
    assert tensors[f"{base}.q_proj.SU"].dtype == torch.float16
    assert tensors[f"{base}.q_proj.SV"].dtype == torch.float32
    assert tensors[f"{base}.q_proj.tlut"].shape == (512, 2)
    assert tensors[f"{base}.q_proj.tlut"].dtype == torch.float16
    assert tensors[f"{base}.q_proj.rcp"].item() == 0
    assert tensors[f"{base}.q_proj.tp_rank"].item() == 8
    assert f"{base}.o_proj.trellis" not in tensors
    assert tensors[f"{base}.o_proj.weight"].shape == (192, 192)
    tlut = tensors[f"{base}.q_proj.tlut"].float()
    assert abs(tlut.std().item() - 0.968) < 0.01


def test_checkpoint_without_rcp(tmp_path):
    _, tensors = read_checkpoint(
        random_llama_checkpoint(tmp_path / "c", num_hidden_layers=1, with_rcp=False)
    )
    assert not any(name.endswith((".rcp", ".tp_rank")) for name in tensors)
    assert sum(name.endswith(".trellis") for name in tensors) == 7


def test_reference_model_matches_dense_dequantization(tmp_path):
    path = random_llama_checkpoint(tmp_path / "c", skip_list=["1_gate"], K=3)
    ref = build_reference_model(path)
    _, tensors = read_checkpoint(path)
    params = QTIPCodeParams(K=3)
    replaced = 0
    dense = build_reference_model(path)
    for layer, block in enumerate(dense.model.layers):
        for module, _, _ in LLAMA_PROJECTIONS:
            parent_name, _, attr = module.partition(".")
            parent = getattr(block, parent_name)
            child = getattr(parent, attr)
            if not isinstance(child, QTIPReferenceLinear):
                continue
            prefix = f"model.layers.{layer}.{module}"
            # The reference module is wired to its own tensors.
            x = torch.randn(3, child.in_features)
            expected = reference_projection(x, tensors, prefix, params)
            torch.testing.assert_close(child(x), expected, rtol=0, atol=0)
            w = dequantize_weight(
                tensors[f"{prefix}.trellis"],
                tensors[f"{prefix}.SU"],
                tensors[f"{prefix}.SV"],
                tensors[f"{prefix}.tlut"],
                params,
            )
            linear = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
            linear.weight.data = w
            setattr(parent, attr, linear)
            replaced += 1
    assert replaced == 13
    token_ids = [1, 17, 42, 99, 7, 250, 3, 64]
    lp_ref = reference_logprobs(ref, token_ids)
    lp_dense = reference_logprobs(dense, token_ids)
    # Only the reference's fp16 rounding of the transformed input differs.
    torch.testing.assert_close(lp_ref, lp_dense, rtol=0, atol=0.05)
    assert (lp_ref.argmax(-1) == lp_dense.argmax(-1)).float().mean() >= 0.85
    # A random but sane model: peaked yet not degenerate distributions.
    top = lp_ref.exp().max(-1).values
    assert torch.isfinite(lp_ref).all()
    assert 0.02 < top.mean().item() < 0.9


# ---------------------------------------------------------------------------
# Tensor parallel (gloo processes)
# ---------------------------------------------------------------------------


def _tp_worker(
    rank: int, world_size: int, pp: int, store: str, checks, args, errors
) -> None:
    try:
        with set_current_vllm_config(
            VllmConfig(device_config=DeviceConfig(device="cpu"))
        ):
            init_gloo_tp_group(store, world_size, rank, pipeline_parallel_size=pp)
            checks(rank, world_size, *args)
            cleanup_dist_env_and_memory()
    except BaseException:
        errors.put(f"rank {rank}:\n{traceback.format_exc()}")


def run_tp(
    tmp_path, world_size: int, checks, *args, pipeline_parallel_size: int = 1
) -> None:
    """Run checks(rank, world_size, *args) in world_size gloo processes
    (pipeline_parallel_size stages of tensor parallel ranks)."""
    ctx = mp.get_context("spawn")
    errors = ctx.Queue()
    store = str(tmp_path / f"store-{world_size}-{pipeline_parallel_size}")
    procs = [
        ctx.Process(
            target=_tp_worker,
            args=(
                rank,
                world_size,
                pipeline_parallel_size,
                store,
                checks,
                args,
                errors,
            ),
        )
        for rank in range(world_size)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    failures = [errors.get() for _ in range(errors.qsize())]
    assert not failures, "\n".join(failures)
    assert all(p.exitcode == 0 for p in procs)


def _tp2_checks(rank: int, world_size: int, ckpt: str) -> None:
    config, tensors = read_checkpoint(ckpt)
    spec = TinyLlamaSpec(num_hidden_layers=1, split_for_tp=True, K=3)
    cfg = QTIPConfig.from_config(checkpoint_qtip_params(config))
    linears = LlamaLinears(spec, cfg, torch.float16)
    linears.load(tensors)
    block = linears.model.layers[0]
    assert block.self_attn.qkv_proj.qtip_gather is None
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, spec.hidden_size, generator=gen).half()

    def ref(module: str, inp: torch.Tensor) -> torch.Tensor:
        return reference_projection(
            inp, tensors, f"model.layers.0.{module}", cfg.params
        )

    # Column-parallel: this rank's slice of each of q, k and v.
    qkv, _ = block.self_attn.qkv_proj(x)
    q, k, v = (ref(f"self_attn.{p}_proj", x) for p in "qkv")
    expected = torch.cat([t.chunk(2, dim=-1)[rank] for t in (q, k, v)], dim=-1)
    torch.testing.assert_close(qkv, expected, rtol=0, atol=1e-3)
    # Row-parallel: each rank transforms its input half; the all-reduce of
    # the partial outputs is the full projection.
    xo = torch.randn(4, 192, generator=gen).half()
    out, _ = block.self_attn.o_proj(xo.chunk(2, dim=-1)[rank])
    torch.testing.assert_close(out, ref("self_attn.o_proj", xo), rtol=2e-3, atol=2e-3)
    xi = torch.randn(4, spec.intermediate_size, generator=gen).half()
    out, _ = block.mlp.down_proj(xi.chunk(2, dim=-1)[rank])
    torch.testing.assert_close(out, ref("mlp.down_proj", xi), rtol=2e-3, atol=2e-3)


def test_split_for_tp_checkpoint_at_tp2(tmp_path):
    ckpt = random_llama_checkpoint(
        tmp_path / "c", num_hidden_layers=1, split_for_tp=True, K=3
    )
    run_tp(tmp_path, 2, _tp2_checks, str(ckpt))


# Whole-matrix (rcp = 0) checkpoint that splits over 2 and 4 ranks: hidden
# 384 and intermediate 768 transform with H_12, GQA with 2 KV heads (one per
# rank at TP=2, each replicated on two ranks at TP=4), q/k with K=2 and v with
# K=4 in layer 0, a dense v in the fused qkv_proj and a dense gate in
# gate_up_proj in layer 1.
TP_SPEC = TinyLlamaSpec(
    hidden_size=384,
    intermediate_size=768,
    num_attention_heads=12,
    num_key_value_heads=2,
    head_dim=32,
    K=2,
    K_v_proj=4,
    skip_list=["1_v", "1_gate"],
)


def _whole_matrix_checks(rank: int, world_size: int, ckpt: str) -> None:
    """Every layer against the reference forward (what the layer computes at
    TP=1, see test_layers_match_reference), sliced to this rank."""
    from vllm.distributed import get_tp_group

    spec = TP_SPEC
    config, tensors = read_checkpoint(ckpt)
    cfg = QTIPConfig.from_config(checkpoint_qtip_params(config))
    linears = LlamaLinears(spec, cfg, torch.float16)
    linears.load(tensors)
    replicas = max(1, world_size // spec.num_key_value_heads)
    h, i = spec.hidden_size, spec.intermediate_size
    q_rows = spec.num_attention_heads * spec.head_dim
    gen = torch.Generator().manual_seed(0)

    def mine(t: torch.Tensor, ranks: int, index: int) -> torch.Tensor:
        return t.chunk(ranks, dim=-1)[index]

    for layer, block in enumerate(linears.model.layers):

        def ref(module: str, inp: torch.Tensor, layer=layer) -> torch.Tensor:
            params = cfg.v_params if module.endswith("v_proj") else cfg.params
            return reference_projection(
                inp, tensors, f"model.layers.{layer}.{module}", params
            )

        attn, mlp = block.self_attn, block.mlp
        assert attn.qkv_proj.qtip_gather == mlp.gate_up_proj.qtip_gather == "output"
        assert attn.o_proj.qtip_gather == mlp.down_proj.qtip_gather == "input"
        x = torch.randn(5, h, generator=gen).half()
        # Column-parallel: this rank's rows of q and of its KV head; the
        # products are gathered in fp32, so they match the TP=1 outputs up to
        # the fp32 sums' order, which the BLAS picks by the shard's shape (one
        # fp16 ulp here and there on some CPUs).
        out, _ = attn.qkv_proj(x)
        q, k, v = (ref(f"self_attn.{p}_proj", x) for p in "qkv")
        kv_ranks = world_size // replicas
        expected = torch.cat(
            [
                mine(q, world_size, rank),
                mine(k, kv_ranks, rank // replicas),
                mine(v, kv_ranks, rank // replicas),
            ],
            dim=-1,
        )
        torch.testing.assert_close(out, expected, rtol=2e-3, atol=2e-3)
        out, _ = mlp.gate_up_proj(x)
        gate, up = ref("mlp.gate_proj", x), ref("mlp.up_proj", x)
        expected = torch.cat(
            [mine(gate, world_size, rank), mine(up, world_size, rank)], dim=-1
        )
        torch.testing.assert_close(out, expected, rtol=2e-3, atol=2e-3)
        # Row-parallel: all-gather of the input shards, then the all-reduce of
        # the partial outputs (rounded to fp16 before the sum).
        xo = torch.randn(5, q_rows, generator=gen).half()
        out, _ = attn.o_proj(mine(xo, world_size, rank))
        expected = ref("self_attn.o_proj", xo)
        torch.testing.assert_close(out, expected, rtol=2e-3, atol=2e-3)
        xi = torch.randn(3, 2, i, generator=gen).half()
        out, _ = mlp.down_proj(mine(xi, world_size, rank))
        torch.testing.assert_close(out, ref("mlp.down_proj", xi), rtol=2e-3, atol=2e-3)
        assert out.float().std() > 0.1

    # Each rank holds whole 32 x 32 blocks of its slice only; SU of the
    # row-parallel layers and the transforms span the whole matrix.
    qkv = linears.model.layers[0].self_attn.qkv_proj
    kv_rows = spec.head_dim * spec.num_key_value_heads // kv_ranks
    assert qkv.trellis.numel() == (q_rows // world_size * 2 + kv_rows * 6) * h // 16
    assert [(t.rcp, t.in_block, t.out_block) for t in qkv.qtip_transforms] == [
        (0, h, q_rows),
        (0, h, 64),
        (0, h, 64),
    ]
    down = linears.model.layers[0].mlp.down_proj
    assert down.trellis.numel() == h * i // world_size * 2 // 16
    assert down.SU.shape == (1, i) and down.SV.shape == (h,)
    assert [(t.in_block, t.out_block) for t in down.qtip_transforms] == [(i, h)]
    assert down.qtip_fused_call is None
    su = tensors["model.layers.0.mlp.down_proj.SU"].float()
    torch.testing.assert_close(down.SU[0], su, rtol=0, atol=0)

    # A rank's slice must be whole trellis blocks: 48 inputs per rank are not.
    with pytest.raises(ValueError) as excinfo:
        RowParallelLinear(
            48 * world_size,
            64,
            bias=False,
            quant_config=cfg,
            prefix="model.layers.3.mlp.down_proj",
        )
    msg = str(excinfo.value)
    assert "model.layers.3.mlp.down_proj" in msg
    assert f"tensor_parallel_size={world_size}" in msg and "32 x 32" in msg

    if world_size == 2:
        # As on CUDA, the collectives are custom ops: the forward compiles to
        # one graph with a dynamic number of tokens (once: compiling on the
        # 2-core CI machine is slow).
        tp_group = get_tp_group()
        tp_group.use_custom_op_call = True
        # vLLM's CPU communicator reduces in place and returns its input, which
        # torch's custom-op alias check rejects (an error when CI is set); the
        # CUDA reduce is out of place, so reduce a copy here as it does.
        comm = tp_group.device_communicator
        reduce_in_place = comm.all_reduce
        comm.all_reduce = lambda x: reduce_in_place(x.clone())
        for module, width in ((qkv, h), (down, i // world_size)):
            compiled = torch.compile(
                module, fullgraph=True, dynamic=True, backend="aot_eager"
            )
            for tokens in (3, 5):
                xs = torch.randn(tokens, width, generator=gen).half()
                y = compiled(xs)[0]
                torch.testing.assert_close(y, module(xs)[0], rtol=0, atol=0)


@pytest.mark.parametrize("world_size", [2, 4])
def test_whole_matrix_checkpoint_at_tp(tmp_path, world_size):
    ckpt = random_llama_checkpoint(tmp_path / "c", TP_SPEC)
    run_tp(tmp_path, world_size, _whole_matrix_checks, str(ckpt))


def _pp2_checks(rank: int, world_size: int, ckpt: str) -> None:
    """Each pipeline stage builds, loads and runs only its own layers."""
    from vllm.model_executor.models.utils import PPMissingLayer
    from vllm.platforms import current_platform

    current_platform.get_attn_backend_cls = _cpu_attention_backend
    model = build_vllm_llama(ckpt)
    _, tensors = read_checkpoint(ckpt)
    cfg = QTIPConfig.from_config(qtip_config())
    gen = torch.Generator().manual_seed(rank)
    layers = model.model.layers
    assert isinstance(layers[1 - rank], PPMissingLayer)
    assert isinstance(
        model.lm_head if rank == 0 else model.model.embed_tokens, PPMissingLayer
    )
    attn = layers[rank].self_attn
    x = torch.randn(3, 192, generator=gen).half()
    qkv, _ = attn.qkv_proj(x)
    base = f"model.layers.{rank}.self_attn"
    expected = torch.cat(
        [
            reference_projection(x, tensors, f"{base}.{p}_proj", cfg.params)
            for p in "qkv"
        ],
        dim=-1,
    )
    torch.testing.assert_close(qkv, expected, rtol=0, atol=0)
    xi = torch.randn(3, 384, generator=gen).half()
    out, _ = layers[rank].mlp.down_proj(xi)
    prefix = f"model.layers.{rank}.mlp.down_proj"
    expected = reference_projection(xi, tensors, prefix, cfg.params)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_pipeline_parallel_stages(tmp_path):
    ckpt = random_llama_checkpoint(tmp_path / "c", num_hidden_layers=2)
    run_tp(tmp_path, 2, _pp2_checks, str(ckpt), pipeline_parallel_size=2)
