# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""Proxy error against layer width, at the same Hessian statistics.

Without real Llama-3.1-8B weights, the question "does QTIP lose quality on
wider layers" is asked of random layers: for each projection group of a
SmolLM2-135M layer and of a Llama-3.1-8B layer, a Gaussian weight and a
synthetic input Hessian whose statistics do not depend on the width are
quantized by the quantizer's own path (random signs, Hadamards, Wscale,
BlockLDLQ with the tail-biting Viterbi), and the proxy error
tr(dW H dW^T) / tr(W H W^T) is compared.

The Hessian: H = D (I + (c/r) U U^T) D with D a log-normal per-channel scale
(a few large channels, as real activations have) and U an n x r Gaussian
with r = n/4: its normalized spectrum is the same Marchenko-Pastur law at
every width n, and D has the same distribution. BlockLDLQ quantizes rows
independently, so ``rows`` quantizes only the first rows of a group (an
unbiased sample of its error) to make the check cheap on a CPU.
"""

from dataclasses import dataclass
from typing import Any

import torch

from .codebook import initial_tlut
from .codec import QTIPCodeParams, qtip_utils
from .hessian import LLAMA_GROUPS
from .ldlq import block_ldlq

# (hidden, intermediate, attention heads, KV heads, head_dim)
SHAPES = {
    "SmolLM2-135M": (576, 1536, 9, 3, 64),
    "Llama-3.1-8B": (4096, 14336, 32, 8, 128),
}


@dataclass
class _Shape:
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int


def shape(model: str) -> _Shape:
    return _Shape(*SHAPES[model])


def synthetic_hessian(
    n: int, *, seed: int, device: torch.device | str = "cpu", correlation: float = 4.0
) -> torch.Tensor:
    """float64 (n, n) Hessian with width-independent statistics (see above)."""
    gen = torch.Generator().manual_seed(seed)
    scale = torch.exp(0.75 * torch.randn(n, generator=gen, dtype=torch.float64))
    r = max(1, n // 4)
    U = torch.randn(n, r, generator=gen, dtype=torch.float64).to(device)
    H = U @ U.T * (correlation / r)
    H.diagonal().add_(1.0)
    scale = scale.to(device)
    return scale[:, None] * H * scale[None, :]


def group_proxies(
    model: str,
    K: int,
    *,
    groups: tuple[str, ...] = tuple(LLAMA_GROUPS),
    rows: int | None = None,
    device: torch.device | str = "cpu",
    backend: str = "torch",
    seed: int = 0,
    tlut: torch.Tensor | None = None,
) -> dict[str, float]:
    """Proxy error of each projection of the given groups of a random layer
    of ``model``'s shape, with a synthetic Hessian per group input."""
    from .quantize import QuantizeOptions, _finish_group, _Hadamards, _prepare_group

    params = QTIPCodeParams(K=K)
    if tlut is None:
        tlut = initial_tlut(params, samples=1 << 16, iters=10, seed=seed)
    tlut = tlut.half().float()
    table = qtip_utils.decode_table(params, tlut.to(device), device=device)
    lut_rms = float(table.pow(2).mean().sqrt())
    options = QuantizeOptions(K=K, seed=seed)
    hadamards = _Hadamards(device)
    from .codec import qtip_checkpoint

    shapes = qtip_checkpoint.llama_projection_shapes(shape(model))
    out: dict[str, float] = {}
    for g, group in enumerate(LLAMA_GROUPS):
        if group not in groups:
            continue
        paths = LLAMA_GROUPS[group]
        n = shapes[paths[0]][1]
        gen = torch.Generator().manual_seed(seed * 1000 + g)
        weights = [torch.randn(*shapes[p], generator=gen) for p in paths]
        hessian = synthetic_hessian(n, seed=seed * 1000 + g, device=device)
        work = _prepare_group(
            0, g, paths, weights, hessian, options, lut_rms, hadamards, 0
        )
        if rows is not None:
            # The first rows of the first projection only.
            work.paths = paths[:1]
            work.rotated = [work.rotated[0][:rows]]
            work.row_scale = [work.row_scale[0][:rows]]
            work.sv = [work.sv[0][:rows]]
            work.job.weight = work.job.weight[:rows]
        [(states, w_hat)] = block_ldlq(
            [work.job], table, params, mem_bytes=1 << 31, backend=backend
        )
        for path, q in _finish_group(work, states, w_hat, tlut).items():
            out[path] = q.proxy
    return out


def width_check(
    Ks: tuple[int, ...] = (2, 3, 4),
    *,
    device: torch.device | str = "cpu",
    backend: str = "torch",
    rows: int | None = None,
    groups: tuple[str, ...] = tuple(LLAMA_GROUPS),
) -> dict[str, Any]:
    """{"K": {projection: {model: proxy, ..., "ratio": 8B / SmolLM2}}}."""
    result: dict[str, Any] = {}
    for K in Ks:
        tlut = initial_tlut(QTIPCodeParams(K=K), samples=1 << 16, iters=10)
        per_model = {
            model: group_proxies(
                model,
                K,
                groups=groups,
                rows=rows,
                device=device,
                backend=backend,
                tlut=tlut,
            )
            for model in SHAPES
        }
        small, large = per_model["SmolLM2-135M"], per_model["Llama-3.1-8B"]
        result[str(K)] = {
            path: {
                "SmolLM2-135M": small[path],
                "Llama-3.1-8B": large[path],
                "ratio": large[path] / small[path],
            }
            for path in small
        }
    return result
