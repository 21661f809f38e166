# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""Incoherence processing and BlockLDLQ (qtip_format.md §3.3, §4.2).

For a linear W (m x n) with input Hessian H (n x n):

* random signs SU0 (n) and SV0 (m) and the QTIP Hadamards Hn, Hm give
  ``Wr = Hm^T diag(SV0) W diag(SU0) Hn`` and
  ``Hr = Hn^T diag(SU0) H diag(SU0) Hn``;
* Wr is divided by Wscale (per linear, or per TP block) so that it is in
  lookup-table units;
* BlockLDLQ walks the 16-column blocks from last to first and quantizes each
  block's target ``Wr[:, b] + (Wr - W_hat)[:, >b] L[>b, b]`` with the
  tail-biting Viterbi, one 16x16 tile per trellis sequence, where
  ``Hr = L D L^T`` is the block LDL decomposition.

Rows are independent in BlockLDLQ, so linears that share an input (and thus
the Hessian and SU0) are quantized together as one taller matrix, and
several such jobs with the same n run their blocks side by side: every
Viterbi call then sees as many tiles as possible.
"""

import math
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from .codec import QTIPCodeParams, qtip_utils
from .viterbi import ViterbiSolver


def hadamard_matrix(
    n: int,
    block_size: int | None = None,
    device: torch.device | str = "cpu",
    rows_per_step: int = 2048,
) -> torch.Tensor:
    """Dense float64 Hn (block-diagonal with ``block_size``), built on device.

    ``qtip_utils.hadamard_transform(x, block_size=...)`` equals ``x @ Hn.T``.
    Built from the codec itself, so the factor choice always matches it; its
    entries are exactly +-1/sqrt(block). Transformed a few identity rows at a
    time, so the only large allocation is the result.
    """
    block = n if block_size is None else block_size
    out = torch.empty(n, n, dtype=torch.float64, device=device)
    for start in range(0, n, rows_per_step):
        count = min(rows_per_step, n - start)
        eye = torch.zeros(count, n, device=device)
        eye[torch.arange(count), torch.arange(start, start + count)] = 1.0
        rows = qtip_utils.hadamard_transform(eye, block_size=block_size)
        out[:, start : start + count] = torch.round(
            rows.double() * math.sqrt(block)
        ).T / math.sqrt(block)
    return out


def check_hadamard_dim(dim: int, what: str, block_size: int | None = None) -> None:
    """Raise ValueError if QTIP has no Hadamard transform of this size."""
    try:
        qtip_utils.get_hadamard_factor(dim)
        if block_size is not None:
            qtip_utils.hadamard_transform(torch.zeros(1, dim), block_size=block_size)
    except ValueError as error:
        raise ValueError(f"{what}: unsupported dimension for QTIP: {error}") from error


def tile_order(params: QTIPCodeParams) -> torch.Tensor:
    """Flat in-tile index (row * td_y + col) of each trellis sequence position.

    The kernel layout quantizes a tile in mma-fragment order (§2.4): position
    p = 2t + u of the sequence lies at row g + 8a, column 8d + 2q + u, with
    lane = t >> 2, j = t & 3, g = lane >> 2, q = lane & 3, d = j >> 1,
    a = j & 1. The generic layout is row-major.
    """
    size = params.tile_size
    if not params.uses_kernel_layout:
        return torch.arange(size)
    p = torch.arange(size)
    t, u = p // 2, p % 2
    lane, j = t // 4, t % 4
    g, q, d, a = lane // 4, lane % 4, j // 2, j % 2
    return (g + 8 * a) * params.td_y + 8 * d + 2 * q + u


def block_ldl(H: torch.Tensor, block: int) -> torch.Tensor:
    """Strictly block-lower L of ``H = (L + I) D (L + I)^T``, block ``block``.

    From the Cholesky factor C: ``L + I = C blockdiag(C_bb)^-1``, whose
    diagonal blocks are the identity; those are dropped. H must be positive
    definite (float64 recommended).
    """
    n = H.shape[0]
    if n % block != 0:
        raise ValueError(f"Hessian size {n} is not a multiple of block {block}")
    C = torch.linalg.cholesky(H)
    nb = n // block
    idx = torch.arange(nb, device=H.device)
    diag = C.view(nb, block, nb, block)[idx, :, idx, :]  # (nb, block, block)
    cols = C.view(n, nb, block).transpose(0, 1)  # (nb, n, block)
    L = torch.linalg.solve_triangular(diag, cols, upper=False, left=False)
    del C, cols  # large for wide layers: free before the transposed copy
    L = L.transpose(0, 1).reshape(n, n)
    L.view(nb, block, nb, block)[idx, :, idx, :] = 0
    return L


def regularize(H: torch.Tensor, sigma: float) -> torch.Tensor:
    """H + sigma * mean(diag H) * I (the reference's --sigma_reg)."""
    damp = sigma * H.diagonal().mean()
    out = H.clone()
    out.diagonal().add_(damp)
    return out


def safe_block_ldl(H: torch.Tensor, block: int, sigma: float) -> torch.Tensor:
    """block_ldl of the regularized H, adding damping until it factors."""
    for attempt in range(6):
        try:
            return block_ldl(regularize(H, sigma * 10**attempt), block)
        except torch.linalg.LinAlgError:
            continue
    raise ValueError(
        f"Hessian ({H.shape[0]}x{H.shape[0]}) is not positive definite even "
        f"with damping {sigma * 1e5} * mean(diag)"
    )


@dataclass
class LDLQJob:
    """Rows to quantize with one Hessian factor.

    weight: (m, n) float32 target in lookup-table units; feedback: (n, n)
    strictly block-lower L of the (scaled, transformed) Hessian, or None for
    no Hessian (plain per-tile Viterbi).
    """

    weight: torch.Tensor
    feedback: torch.Tensor | None


def _to_sequences(block: torch.Tensor, params: QTIPCodeParams, order: torch.Tensor):
    """(m, td_y) column block -> (m/td_x * 1 tiles, T/V, V) in trellis order."""
    tiles = block.reshape(-1, params.td_x * params.td_y)[:, order]
    return tiles.reshape(tiles.shape[0], -1, params.V)


def _from_sequences(
    seq: torch.Tensor, params: QTIPCodeParams, inverse: torch.Tensor
) -> torch.Tensor:
    """Inverse of _to_sequences: (tiles, T/V, V) -> (tiles * td_x, td_y)."""
    tiles = seq.reshape(seq.shape[0], -1)[:, inverse]
    return tiles.reshape(-1, params.td_y)


def _natural_states(
    states: torch.Tensor, params: QTIPCodeParams, order: torch.Tensor
) -> torch.Tensor:
    """(tiles, T/V) trellis-order states -> (tiles * td_x, td_y / V).

    Entry [r, c] is the state of the weights [r, V*c : V*c + V] of the
    column block, as pack_trellis wants them.
    """
    groups = params.td_y // params.V
    first = order[:: params.V]  # each state's first weight
    slot = (first // params.td_y) * groups + (first % params.td_y) // params.V
    out = torch.empty_like(states)
    out[:, slot.to(states.device)] = states
    return out.reshape(-1, groups)


def block_ldlq(
    jobs: list[LDLQJob],
    table: torch.Tensor,
    params: QTIPCodeParams,
    *,
    mem_bytes: int,
    backend: str = "torch",
    desc: str = "LDLQ",
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Quantize every job; returns (states (m, n/V) int64, W_hat (m, n)).

    All jobs must share n. W_hat is float32 in lookup-table units, exactly
    what ``qtip_utils.decode_weight`` returns for the packed states.
    ``backend`` and ``mem_bytes`` go to the ViterbiSolver. Nothing in the
    loop over column blocks waits for the GPU.
    """
    n = jobs[0].weight.shape[1]
    device = jobs[0].weight.device
    if any(job.weight.shape[1] != n for job in jobs):
        raise ValueError("block_ldlq jobs must all have the same in_features")
    for job in jobs:
        m = job.weight.shape[0]
        if m % params.td_x or n % params.td_y:
            raise ValueError(
                f"weight {tuple(job.weight.shape)} is not a whole number of "
                f"{params.td_x}x{params.td_y} tiles"
            )
    table = table.to(device=device, dtype=torch.float32)
    order = tile_order(params).to(device)
    inverse = torch.argsort(order)
    rows = [job.weight.shape[0] for job in jobs]
    weight = torch.cat([job.weight.float() for job in jobs])
    solver = ViterbiSolver(
        table, params.L, params.K * params.V, mem_bytes=mem_bytes, backend=backend
    )

    def quantize(block: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        seq = _to_sequences(block, params, order)
        states = solver(seq)
        w_hat = _from_sequences(table[states], params, inverse)
        return _natural_states(states, params, order), w_hat

    if all(job.feedback is None for job in jobs):
        # No feedback: every tile is independent, quantize them all at once.
        blocks = weight.reshape(weight.shape[0], n // params.td_y, params.td_y)
        states, w_hat = quantize(blocks.transpose(0, 1).reshape(-1, params.td_y))
        states = states.reshape(n // params.td_y, weight.shape[0], -1)
        w_hat = w_hat.reshape(n // params.td_y, weight.shape[0], params.td_y)
        states = states.transpose(0, 1).reshape(weight.shape[0], -1)
        w_hat = w_hat.transpose(0, 1).reshape(weight.shape[0], n)
    else:
        states = torch.empty(
            weight.shape[0], n // params.V, dtype=torch.int64, device=device
        )
        w_hat = torch.zeros_like(weight)
        error = torch.zeros_like(weight)
        errors = error.split(rows)
        feedback = [
            None if job.feedback is None else job.feedback.float() for job in jobs
        ]
        for b in tqdm(range(n // params.td_y - 1, -1, -1), desc=desc, leave=False):
            cols = slice(b * params.td_y, (b + 1) * params.td_y)
            target = weight[:, cols].clone()
            for part, err, fb in zip(target.split(rows), errors, feedback):
                if fb is not None:
                    part += err @ fb[:, cols]
            block_states, block_w = quantize(target)
            groups = params.td_y // params.V
            states[:, b * groups : (b + 1) * groups] = block_states
            w_hat[:, cols] = block_w
            error[:, cols] = weight[:, cols] - block_w
    solver.close()
    return list(zip(states.split(rows), w_hat.split(rows)))
