# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""What a quantization run needs: GPU memory per layer, disk, and the checks
that refuse a run before any work when the machine lacks them.

The GPU estimate follows the streaming driver stage by stage (calibration of
a layer, BlockLDLQ of a chunk of layers, per-layer fine-tuning; the dense
Hadamards stay for the whole run) and is deliberately simple: the bench
(bench_scale.py) prints it next to the measured peak.
"""

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .codec import qtip_checkpoint
from .hessian import LLAMA_GROUPS, group_inputs

GiB = 1 << 30


def _gib(x: float) -> str:
    return f"{x / GiB:.1f} GiB"


@dataclass
class LayerMemory:
    """Estimated peak GPU bytes of one decoder layer's stages."""

    hadamards: int  # kept for the whole run
    calibration: int
    quantize: int  # per layer of a chunk
    finetune: int

    def peak(self, layers_per_step: int = 1) -> int:
        return self.hadamards + max(
            self.calibration, layers_per_step * self.quantize, self.finetune
        )

    def describe(self, layers_per_step: int = 1) -> str:
        return (
            f"{_gib(self.peak(layers_per_step))} (dense Hadamards "
            f"{_gib(self.hadamards)} + the largest of calibration "
            f"{_gib(self.calibration)}, BlockLDLQ {_gib(self.quantize)} x "
            f"{layers_per_step} layer(s), fine-tuning {_gib(self.finetune)})"
        )


def layer_memory(
    config: Any,
    *,
    K: int,
    finetune: bool,
    batch_size: int,
    seqlen: int,
    model_bytes: int = 2,
) -> LayerMemory:
    shapes = qtip_checkpoint.llama_projection_shapes(config)
    weights = sum(m * n for m, n in shapes.values())
    inputs = group_inputs(config)
    h, inter = config.hidden_size, config.intermediate_size
    tokens = batch_size * seqlen
    sizes = {n for n in inputs.values()} | {m for m, _ in shapes.values()}
    hadamards = sum(8 * n * n for n in sizes)
    layer = weights * model_bytes
    # One batch through the layer, plus the float64 Hessian sums and the
    # float64 copy of the widest hooked input.
    calibration = (
        layer
        + sum(8 * n * n for n in inputs.values())
        + tokens * (6 * h + 4 * inter) * model_bytes
        + tokens * max(inputs.values()) * 8
    )
    # Per group: the rotated weight (float64) and the target (float32), the
    # rotated Hessian (float64) and its LDL factor (float32); the widest
    # lane's stacked target, states, W_hat and error; the LDL of the widest
    # Hessian (a few float64 n x n); the Viterbi batch of the widest lane.
    rows: dict[int, int] = {}  # lane (in_features) -> stacked rows
    for group, paths in LLAMA_GROUPS.items():
        n = inputs[group]
        rows[n] = rows.get(n, 0) + sum(shapes[p][0] for p in paths)
    n_max = max(inputs.values())
    # One column block of a lane is rows/16 tiles; the GPU Viterbi keeps
    # 128 steps x 2**(16-2K) back-pointer bytes per tile.
    viterbi = max(rows.values()) // 16 * (128 << (16 - 2 * K)) * 2
    quantize = (
        layer
        + 12 * weights
        + sum(12 * n * n for n in inputs.values())
        + 16 * max(r * n for n, r in rows.items())
        + 4 * 8 * n_max * n_max
        + viterbi
    )
    # The float32 copy of the layer, the frozen states (int64, one per two
    # weights), the rebuilt weights and their fast-Hadamard intermediates
    # (about three float32 copies) and one batch's activations in float32.
    finetune_bytes = (
        layer
        + 4 * weights
        + 4 * weights
        + 12 * weights
        + tokens * (12 * h + 8 * inter) * 4
    )
    return LayerMemory(
        hadamards, calibration, quantize, finetune_bytes if finetune else 0
    )


def e2e_memory(config: Any, *, seqlen: int, model_bytes: int = 2) -> int:
    """End-to-end fine-tuning: the original model, an fp32 student whose
    projections keep int64 states and rebuild fp32 weights for backward
    (with their gradients summed over a batch), and the logits of one
    sequence."""
    shapes = qtip_checkpoint.llama_projection_shapes(config)
    weights = sum(m * n for m, n in shapes.values()) * config.num_hidden_layers
    embed = config.vocab_size * config.hidden_size
    heads = 1 if getattr(config, "tie_word_embeddings", False) else 2
    params = weights + heads * embed
    return (
        params * model_bytes
        + heads * embed * 4
        + weights * (4 + 20)
        + seqlen * config.vocab_size * 4 * 6
    )


def check_gpu_memory(
    memory: LayerMemory, available: int, what: str, *, layers_per_step: int = 1
) -> None:
    """Raise ValueError when one layer does not fit ``available`` bytes."""
    need = memory.peak(layers_per_step)
    if need > available:
        raise ValueError(
            f"{what}: quantizing one decoder layer needs about "
            f"{memory.describe(layers_per_step)}, but the GPU has "
            f"{_gib(available)} available; use a larger GPU, or lower "
            "--batch-size / --seqlen (calibration and fine-tuning activations)"
        )


def auto_layers_per_step(
    config: Any, memory: LayerMemory, available: int, *, tile_target: int = 1024
) -> int:
    """Layers quantized together: enough that the narrowest BlockLDLQ lane
    (down_proj, out_features/16 tiles per column block and layer) gives
    about ``tile_target`` tiles per Viterbi call, within half the GPU."""
    tiles = config.hidden_size // 16
    want = max(1, -(-tile_target // tiles))
    fit = (available // 2 - memory.hadamards) // max(1, memory.quantize)
    k = max(1, min(want, fit, config.num_hidden_layers))
    # Even chunks: 30 layers at most 29 per step -> two steps of 15.
    steps = -(-config.num_hidden_layers // k)
    return -(-config.num_hidden_layers // steps)


def layer_file_bytes(config: Any, K: int) -> int:
    """Packed trellis and per-projection SU/SV/tlut of one layer."""
    shapes = qtip_checkpoint.llama_projection_shapes(config).values()
    return sum(m * n * K // 8 + 8 * (m + n) + 4096 for m, n in shapes)


def checkpoint_bytes(config: Any, K: int, model_bytes: int = 2) -> int:
    embed = config.vocab_size * config.hidden_size * model_bytes
    heads = 1 if getattr(config, "tie_word_embeddings", False) else 2
    return config.num_hidden_layers * layer_file_bytes(config, K) + heads * embed


def _existing(path: Path) -> Path:
    path = path.resolve()
    while not path.exists():
        path = path.parent
    return path


def check_disk(needs: list[tuple[Path, int, str]]) -> None:
    """needs: (directory, bytes, what). Sum per file system; raise
    ValueError naming each one that lacks the room (5% margin)."""
    by_device: dict[int, list[tuple[Path, int, str]]] = {}
    for path, nbytes, what in needs:
        if nbytes > 0:
            by_device.setdefault(os.stat(_existing(path)).st_dev, []).append(
                (path, nbytes, what)
            )
    for entries in by_device.values():
        total = sum(nbytes for _, nbytes, _ in entries)
        free = shutil.disk_usage(_existing(entries[0][0])).free
        if total * 1.05 > free:
            parts = ", ".join(f"{what} {_gib(n)} in {p}" for p, n, what in entries)
            raise ValueError(
                f"not enough disk space: this run writes {_gib(total)} ({parts}) "
                f"but that file system has {_gib(free)} free; point --hessian-dir, "
                "--work-dir or the output at a larger disk, or pass "
                "--discard-hessians (keeps one layer's Hessians at a time)"
            )
