# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""Input Hessians of a Llama model's projections (qtip_format.md §4.1), one
decoder layer at a time.

``CalibrationStream`` keeps the hidden states of the calibration sequences
entering the current decoder layer (on the host, in the model dtype) and
advances them through one original layer at a time, batch by batch and in
place. While it does, it accumulates, for that layer, ``H = (1/N) sum x x^T``
(float64, on the layer's device) of the inputs of q_proj (shared by q, k and
v), o_proj, up_proj (shared by up and gate) and down_proj, and can keep the
layer's input batches for per-layer fine-tuning. The layer computes exactly
what the whole HF model computes for it (the same modules and arguments),
so the Hessians equal those of a whole-model forward pass.

Hessians are stored per layer as the packed upper triangle in float32
(``pack_symmetric``): n(n+1)/2 values, a quarter of a dense float64 matrix.
"""

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .model_io import SourceModel, rotary_embedding

# Projections that share an input, keyed by the group name; the first one's
# input is hooked.
LLAMA_GROUPS: dict[str, tuple[str, ...]] = {
    "qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "o": ("self_attn.o_proj",),
    "gate_up": ("mlp.up_proj", "mlp.gate_proj"),
    "down": ("mlp.down_proj",),
}
# Version of the Hessian files; files of another version are made again.
HESSIAN_FORMAT = 2


def pack_symmetric(H: torch.Tensor) -> torch.Tensor:
    """A symmetric (n, n) matrix, n even, as (n + 1, n/2) float32.

    With H = [[A, B^T], [B, C]] (blocks of n/2): rows 0..n/2-1 hold the
    lower triangle of A and the strict upper triangle of C, the next n/2
    rows B, the last row diag(C).
    """
    n = H.shape[0]
    if H.shape != (n, n) or n % 2:
        raise ValueError(f"pack_symmetric needs an even square matrix, got {H.shape}")
    h = n // 2
    A, B, C = H[:h, :h], H[h:, :h], H[h:, h:]
    return torch.cat(
        [(A.tril() + C.triu(1)).float(), B.float(), C.diagonal()[None].float()]
    )


def unpack_symmetric(
    packed: torch.Tensor, dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """Inverse of pack_symmetric, in dtype on packed's device."""
    h = packed.shape[1]
    M, B = packed[:h].to(dtype), packed[h : 2 * h].to(dtype)
    H = torch.empty(2 * h, 2 * h, dtype=dtype, device=packed.device)
    lower = M.tril(-1)
    H[:h, :h] = lower + lower.T
    H[:h, :h].diagonal().copy_(M.diagonal())
    upper = M.triu(1)
    H[h:, h:] = upper + upper.T
    H[h:, h:].diagonal().copy_(packed[2 * h].to(dtype))
    H[h:, :h] = B
    H[:h, h:] = B.T
    return H


def group_inputs(config: Any) -> dict[str, int]:
    """Input size n of each group's Hessian."""
    head_dim = getattr(config, "head_dim", None) or (
        config.hidden_size // config.num_attention_heads
    )
    h = config.hidden_size
    return {
        "qkv": h,
        "o": config.num_attention_heads * head_dim,
        "gate_up": h,
        "down": config.intermediate_size,
    }


def hessian_file_bytes(config: Any) -> int:
    """Disk size of one layer's Hessian file."""
    return sum(4 * n * (n + 1) // 2 for n in group_inputs(config).values()) + 4096


def save_hessians(
    file: Path, hessians: dict[str, torch.Tensor], tokens: int, calibration_id: str
) -> None:
    data = {
        "format": HESSIAN_FORMAT,
        "id": calibration_id,
        "tokens": tokens,
        "hessians": {g: pack_symmetric(h).cpu() for g, h in hessians.items()},
    }
    tmp = file.with_suffix(".tmp")
    torch.save(data, tmp)
    tmp.replace(file)


def hessians_ok(file: Path, calibration_id: str) -> bool:
    """Whether file holds this calibration's Hessians in the current format."""
    if not file.exists():
        return False
    data = torch.load(file, mmap=True, weights_only=True)
    return data.get("format") == HESSIAN_FORMAT and data["id"] == calibration_id


def load_hessians(file: Path, device: torch.device) -> dict[str, torch.Tensor]:
    """The layer's Hessians, float64 (n, n) on device."""
    data = torch.load(file, mmap=True, weights_only=True)
    return {
        group: unpack_symmetric(packed.to(device))
        for group, packed in data["hessians"].items()
    }


@dataclass
class LayerPass:
    """What advancing the stream through one layer collected.

    hessians: group -> float64 (n, n) mean of x x^T, on the layer's device
    (None if not asked for); inputs: the layer's input hidden states of the
    kept sequences, as batches (host, model dtype).
    """

    hessians: dict[str, torch.Tensor] | None
    tokens: int
    inputs: list[torch.Tensor] = field(default_factory=list)
    seconds: float = 0.0


class CalibrationStream:
    """The calibration sequences' hidden states entering decoder layer ``index``."""

    def __init__(
        self,
        source: SourceModel,
        config: Any,
        sequences: torch.Tensor,
        *,
        batch_size: int,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        num = sequences.shape[0] - sequences.shape[0] % batch_size
        if num == 0:
            raise ValueError(
                f"{sequences.shape[0]} calibration sequences make no batch of "
                f"--batch-size {batch_size}"
            )
        self.batch_size = batch_size
        self.device = device
        embed = source.tensor("model.embed_tokens.weight").to(dtype)
        # The embedding output in the model dtype, as the model computes it.
        self.hidden = F.embedding(sequences[:num], embed)
        del embed
        self.index = 0
        seqlen = sequences.shape[1]
        position_ids = torch.arange(seqlen, device=device)[None]
        rotary = rotary_embedding(config, device)
        probe = torch.empty(0, dtype=dtype, device=device)
        # What LlamaModel passes its decoder layers (SDPA, no padding: the
        # causal mask is None and attention is causal).
        self.layer_kwargs: dict[str, Any] = {
            "attention_mask": None,
            "position_ids": position_ids,
            "position_embeddings": rotary(probe, position_ids),
        }

    @property
    def tokens(self) -> int:
        return self.hidden.shape[0] * self.hidden.shape[1]

    @torch.no_grad()
    def advance(
        self,
        layer: torch.nn.Module,
        *,
        hessians: bool,
        keep_sequences: int = 0,
        desc: str = "calibration",
    ) -> LayerPass:
        """Replace the hidden states by layer's outputs (layer ``self.index``).

        hessians: accumulate the layer's input Hessians; keep_sequences: keep
        the inputs of the first keep_sequences // batch_size batches for
        fine-tuning.
        """
        t0 = time.time()
        sums: dict[str, torch.Tensor] = {}
        count = [0]
        hooks = []

        def hook_for(group: str):
            def hook(module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
                x = args[0].reshape(-1, args[0].shape[-1]).double()
                if group not in sums:
                    sums[group] = torch.zeros(
                        x.shape[1], x.shape[1], dtype=torch.float64, device=x.device
                    )
                sums[group].addmm_(x.T, x)
                if group == "qkv":
                    count[0] += x.shape[0]

            return hook

        if hessians:
            for group, projections in LLAMA_GROUPS.items():
                module = layer.get_submodule(projections[0])
                hooks.append(module.register_forward_pre_hook(hook_for(group)))
        keep = keep_sequences // self.batch_size * self.batch_size
        kept = []
        try:
            starts = range(0, self.hidden.shape[0], self.batch_size)
            for start in tqdm(starts, desc=desc, leave=False):
                batch = self.hidden[start : start + self.batch_size]
                if start < keep:
                    kept.append(batch.clone())
                out = layer(batch.to(self.device), **self.layer_kwargs)
                out = out[0] if isinstance(out, tuple) else out
                batch.copy_(out)
        finally:
            for hook in hooks:
                hook.remove()
        self.index += 1
        result = None
        if hessians:
            result = {group: sums[group] / count[0] for group in LLAMA_GROUPS}
        return LayerPass(result, count[0], kept, time.time() - t0)
