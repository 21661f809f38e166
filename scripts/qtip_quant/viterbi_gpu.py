# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""The tail-biting Viterbi of viterbi.py as Triton kernels, replayed as CUDA graphs.

Same dynamic program and the same state layout as ``viterbi._step``, with
the batch of sequences (tiles) as the innermost dimension: ``best`` is
(2**(L-kv), B) and the back-pointers (S, 2**(L-kv), B) uint8, so one program
of ``_step_kernel`` handles a block of BU suffixes for BB tiles and loads
each decoded table value once for all BB tiles. One launch per trellis step
(a step needs every predecessor of the previous one), a single
``_backtrack_kernel`` launch per pass instead of S small gathers.

A whole tail-biting call (both passes, the rotation, the overlap) is
captured once per batch shape as a CUDA graph and then replayed: the
~260 launches of a call cost one replay, and nothing waits on the host.
On a machine without a GPU the kernels run under ``TRITON_INTERPRET=1``
(the tests do that, on small codes).
"""

import os

import torch
import triton
import triton.language as tl

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _step_kernel(
    best,
    new_best,
    back,
    target,
    table,
    norm,
    B,
    L: tl.constexpr,
    KV: tl.constexpr,
    V: tl.constexpr,
    BU: tl.constexpr,
    BB: tl.constexpr,
):
    """new_best[u, b] = min over j of best[prefix(s), b] + |T[s]|^2 - 2 t.T[s]
    for the states s = (j << (L-KV)) | u; back[u, b] = the minimising j."""
    NU: tl.constexpr = 1 << (L - KV)
    u = tl.program_id(0) * BU + tl.arange(0, BU)
    b = tl.program_id(1) * BB + tl.arange(0, BB)
    umask = u < NU
    bmask = b < B
    mask = umask[:, None] & bmask[None, :]
    # -2 t is exact, so c + (-2 t) T equals c - 2 (t T) of the torch step.
    t0 = tl.load(target + b, mask=bmask, other=0.0)[None, :] * -2.0
    if V == 2:
        t1 = tl.load(target + B + b, mask=bmask, other=0.0)[None, :] * -2.0
    low = u >> KV
    acc = tl.full((BU, BB), float("inf"), tl.float32)
    arg = tl.full((BU, BB), 0, tl.int32)
    for j in range(1 << KV):
        s = (j << (L - KV)) | u
        p = (j << (L - 2 * KV)) | low
        c = tl.load(best + p[:, None] * B + b[None, :], mask=mask, other=0.0)
        c = c + tl.load(norm + s, mask=umask, other=0.0)[:, None]
        c = c + t0 * tl.load(table + s, mask=umask, other=0.0)[:, None]
        if V == 2:
            c = c + t1 * tl.load(table + (1 << L) + s, mask=umask, other=0.0)[:, None]
        take = c < acc  # ties keep the first j, as torch.min does
        acc = tl.where(take, c, acc)
        arg = tl.where(take, j, arg)
    out = u[:, None] * B + b[None, :]
    tl.store(new_best + out, acc, mask=mask)
    tl.store(back + out, arg.to(tl.uint8), mask=mask)


@triton.jit
def _backtrack_kernel(
    back,
    suffix0,
    states,
    B,
    S,
    L: tl.constexpr,
    KV: tl.constexpr,
    BB: tl.constexpr,
):
    """states[b, t] from the back-pointers, walking t = S-1 .. 0 from the
    last state's suffix suffix0[b]."""
    NU: tl.constexpr = 1 << (L - KV)
    b = tl.program_id(0) * BB + tl.arange(0, BB)
    mask = b < B
    suffix = tl.load(suffix0 + b, mask=mask, other=0).to(tl.int32)
    row = b.to(tl.int64)
    for i in range(S):
        t = S - 1 - i
        # (S, NU, B) exceeds 2**31 bytes for large batches: 64-bit offsets.
        offset = (t * NU + suffix).to(tl.int64) * B + row
        high = tl.load(back + offset, mask=mask, other=0).to(tl.int32)
        state = (high << (L - KV)) | suffix
        tl.store(states + row * S + t, state.to(tl.int64), mask=mask)
        suffix = state >> KV


def _step_blocks(nu: int, batch: int) -> tuple[int, int]:
    """(BU, BB) of a step launch: wide blocks, but enough programs to fill a
    GPU (a few hundred) when the batch is small."""
    bu = min(64, nu)
    bb = 32
    while bb > 8 and triton.cdiv(nu, bu) * triton.cdiv(batch, bb) < 512:
        bb //= 2
    return bu, bb


class _Buffers:
    """Working memory of one batch shape, reused by every call."""

    def __init__(self, B: int, S: int, L: int, kv: int, device: torch.device):
        nu = 1 << (L - kv)
        self.best = [torch.empty(nu, B, device=device) for _ in range(2)]
        self.back = torch.empty(S, nu, B, dtype=torch.uint8, device=device)
        self.states = torch.empty(B, S, dtype=torch.int64, device=device)
        self.rows = torch.arange(B, device=device)


def bytes_per_sequence(L: int, kv: int, S: int) -> int:
    """GPU working memory of one sequence (back-pointers dominate)."""
    nu = 1 << (L - kv)
    return S * nu + 2 * nu * 4 + S * 8 * 4 + 64


class TritonViterbi:
    """Tail-biting Viterbi of (B, S, V) targets against one decoded table.

    ``graphs``: capture one CUDA graph per (B, S) on first use and replay
    it afterwards; ``close()`` frees them.
    """

    def __init__(
        self, table: torch.Tensor, L: int, kv: int, *, graphs: bool = True
    ) -> None:
        if not 0 < kv <= L // 2 or L > 16:
            raise ValueError(f"Viterbi needs 0 < K*V={kv} <= L/2 and L={L} <= 16")
        if table.shape[0] != 1 << L or table.shape[1] not in (1, 2):
            raise ValueError(
                f"table has shape {tuple(table.shape)}, expected (2**L, V) with "
                f"L={L}, V in (1, 2)"
            )
        self.L, self.kv, self.V = L, kv, table.shape[1]
        self.device = table.device
        table = table.float()
        self.table_vt = table.T.contiguous()
        self.norm = (table * table).sum(-1).contiguous()
        self.use_graphs = graphs and self.device.type == "cuda" and not _INTERPRET
        self._graphs: dict[tuple[int, int], tuple[object, torch.Tensor, torch.Tensor]]
        self._graphs = {}
        self._buffers: dict[tuple[int, int], _Buffers] = {}

    def close(self) -> None:
        self._graphs.clear()
        self._buffers.clear()

    def __call__(self, targets: torch.Tensor) -> torch.Tensor:
        B, S, V = targets.shape
        if V != self.V:
            raise ValueError(f"targets have V={V}, the table V={self.V}")
        if not self.use_graphs:
            return self._tail_biting(targets).clone()
        key = (B, S)
        if key not in self._graphs:
            self._graphs[key] = self._capture(B, S)
        graph, static_in, static_out = self._graphs[key]
        static_in.copy_(targets)
        graph.replay()  # type: ignore[attr-defined]
        return static_out.clone()

    def _capture(self, B: int, S: int):
        static_in = torch.zeros(B, S, self.V, device=self.device)
        # Compile the kernels outside the capture, on a side stream.
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            self._tail_biting(static_in)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = self._tail_biting(static_in)
        return graph, static_in, static_out

    def _tail_biting(self, targets: torch.Tensor) -> torch.Tensor:
        """Pass 1 on the sequence rotated by half picks the overlap; pass 2
        forces it as the first state's prefix and the last one's suffix
        (viterbi.tail_biting_viterbi)."""
        B, S, _ = targets.shape
        key = (B, S)
        if key not in self._buffers:
            self._buffers[key] = _Buffers(B, S, self.L, self.kv, self.device)
        buf = self._buffers[key]
        # (S, V, B): each step reads one contiguous (V, B) slice.
        seq = targets.float().permute(1, 2, 0).contiguous()
        half = S // 2
        path = self._pass(torch.roll(seq, -half, dims=0), buf, None)
        overlap = path[:, half - 1] & ((1 << (self.L - self.kv)) - 1)
        return self._pass(seq, buf, overlap)

    def _pass(
        self, seq: torch.Tensor, buf: _Buffers, overlap: torch.Tensor | None
    ) -> torch.Tensor:
        S, _, B = seq.shape
        L, kv = self.L, self.kv
        nu = 1 << (L - kv)
        best, new = buf.best
        if overlap is None:
            best.zero_()
        else:
            best.fill_(float("inf"))
            best.scatter_(0, overlap[None, :], 0.0)
        bu, bb = _step_blocks(nu, B)
        grid = (triton.cdiv(nu, bu), triton.cdiv(B, bb))
        for t in range(S):
            _step_kernel[grid](
                best,
                new,
                buf.back[t],
                seq[t],
                self.table_vt,
                self.norm,
                B,
                L=L,
                KV=kv,
                V=self.V,
                BU=bu,
                BB=bb,
            )
            best, new = new, best
        suffix = best.argmin(0) if overlap is None else overlap
        _backtrack_kernel[(triton.cdiv(B, 32),)](
            buf.back, suffix.contiguous(), buf.states, B, S, L=L, KV=kv, BB=32
        )
        return buf.states
