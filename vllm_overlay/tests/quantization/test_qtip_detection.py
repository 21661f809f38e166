# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""QTIP is a registered method and its checkpoints are recognised with no flag.

Run `pytest tests/quantization/test_qtip_detection.py`.
"""

import json

import pytest
import torch

from tests.quantization.reference_qtip import quip_params
from vllm.config import ModelConfig
from vllm.model_executor.layers.quantization import (
    QUANTIZATION_METHODS,
    get_quantization_config,
)
from vllm.model_executor.layers.quantization.qtip import QTIPConfig
from vllm.model_executor.layers.quantization.utils.qtip_utils import QTIPCodeParams
from vllm.transformers_utils.config import get_config

# No distributed state or GPU memory to clean up between these tests
# (vLLM's conftest otherwise runs cleanup_dist_env_and_memory after each).
pytestmark = pytest.mark.skip_global_cleanup

# The quip_params of a published relaxml checkpoint (Llama-2-7b-QTIP-2Bit).
QUIP_PARAMS = quip_params(QTIPCodeParams(K=2))


def write_llama_config(path, **extra) -> str:
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "num_hidden_layers": 1,
        "vocab_size": 256,
        "max_position_embeddings": 128,
        "torch_dtype": "float16",
        **extra,
    }
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    return str(path)


def test_qtip_is_registered():
    assert "qtip" in QUANTIZATION_METHODS
    assert get_quantization_config("qtip") is QTIPConfig


def test_quip_params_become_quantization_config(tmp_path):
    model = write_llama_config(tmp_path / "relaxml", quip_params=QUIP_PARAMS)
    hf_config = get_config(model, trust_remote_code=False)
    assert hf_config.quantization_config == {"quant_method": "qtip", **QUIP_PARAMS}


def test_existing_quantization_config_wins(tmp_path):
    quant_cfg = {"quant_method": "qtip", **QUIP_PARAMS, "K": 3}
    model = write_llama_config(
        tmp_path / "ours", quantization_config=quant_cfg, quip_params=QUIP_PARAMS
    )
    assert get_config(model, trust_remote_code=False).quantization_config["K"] == 3


def test_plain_checkpoint_is_not_qtip(tmp_path):
    model = write_llama_config(tmp_path / "plain")
    assert (
        getattr(get_config(model, trust_remote_code=False), "quantization_config", None)
        is None
    )


@pytest.mark.parametrize("form", ["quip_params", "quantization_config"])
@pytest.mark.parametrize("flag", [None, "qtip"])
def test_model_config_selects_qtip(tmp_path, form, flag):
    extra = (
        {"quip_params": QUIP_PARAMS}
        if form == "quip_params"
        else {"quantization_config": {"quant_method": "qtip", **QUIP_PARAMS}}
    )
    model = write_llama_config(tmp_path / form, **extra)
    model_config = ModelConfig(
        model, quantization=flag, skip_tokenizer_init=True, dtype=torch.float16
    )
    assert model_config.quantization == "qtip"


def test_model_config_rejects_other_flag(tmp_path):
    model = write_llama_config(tmp_path / "relaxml", quip_params=QUIP_PARAMS)
    with pytest.raises(ValueError, match=r"\(qtip\) does not match"):
        ModelConfig(model, quantization="gptq", skip_tokenizer_init=True)
