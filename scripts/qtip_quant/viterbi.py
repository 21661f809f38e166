# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""Tail-biting Viterbi over the bitshift trellis (qtip_format.md §2.1, §4.3).

A state is an L-bit integer; the next state shifts in kv = K*V new bits:
``s' = ((s << kv) mod 2**L) | b``. So the predecessors of ``s`` are the
2**kv states ``(j << (L - kv)) | (s >> kv)``, and a state's low ``L - kv``
bits (its "suffix") are the next state's high bits (its "prefix").

The dynamic program never materialises the full cost of every state at
every step: for each step it keeps, per suffix ``u``, the best cost of a path
ending in a state with suffix ``u`` and which of the 2**kv high-bit choices
reached it (one uint8 back-pointer). A step is then one fused
"decode error + broadcast add + min over the high bits" over (B, 2**L),
which torch.compile turns into a single kernel. This needs L >= 2*K*V,
true for every code the kernels support (L=16, K*V <= 8).

Everything is vectorised over a batch of B independent sequences (tiles);
``ViterbiSolver`` splits large batches to a memory budget and picks the
implementation: this module's torch steps (eager or compiled) or the
Triton kernels of viterbi_gpu.py (the default on a GPU).
"""

from collections.abc import Callable

import torch

StepFn = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    tuple[torch.Tensor, torch.Tensor],
]


def _step(
    best: torch.Tensor,
    target: torch.Tensor,
    table_t: torch.Tensor,
    table_norm: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One trellis step for a batch of B sequences.

    best: (B, 2**(L-kv)) best path cost so far per suffix of the previous
    state, i.e. per prefix of the current one; target: (B, V). The 2**L
    states are laid out as (j, p, w) = (high kv bits, middle L-2kv bits, low
    kv bits): table_t (V, 2**kv, 2**(L-2kv), 2**kv) holds the decoded values
    and table_norm (2**kv, 2**(L-2kv), 2**kv) their squared norms. A state's
    prefix is (j, p), so ``best`` broadcasts over w, and its suffix is
    (p, w), so the predecessor choice is the min over j. Returns the new best
    per suffix and the back-pointer j per suffix (uint8).

    The squared error drops the |target|^2 term: it is the same for every
    state of a step, so it cannot change the chosen path.
    """
    batch, branches = best.shape[0], table_norm.shape[0]
    cost = table_norm + best.view(batch, branches, -1, 1)
    for v in range(target.shape[1]):
        cost = cost - 2.0 * target[:, v, None, None, None] * table_t[v]
    value, index = cost.view(batch, branches, -1).min(dim=1)
    return value, index.to(torch.uint8)


def _eager_step(batch: int, grid: tuple[int, int, int], device) -> StepFn:
    """_step with preallocated buffers: eager ops then allocate nothing, which
    makes CPU runs about 3x faster."""
    cost = torch.empty(batch, *grid, device=device)
    value = torch.empty(batch, grid[1] * grid[2], device=device)
    index = torch.empty(batch, grid[1] * grid[2], dtype=torch.int64, device=device)

    def step(best, target, table_t, table_norm):
        torch.add(table_norm, best.view(batch, grid[0], -1, 1), out=cost)
        for v in range(target.shape[1]):
            cost.addcmul_(target[:, v, None, None, None], table_t[v], value=-2.0)
        torch.min(cost.view(batch, grid[0], -1), dim=1, out=(value, index))
        # value becomes the next call's ``best``, read before min rewrites it.
        return value, index.to(torch.uint8)

    return step


_compiled_step: StepFn | None = None


def _compiled() -> StepFn:
    """_step compiled once per process (one fused kernel per step)."""
    global _compiled_step
    if _compiled_step is None:
        _compiled_step = torch.compile(_step, dynamic=True)
    return _compiled_step


def viterbi(
    targets: torch.Tensor,
    table: torch.Tensor,
    L: int,
    kv: int,
    *,
    start_prefix: torch.Tensor | None = None,
    end_suffix: torch.Tensor | None = None,
    compile_step: bool = False,
) -> torch.Tensor:
    """Minimum squared-error state path of each sequence.

    targets: (B, S, V) float32; table: (2**L, V) decoded value of each
    state. ``start_prefix`` (B,) forces the high ``L - kv`` bits of the first
    state, ``end_suffix`` (B,) the low ``L - kv`` bits of the last one.
    Returns int64 states (B, S).
    """
    if not 0 < kv <= L // 2 or L > 16:
        raise ValueError(
            f"Viterbi needs 0 < K*V={kv} <= L/2 and L={L} <= 16 (a state must "
            "share at least K*V bits with the next one)"
        )
    B, S, V = targets.shape
    if table.shape != (1 << L, V):
        raise ValueError(
            f"table has shape {tuple(table.shape)}, expected (2**L, V) = {(1 << L, V)}"
        )
    device = targets.device
    shift = L - kv
    table = table.to(device=device, dtype=torch.float32)
    grid = (1 << kv, 1 << (L - 2 * kv), 1 << kv)
    table_t = table.T.contiguous().view(V, *grid)
    table_norm = (table * table).sum(-1).view(grid)
    targets = targets.to(torch.float32)
    step = _compiled() if compile_step else _eager_step(B, grid, device)

    best = torch.zeros(B, 1 << shift, device=device)
    if start_prefix is not None:
        best.fill_(float("inf"))
        best[torch.arange(B, device=device), start_prefix.to(device)] = 0.0
    back = torch.empty(S, B, 1 << shift, dtype=torch.uint8, device=device)
    for t in range(S):
        best, back[t] = step(best, targets[:, t], table_t, table_norm)

    suffix = best.argmin(-1) if end_suffix is None else end_suffix.to(device)
    states = torch.empty(B, S, dtype=torch.int64, device=device)
    rows = torch.arange(B, device=device)
    for t in range(S - 1, -1, -1):
        high = back[t, rows, suffix].long()
        state = (high << shift) | suffix
        states[:, t] = state
        suffix = state >> kv
    return states


def tail_biting_viterbi(
    targets: torch.Tensor,
    table: torch.Tensor,
    L: int,
    kv: int,
    *,
    compile_step: bool = False,
) -> torch.Tensor:
    """Tail-biting state paths, as the reference quantizer approximates them.

    Pass 1 runs an unconstrained Viterbi on the sequence rotated by half its
    length; the suffix of the state it picks for the original last position
    becomes the "overlap". Pass 2 re-runs on the original order with the
    first state's prefix and the last state's suffix both forced to it, so
    the bitstream is circular: the last state wraps onto the first.
    """
    S = targets.shape[1]
    half = S // 2
    rotated = torch.roll(targets, shifts=-half, dims=1)
    path = viterbi(rotated, table, L, kv, compile_step=compile_step)
    # Rotated position half - 1 is original position S - 1.
    overlap = path[:, half - 1] & ((1 << (L - kv)) - 1)
    return viterbi(
        targets,
        table,
        L,
        kv,
        start_prefix=overlap,
        end_suffix=overlap,
        compile_step=compile_step,
    )


def bytes_per_sequence(L: int, kv: int, S: int, compile_step: bool) -> int:
    """Working memory of one sequence in ``viterbi``.

    Back-pointers (S * 2**(L-kv) bytes), per-suffix costs and indices, and
    for eager steps the (2**L) float32 cost buffer (a compiled step fuses it
    away).
    """
    cost = 0 if compile_step else (1 << L) * 4
    return S * (1 << (L - kv)) + (1 << (L - kv)) * 32 + cost


BACKENDS = ("triton", "compile", "torch")


def default_backend(device: torch.device | str) -> str:
    """Triton kernels on a GPU, the eager torch step elsewhere."""
    return "triton" if torch.device(device).type == "cuda" else "torch"


class ViterbiSolver:
    """Tail-biting Viterbi of batches of sequences against one table.

    backend: "torch" (eager steps, any device), "compile" (the torch step
    compiled into one kernel per trellis step) or "triton" (viterbi_gpu:
    Triton kernels replayed as CUDA graphs). Batches are split to keep the
    working memory under ``mem_bytes``. ``close()`` frees what the solver
    keeps between calls (the CUDA graphs).
    """

    def __init__(
        self,
        table: torch.Tensor,
        L: int,
        kv: int,
        *,
        mem_bytes: int,
        backend: str = "torch",
    ) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"Viterbi backend {backend!r} is not one of {BACKENDS}")
        self.table, self.L, self.kv = table, L, kv
        self.mem_bytes = mem_bytes
        self.backend = backend
        self._triton = None
        if backend == "triton":
            from .viterbi_gpu import TritonViterbi

            self._triton = TritonViterbi(table, L, kv)

    def _per_sequence(self, S: int) -> int:
        if self._triton is not None:
            from .viterbi_gpu import bytes_per_sequence as triton_bytes

            return triton_bytes(self.L, self.kv, S)
        return bytes_per_sequence(self.L, self.kv, S, self.backend == "compile")

    def _solve(self, targets: torch.Tensor) -> torch.Tensor:
        if self._triton is not None:
            return self._triton(targets)
        return tail_biting_viterbi(
            targets,
            self.table,
            self.L,
            self.kv,
            compile_step=self.backend == "compile",
        )

    def __call__(self, targets: torch.Tensor) -> torch.Tensor:
        """targets (B, S, V) -> int64 states (B, S)."""
        B, S, _ = targets.shape
        chunk = max(1, self.mem_bytes // self._per_sequence(S))
        if chunk >= B:
            return self._solve(targets)
        return torch.cat(
            [self._solve(targets[i : i + chunk]) for i in range(0, B, chunk)]
        )

    def close(self) -> None:
        if self._triton is not None:
            self._triton.close()


def path_cost(targets: torch.Tensor, table: torch.Tensor, states: torch.Tensor):
    """Squared error of each sequence's path, float64 (B,)."""
    return (table[states].double() - targets.double()).pow(2).sum((1, 2))


def checked_backend(
    table: torch.Tensor, L: int, kv: int, backend: str, *, steps: int | None = None
) -> str:
    """backend, after a short check on this device; "compile" if the Triton
    kernels fail or disagree with the torch step.

    The check runs 64 random tail-biting sequences of ``steps`` states (a
    16x16 tile's, 256/V, by default) through both: every Triton path must be
    circular and cost no more than the torch path (up to float rounding;
    near-ties may pick another path of the same cost).
    """
    if backend != "triton":
        return backend
    V = table.shape[1]
    gen = torch.Generator().manual_seed(0)
    rms = float(table.pow(2).mean().sqrt())
    steps = steps or 256 // V
    targets = (torch.randn(64, steps, V, generator=gen) * rms).to(table.device)
    try:
        solver = ViterbiSolver(table, L, kv, mem_bytes=1 << 30, backend="triton")
        states = solver(targets)
        if table.device.type == "cuda":
            # The first call captured a CUDA graph; check its replay too.
            states = solver(targets)
        solver.close()
        mask = (1 << (L - kv)) - 1
        circular = torch.equal(states & mask, torch.roll(states, -1, dims=1) >> kv)
        ours = path_cost(targets, table, states)
        ref = path_cost(targets, table, tail_biting_viterbi(targets, table, L, kv))
        worse = int((ours > ref * (1 + 1e-5) + 1e-6).sum())
        if not circular or worse:
            raise RuntimeError(
                f"{'not tail-biting; ' if not circular else ''}{worse} of 64 paths "
                "cost more than the torch step's"
            )
    except Exception as error:  # noqa: BLE001 - any failure means: fall back
        print(
            f"warning: the Triton Viterbi is unusable here ({error}); using the "
            "compiled torch step (--viterbi compile)",
            flush=True,
        )
        return "compile"
    return "triton"
