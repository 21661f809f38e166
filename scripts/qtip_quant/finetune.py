# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""Per-layer fine-tuning of SU, SV and the lookup table (qtip_format.md §4.4).

After a decoder layer's projections are quantized, their trellis states are
frozen and the continuous parameters (SU, SV, tlut of every projection) are
trained with Adam so that the layer's output matches the original layer's
output on calibration inputs. A held-out part of the inputs picks the best
epoch (early stopping).
"""

import contextlib
import copy
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .codec import QTIPCodeParams, qtip_utils


@dataclass
class QuantizedLinear:
    """A quantized projection: frozen states and its continuous parameters.

    states: (m, n/V) int64 trellis states; SU (n,), SV (m,) float32, SV
    including Wscale; tlut (2**tlut_bits, V) float32 or None; rcp/tp_rank
    as in the checkpoint; proxy: tr(dW H dW^T) / tr(W H W^T) before
    fine-tuning.
    """

    states: torch.Tensor
    SU: torch.Tensor
    SV: torch.Tensor
    tlut: torch.Tensor | None
    rcp: int
    tp_rank: int
    proxy: float

    @property
    def shape(self) -> tuple[int, int]:
        return self.SV.numel(), self.SU.numel()


def hadamard_blocks(q: QuantizedLinear) -> tuple[int | None, int | None]:
    """Block sizes of the input and output Hadamards for q's rcp."""
    m, n = q.shape
    return (
        n // q.tp_rank if q.rcp == 1 else None,
        m // q.tp_rank if q.rcp == 2 else None,
    )


class _Hadamard(torch.autograd.Function):
    """``x @ Hn.T`` along the last dim (``x @ Hn`` with transpose), by the
    codec's fast transform; the gradient is the other one (Hn is orthogonal)."""

    @staticmethod
    def forward(ctx, x, transpose: bool, block: int | None):  # type: ignore[override]
        ctx.transpose, ctx.block = transpose, block
        return qtip_utils.hadamard_transform(x, transpose=transpose, block_size=block)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        out = qtip_utils.hadamard_transform(
            grad, transpose=not ctx.transpose, block_size=ctx.block
        )
        return out, None, None


class TrainableQTIPLinear(torch.nn.Module):
    """Differentiable stand-in for nn.Linear during fine-tuning.

    The dense weight ``diag(SV) Hm W_hat(tlut) Hn^T diag(SU)`` is rebuilt
    each call from the frozen states, so gradients reach SU, SV and tlut.
    The Hadamards are the codec's fast transforms (as in
    ``qtip_utils.dequantize_weight``): O(mn log n) per rebuild instead of
    the O(mn(m + n)) of dense products, which dominated fine-tuning of wide
    layers. Inside ``shared_weights`` the forward uses a weight built once
    for many forwards instead.
    """

    def __init__(
        self,
        q: QuantizedLinear,
        params: QTIPCodeParams,
    ) -> None:
        super().__init__()
        self.params = params
        self.in_block, self.out_block = hadamard_blocks(q)
        self.register_buffer("states", q.states)
        self.SU = torch.nn.Parameter(q.SU.float().clone())
        self.SV = torch.nn.Parameter(q.SV.float().clone())
        self.tlut = (
            None if q.tlut is None else torch.nn.Parameter(q.tlut.float().clone())
        )
        # The weight that forward uses while shared_weights holds one.
        self.shared: torch.Tensor | None = None

    def weight(self) -> torch.Tensor:
        # Built in fp32 even under autocast: bf16 Hadamard products would add
        # rounding error of the size of the 4-bit code's.
        with torch.autocast(self.SU.device.type, enabled=False):
            m, n = self.SV.numel(), self.SU.numel()
            w_hat = qtip_utils.decode_states(self.states, self.params, self.tlut)
            # Rows of W_hat Hn^T are Hn applied to rows of W_hat; then Hm on
            # the columns.
            w = _Hadamard.apply(w_hat.reshape(m, n), False, self.in_block)
            w = _Hadamard.apply(w.T, False, self.out_block).T
            return self.SV[:, None] * w * self.SU[None, :]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight() if self.shared is None else self.shared
        return F.linear(x, weight.to(x.dtype))


@contextlib.contextmanager
def shared_weights(modules: Iterable[TrainableQTIPLinear]) -> Iterator[None]:
    """Build each module's weight once for all forwards inside the block.

    Rebuilding every weight in every forward costs many small kernels per
    projection; an optimizer step over a batch of sequences (one forward and
    backward each) or an evaluation pass needs each weight only once. Under
    grad mode the forwards see a detached copy that requires grad, whose
    .grad sums the gradients of all backward passes in the block; when the
    block ends (without an exception) that sum is sent back through the
    rebuild once, so SU, SV and tlut get the gradients that per-forward
    rebuilds would have given them (the rebuild is linear in its output's
    gradient: equal up to rounding). Under no_grad the forwards simply share
    the weight.
    """
    modules = list(modules)
    built = [m.weight() for m in modules]
    leaves = [w.detach().requires_grad_(w.requires_grad) for w in built]
    try:
        for m, leaf in zip(modules, leaves):
            m.shared = leaf
        yield
        pairs = [(w, x.grad) for w, x in zip(built, leaves) if x.grad is not None]
        if pairs:
            weights, grads = zip(*pairs)
            torch.autograd.backward(weights, grads)
    finally:
        for m in modules:
            m.shared = None


def _set_submodule(root: torch.nn.Module, path: str, module: torch.nn.Module):
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)


def _float_tensors(obj: Any) -> Any:
    """Floating tensors (also inside tuples) as float32: the layer copy runs in
    fp32 while the captured rotary embeddings and mask have the model dtype."""
    if isinstance(obj, torch.Tensor):
        return obj.float() if obj.is_floating_point() else obj
    if isinstance(obj, tuple | list):
        return type(obj)(_float_tensors(x) for x in obj)
    return obj


def _layer_output(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


@dataclass
class FinetuneOptions:
    epochs: int = 5
    lr: float = 1e-4
    valid_fraction: float = 0.25
    train_tlut: bool = True


def finetune_layer(
    layer: torch.nn.Module,
    quantized: dict[str, QuantizedLinear],
    params: QTIPCodeParams,
    inputs: list[torch.Tensor],
    layer_kwargs: dict[str, Any],
    options: FinetuneOptions,
    desc: str = "finetune",
) -> tuple[dict[str, QuantizedLinear], dict[str, float]]:
    """Fine-tune the quantized projections of one decoder layer.

    layer is the original decoder layer (left unchanged); quantized maps
    projection paths ("self_attn.q_proj", ...) to their results; inputs are
    batches of the layer's input hidden states. Returns updated copies of
    the QuantizedLinears and the validation MSE before and after.
    """
    device = next(layer.parameters()).device
    work = copy.deepcopy(layer).float()
    work.requires_grad_(False)
    layer_kwargs = {k: _float_tensors(v) for k, v in layer_kwargs.items()}
    with torch.no_grad():
        targets = [
            _layer_output(work(x.to(device).float(), **layer_kwargs)).cpu()
            for x in inputs
        ]
    modules = {}
    for path, q in quantized.items():
        modules[path] = TrainableQTIPLinear(q, params).to(device)
        if modules[path].tlut is not None and not options.train_tlut:
            modules[path].tlut.requires_grad_(False)
        _set_submodule(work, path, modules[path])
    trainable = [p for m in modules.values() for p in m.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(trainable, lr=options.lr)
    num_valid = max(1, int(len(inputs) * options.valid_fraction))
    if len(inputs) <= num_valid:
        raise ValueError(
            f"fine-tuning needs more than {num_valid} input batches, got "
            f"{len(inputs)}: raise --ft-seqs"
        )
    train = list(range(len(inputs) - num_valid))
    valid = list(range(len(inputs) - num_valid, len(inputs)))

    def loss_of(index: int) -> torch.Tensor:
        out = _layer_output(work(inputs[index].to(device).float(), **layer_kwargs))
        return F.mse_loss(out, targets[index].to(device))

    def validation() -> float:
        # One optimizer step per input batch: training builds each weight once
        # per step anyway; validation shares it over the held-out batches.
        with torch.no_grad(), shared_weights(modules.values()):
            return sum(loss_of(i).item() for i in valid) / len(valid)

    def snapshot() -> dict[str, dict[str, torch.Tensor]]:
        return {
            path: {k: v.detach().clone() for k, v in m.named_parameters()}
            for path, m in modules.items()
        }

    start = best = validation()
    best_params = snapshot()
    generator = torch.Generator().manual_seed(0)
    for _ in tqdm(range(options.epochs), desc=desc, leave=False):
        for i in torch.randperm(len(train), generator=generator).tolist():
            optimizer.zero_grad(set_to_none=True)
            loss_of(train[i]).backward()
            optimizer.step()
        score = validation()
        if score < best:
            best, best_params = score, snapshot()
    result = {}
    for path, q in quantized.items():
        trained = best_params[path]
        result[path] = QuantizedLinear(
            states=q.states,
            SU=trained["SU"].cpu(),
            SV=trained["SV"].cpu(),
            tlut=trained["tlut"].cpu() if "tlut" in trained else q.tlut,
            rcp=q.rcp,
            tp_rank=q.tp_rank,
            proxy=q.proxy,
        )
    return result, {"mse_before": start, "mse_after": best}
