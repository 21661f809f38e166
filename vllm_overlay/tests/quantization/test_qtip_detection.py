# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""QTIP is a registered method and its checkpoints are recognised with no flag.

QTIP is declared by config.json's quantization_config, by its quip_params
(the published checkpoints) or by a hand-written quantize_config.json; each
is found with and without `-q qtip`, and several are merged or refused.

Run `pytest tests/quantization/test_qtip_detection.py`.
"""

import json
from pathlib import Path

import pytest
import regex as re
import torch

from tests.quantization.reference_qtip import quip_params
from vllm.config import DeviceConfig, ModelConfig, VllmConfig
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


def test_plain_checkpoint_is_not_qtip(tmp_path):
    model = write_llama_config(tmp_path / "plain")
    assert (
        getattr(get_config(model, trust_remote_code=False), "quantization_config", None)
        is None
    )


def write_quant_file(model: str, config: dict, name="quantize_config.json") -> None:
    (Path(model) / name).write_text(json.dumps(config))


def write_declared(path, form: str, **params) -> str:
    """A Llama folder declaring QTIP (QUIP_PARAMS updated by params) by form."""
    qtip = {**QUIP_PARAMS, **params}
    if form == "quip_params":
        return write_llama_config(path, quip_params=qtip)
    if form == "quantization_config":
        return write_llama_config(
            path, quantization_config={"quant_method": "qtip", **qtip}
        )
    model = write_llama_config(path)
    write_quant_file(model, {"quant_method": "qtip", **qtip}, name=form)
    return model


def quant_config_of(model: str, flag: str | None = None) -> QTIPConfig:
    """The QTIPConfig vLLM builds for a model folder (as `vllm serve` does)."""
    model_config = ModelConfig(
        model, quantization=flag, skip_tokenizer_init=True, dtype=torch.float16
    )
    assert model_config.quantization == "qtip"
    vllm_config = VllmConfig(
        model_config=model_config, device_config=DeviceConfig(device="cpu")
    )
    assert isinstance(vllm_config.quant_config, QTIPConfig)
    return vllm_config.quant_config


FORMS = ["quip_params", "quantization_config", "quantize_config.json"]


@pytest.mark.parametrize("form", [*FORMS, "quant_config.json"])
@pytest.mark.parametrize("flag", [None, "qtip"])
def test_model_config_selects_qtip(tmp_path, form, flag):
    model = write_declared(tmp_path / "model", form, K=3, skip_list=["0_v"])
    cfg = quant_config_of(model, flag)
    assert cfg.params == QTIPCodeParams(K=3)
    assert cfg.skip_list == ["0_v"]
    assert get_config(model, trust_remote_code=False).quantization_config == {
        "quant_method": "qtip",
        **QUIP_PARAMS,
        "K": 3,
        "skip_list": ["0_v"],
    }


def test_hand_written_config_without_quant_method(tmp_path):
    # As for GPTQ, `-q qtip` reads quantize_config.json whatever it says;
    # without the flag only a file saying quant_method "qtip" declares QTIP.
    model = write_llama_config(tmp_path / "model")
    write_quant_file(model, {**QUIP_PARAMS, "K": 4})
    config = ModelConfig(model, skip_tokenizer_init=True, dtype=torch.float16)
    assert config.quantization is None
    assert quant_config_of(model, "qtip").params == QTIPCodeParams(K=4)


def test_other_methods_quantize_config_is_not_qtip(tmp_path):
    gptq = {"bits": 4, "group_size": 128, "quant_method": "gptq"}
    model = write_llama_config(tmp_path / "plain")
    write_quant_file(model, gptq)
    assert (
        getattr(get_config(model, trust_remote_code=False), "quantization_config", None)
        is None
    )
    # Beside quip_params, another method's file is not a QTIP form.
    model = write_llama_config(tmp_path / "relaxml", quip_params=QUIP_PARAMS)
    write_quant_file(model, gptq)
    assert quant_config_of(model).params == QTIPCodeParams(K=2)


def test_forms_are_merged_in_order(tmp_path):
    # Keys stated twice agree; each form adds the keys only it states.
    own = {"quant_method": "qtip", "K": 2, "L": 16, "V": 2, "tlut_bits": 9}
    model = write_llama_config(
        tmp_path / "model",
        quantization_config=own,
        quip_params={**QUIP_PARAMS, "skip_list": ["0_k"]},
    )
    write_quant_file(
        model, {"quant_method": "QTIP", "K": 2, "quantlut_path": "t.safetensors"}
    )
    merged = get_config(model, trust_remote_code=False).quantization_config
    assert merged == {
        **own,
        **QUIP_PARAMS,
        "skip_list": ["0_k"],
        "quantlut_path": "t.safetensors",
    }
    assert list(merged)[:5] == list(own)
    # skip_list null (as relaxml writes it) and [] agree.
    model = write_declared(tmp_path / "empty", "quip_params", skip_list=None)
    write_quant_file(model, {"quant_method": "qtip", "skip_list": []})
    assert quant_config_of(model).skip_list == []


QTIP = {"quant_method": "qtip", **QUIP_PARAMS}
# Folders declaring QTIP twice with different values: (config.json keys,
# hand-written files, the error).
CONFLICTS = {
    "config-quip": (
        {"quantization_config": {**QTIP, "K": 3}, "quip_params": QUIP_PARAMS},
        {},
        "config.json quantization_config has K=3 but config.json quip_params has K=2",
    ),
    "quip-file": (
        {"quip_params": QUIP_PARAMS},
        {"quantize_config.json": {**QTIP, "decode_mode": "1mad"}},
        (
            "config.json quip_params has decode_mode='quantlut_sym' but "
            "quantize_config.json has decode_mode='1mad'"
        ),
    ),
    "config-file": (
        {"quantization_config": QTIP},
        {"quant_config.json": {**QTIP, "skip_list": ["0_q"]}},
        (
            "config.json quantization_config has skip_list=None but "
            "quant_config.json has skip_list=['0_q']"
        ),
    ),
    "two-files": (
        {},
        {"quantize_config.json": QTIP, "quant_config.json": {**QTIP, "K": 4}},
        "quantize_config.json has K=2 but quant_config.json has K=4",
    ),
    "gptq-quip": (
        {
            "quantization_config": {"quant_method": "gptq", "bits": 4},
            "quip_params": QUIP_PARAMS,
        },
        {},
        (
            "config.json quantization_config has quant_method='gptq' but "
            "config.json quip_params has quant_method='qtip'"
        ),
    ),
}


@pytest.mark.parametrize("case", list(CONFLICTS))
@pytest.mark.parametrize("flag", [None, "qtip"])
def test_conflicting_forms_are_refused(tmp_path, case, flag):
    extra, files, message = CONFLICTS[case]
    model = write_llama_config(tmp_path / "model", **extra)
    for name, config in files.items():
        write_quant_file(model, config, name=name)
    with pytest.raises(ValueError, match=re.escape(message)):
        ModelConfig(
            model, quantization=flag, skip_tokenizer_init=True, dtype=torch.float16
        )


def test_model_config_rejects_other_flag(tmp_path):
    model = write_llama_config(tmp_path / "relaxml", quip_params=QUIP_PARAMS)
    with pytest.raises(ValueError, match=r"\(qtip\) does not match"):
        ModelConfig(model, quantization="gptq", skip_tokenizer_init=True)
