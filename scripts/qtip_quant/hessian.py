# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""Input Hessians of a Llama model's projections (qtip_format.md §4.1).

One forward pass of the original model over the calibration sequences
accumulates, per decoder layer, ``H = (1/N) sum x x^T`` (float64) of the
inputs of q_proj (shared by q, k and v), o_proj, up_proj (shared by up and
gate) and down_proj. The same pass can keep each decoder layer's input
hidden states and call arguments, for per-layer fine-tuning.
"""

from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

# Projections that share an input, keyed by the group name; the first one's
# input is hooked.
LLAMA_GROUPS: dict[str, tuple[str, ...]] = {
    "qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "o": ("self_attn.o_proj",),
    "gate_up": ("mlp.up_proj", "mlp.gate_proj"),
    "down": ("mlp.down_proj",),
}


@dataclass
class Calibration:
    """What one calibration pass collected.

    hessians[(layer, group)]: (n, n) float64 mean of x x^T over tokens.
    inputs[layer]: the decoder layer's input hidden states per batch (CPU).
    layer_kwargs: keyword arguments the model passed to its decoder layers
    (rotary embeddings, mask) for one batch, on the model's device.
    """

    hessians: dict[tuple[int, str], torch.Tensor] = field(default_factory=dict)
    tokens: int = 0
    inputs: dict[int, list[torch.Tensor]] = field(default_factory=dict)
    layer_kwargs: dict[str, Any] = field(default_factory=dict)


def _submodule(layer: torch.nn.Module, path: str) -> torch.nn.Module:
    for name in path.split("."):
        layer = getattr(layer, name)
    return layer


@torch.no_grad()
def calibrate(
    model: torch.nn.Module,
    sequences: torch.Tensor,
    *,
    batch_size: int,
    hessian_layers: set[int],
    input_layers: set[int],
    input_sequences: int = 0,
) -> Calibration:
    """Run the model over sequences (N, seqlen) and collect statistics.

    Hessians are accumulated for ``hessian_layers``; the hidden-state inputs
    of ``input_layers`` are kept for the first ``input_sequences`` sequences
    (in batches of batch_size, stored in the model dtype on the CPU).
    """
    device = next(model.parameters()).device
    layers = model.model.layers
    result = Calibration()
    sums: dict[tuple[int, str], torch.Tensor] = {}
    counts: dict[tuple[int, str], int] = {}
    hooks = []

    def hessian_hook(key: tuple[int, str]):
        def hook(module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            if key not in sums:
                sums[key] = torch.zeros(
                    x.shape[1], x.shape[1], dtype=torch.float64, device=x.device
                )
                counts[key] = 0
            sums[key].addmm_(x.T, x)
            counts[key] += x.shape[0]

        return hook

    keep_inputs = [0]  # batches of inputs still to keep

    def input_hook(index: int):
        def hook(
            module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
        ) -> None:
            if keep_inputs[0] <= 0:
                return
            hidden = args[0] if args else kwargs["hidden_states"]
            result.inputs.setdefault(index, []).append(hidden.cpu())
            if not result.layer_kwargs:
                result.layer_kwargs = {
                    k: v for k, v in kwargs.items() if k != "hidden_states"
                }

        return hook

    try:
        for index in sorted(hessian_layers):
            for group, projections in LLAMA_GROUPS.items():
                module = _submodule(layers[index], projections[0])
                hooks.append(
                    module.register_forward_pre_hook(hessian_hook((index, group)))
                )
        for index in sorted(input_layers):
            hooks.append(
                layers[index].register_forward_pre_hook(
                    input_hook(index), with_kwargs=True
                )
            )
        num = sequences.shape[0] - sequences.shape[0] % batch_size
        keep = input_sequences // batch_size
        for start in tqdm(range(0, num, batch_size), desc="calibration"):
            keep_inputs[0] = keep - start // batch_size
            batch = sequences[start : start + batch_size].to(device)
            # The decoder stack only: the logits are not needed.
            model.model(input_ids=batch, use_cache=False)
            result.tokens += batch.numel()
    finally:
        for hook in hooks:
            hook.remove()
    result.hessians = {key: sums[key] / counts[key] for key in sums}
    return result
