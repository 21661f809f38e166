# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""Initial lookup table of the HYB code (qtip_format.md §2.2).

The reference seeds the per-layer table with k-means of samples of a V-dim
standard normal into 2**tlut_bits centroids, rescaled to std sqrt(15/16);
fine-tuning then adapts it per linear.
"""

import torch

from .codec import QTIPCodeParams

TLUT_STD = 0.9682458365518543


def kmeans(
    points: torch.Tensor,
    clusters: int,
    *,
    iters: int,
    generator: torch.Generator,
    chunk: int = 1 << 16,
) -> torch.Tensor:
    """Lloyd's k-means of points (N, D); returns the centroids (clusters, D).

    Seeded by ``generator`` (the initial centroids are random points). An
    empty cluster is re-seeded with a random point.
    """
    num = points.shape[0]
    if num < clusters:
        raise ValueError(f"k-means of {num} points into {clusters} clusters")
    pick = torch.randperm(num, generator=generator)[:clusters].to(points.device)
    centroids = points[pick].clone()
    for _ in range(iters):
        assign = torch.cat(
            [
                torch.cdist(points[i : i + chunk], centroids).argmin(-1)
                for i in range(0, num, chunk)
            ]
        )
        sums = torch.zeros_like(centroids).index_add_(0, assign, points)
        counts = torch.bincount(assign, minlength=clusters).to(points.dtype)
        empty = counts == 0
        centroids = sums / counts.clamp(min=1)[:, None]
        if empty.any():
            refill = torch.randint(num, (int(empty.sum()),), generator=generator)
            centroids[empty] = points[refill.to(points.device)]
    return centroids


def initial_tlut(
    params: QTIPCodeParams,
    *,
    samples: int = 1 << 20,
    iters: int = 25,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """k-means lookup table of the HYB code, float32 (2**tlut_bits, V)."""
    if params.decode_mode != "quantlut_sym":
        raise ValueError(
            f"a k-means tlut is the HYB (quantlut_sym) table; "
            f"decode_mode={params.decode_mode!r} is not supported"
        )
    generator = torch.Generator().manual_seed(seed)
    points = torch.randn(samples, params.V, generator=generator).to(device)
    table = kmeans(points, 1 << params.tlut_bits, iters=iters, generator=generator)
    return (table * (TLUT_STD / table.std())).cpu()
