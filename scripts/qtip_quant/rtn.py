# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""Round-to-nearest baseline: per-group asymmetric RTN of the same projections.

Each group of ``group_size`` consecutive input weights of a row gets an fp16
scale and zero point (bits + 32/group_size bits per weight); group_size 0
means one group per row (per output channel: bits + 32/in_features, the
same size as QTIP's K bits plus its small per-linear overhead). The result is
written dequantized ("fake quantized") as a plain fp16 checkpoint, so any
engine evaluates it; only the projections QTIP quantizes are rounded.
"""

import shutil
from pathlib import Path

import torch

from .hessian import LLAMA_GROUPS
from .quantize import TOKENIZER_FILES, check_model


def rtn_quantize(weight: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """Round each group of a row to 2**bits levels between its min and max."""
    m, n = weight.shape
    group_size = group_size or n
    if n % group_size:
        raise ValueError(
            f"in_features={n} is not a multiple of group size {group_size}"
        )
    w = weight.float().reshape(m, n // group_size, group_size)
    low = w.amin(-1, keepdim=True)
    high = w.amax(-1, keepdim=True)
    levels = (1 << bits) - 1
    # Scale and zero are stored in fp16, as a real RTN format would.
    scale = ((high - low) / levels).clamp(min=1e-8).half().float()
    zero = torch.round(-low / scale).clamp(0, levels)
    q = torch.clamp(torch.round(w / scale) + zero, 0, levels)
    return ((q - zero) * scale).reshape(m, n).to(weight.dtype)


def rtn_model(
    model_dir: str | Path, out_dir: str | Path, bits: int, group_size: int = 0
) -> Path:
    """Write the RTN-rounded model as an fp16 checkpoint (with tokenizer)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    check_model(AutoConfig.from_pretrained(model_dir))
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float16)
    with torch.no_grad():
        for layer in model.model.layers:
            for paths in LLAMA_GROUPS.values():
                for path in paths:
                    linear = layer.get_submodule(path)
                    linear.weight.copy_(rtn_quantize(linear.weight, bits, group_size))
    model.save_pretrained(out_dir)
    for name in TOKENIZER_FILES:
        if (model_dir / name).exists():
            shutil.copy2(model_dir / name, out_dir / name)
    return out_dir
