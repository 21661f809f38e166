# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""End-to-end fine-tuning after every layer is quantized (QTIP paper, §4.4's
second stage).

The trellis states stay frozen; SU, SV and tlut of every quantized
projection and the RMSNorm weights (each layer's input/post-attention norm
and the final norm) are trained with Adam so that the quantized model's
next-token distribution matches the original model's: the loss is the KL
divergence KL(p_orig || p_quant) per token, the original model's logits
computed on the fly. Embeddings (and a tied lm_head) stay as they are. A
held-out part of the sequences picks the best epoch.

Memory: one sequence per forward (gradients accumulate over --e2e-batch-size
sequences; each dense weight is built once per optimizer step, its gradient
summed over the batch: finetune.shared_weights), the student in fp32 with a
bf16 autocast forward on CUDA; for SmolLM2-135M with 2048-token sequences
that is a few GiB. Unlike the per-layer stages this holds the whole model
(the teacher and the student): it is for models that fit the GPU twice over
(resources.e2e_memory).

Resumable: with a state file, the trained values, the optimizer, the best
epoch so far and the data order's random state are saved after every epoch,
and a restarted run continues from the last saved epoch with the same
result as an uninterrupted one.
"""

import copy
import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .codec import QTIPCodeParams
from .finetune import QuantizedLinear, TrainableQTIPLinear, shared_weights
from .model_io import LAYER_NORMS


@dataclass
class E2EOptions:
    seqs: int = 128
    epochs: int = 4
    lr: float = 2e-5
    batch_size: int = 4
    valid_fraction: float = 0.25
    autocast: bool = True  # bf16 student forward on CUDA
    seed: int = 0


def norm_names(num_layers: int) -> list[str]:
    """Checkpoint names of the RMSNorm weights that end-to-end training updates."""
    return [
        f"model.layers.{i}.{norm}.weight"
        for i in range(num_layers)
        for norm in LAYER_NORMS
    ] + ["model.norm.weight"]


def build_student(
    model: torch.nn.Module,
    quantized: dict[int, dict[str, QuantizedLinear]],
    params: QTIPCodeParams,
    norms: dict[str, torch.Tensor] | None = None,
) -> tuple[torch.nn.Module, dict[str, TrainableQTIPLinear]]:
    """An fp32 copy of model whose projections are TrainableQTIPLinears.

    quantized maps layer index -> projection path -> its QuantizedLinear;
    norms optionally overrides RMSNorm weights by checkpoint name. Only SU,
    SV, tlut and the norm weights require gradients.
    """
    device = next(model.parameters()).device
    student = copy.deepcopy(model).float()
    student.requires_grad_(False)
    modules = {}
    for i, layer in quantized.items():
        for path, q in layer.items():
            module = TrainableQTIPLinear(q, params).to(device)
            parent, _, attr = path.rpartition(".")
            setattr(student.model.layers[i].get_submodule(parent), attr, module)
            modules[f"model.layers.{i}.{path}"] = module
    num_layers = len(student.model.layers)
    for name in norm_names(num_layers):
        weight = student.get_parameter(name)
        if norms is not None and name in norms:
            weight.data.copy_(norms[name])
        weight.requires_grad_(True)
    return student, modules


def kl_to_teacher(
    student: torch.nn.Module,
    teacher: torch.nn.Module,
    ids: torch.Tensor,
    autocast: bool,
) -> torch.Tensor:
    """Mean over tokens of KL(p_teacher || p_student), fp32."""
    with torch.no_grad():
        target = teacher(input_ids=ids, use_cache=False).logits.float()
        target = target.log_softmax(-1)
    with torch.autocast(ids.device.type, torch.bfloat16, enabled=autocast):
        logits = student(input_ids=ids, use_cache=False).logits
    logp = logits.float().log_softmax(-1)
    kl = F.kl_div(logp, target, log_target=True, reduction="sum")
    return kl / ids.numel()


@dataclass
class E2EResult:
    """Trained projections and norms (rounded to their checkpoint dtypes),
    statistics, and the student model that computes exactly them."""

    linears: dict[int, dict[str, QuantizedLinear]]
    norms: dict[str, torch.Tensor]
    stats: dict[str, Any]
    student: torch.nn.Module


def finetune_e2e(
    model: torch.nn.Module,
    quantized: dict[int, dict[str, QuantizedLinear]],
    params: QTIPCodeParams,
    sequences: torch.Tensor,
    options: E2EOptions,
    store_dtype: torch.dtype,
    *,
    state_file: Path | None = None,
) -> E2EResult:
    """Fine-tune all quantized projections and norms against model's logits.

    model is the original model (the teacher, left unchanged); sequences
    (N, seqlen) token ids, of which the first options.seqs are used and the
    last valid_fraction of those held out. store_dtype is the checkpoint
    dtype of SU and the norms: the result is rounded to it (SV stays fp32,
    tlut becomes fp16), so the checkpoint holds what the student computes.
    state_file: where the state is saved after each epoch and resumed from
    (it records the options; a state of other options is ignored).
    """
    if options.seqs > sequences.shape[0]:
        raise ValueError(
            f"--e2e-seqs {options.seqs} exceeds the {sequences.shape[0]} "
            "calibration sequences: raise --calib-seqs"
        )
    num_valid = max(1, int(options.seqs * options.valid_fraction))
    if options.seqs <= num_valid:
        raise ValueError(
            f"end-to-end fine-tuning needs more than {num_valid} sequences, got "
            f"{options.seqs}: raise --e2e-seqs"
        )
    device = next(model.parameters()).device
    autocast = options.autocast and device.type == "cuda"
    t0 = time.time()
    student, modules = build_student(model, quantized, params)
    trainable = {n: p for n, p in student.named_parameters() if p.requires_grad}
    optimizer = torch.optim.Adam(trainable.values(), lr=options.lr)
    data = sequences[: options.seqs]
    train, valid = data[:-num_valid], data[-num_valid:]

    def validation() -> float:
        student.eval()
        with torch.no_grad(), shared_weights(modules.values()):
            total = sum(
                kl_to_teacher(student, model, ids[None].to(device), autocast).item()
                for ids in valid
            )
        student.train()
        return total / len(valid)

    def snapshot() -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in trainable.items()}

    generator = torch.Generator().manual_seed(options.seed)
    key = dataclasses.asdict(options)
    state = None
    if state_file is not None and state_file.exists():
        state = torch.load(state_file, weights_only=False)
        if state["options"] != key:
            state = None
    if state is None:
        start = best = validation()
        best_params, best_epoch, history = snapshot(), 0, [start]
        first_epoch, elapsed = 0, 0.0
    else:
        with torch.no_grad():
            for name, p in trainable.items():
                p.copy_(state["params"][name])
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"])
        start, best, best_epoch = state["start"], state["best"], state["best_epoch"]
        best_params, history = state["best_params"], state["history"]
        first_epoch, elapsed = state["epoch"], state["elapsed"]
    model.eval()
    student.train()
    bar = tqdm(
        range(first_epoch, options.epochs),
        desc="e2e fine-tune",
        total=options.epochs,
        initial=first_epoch,
    )
    for epoch in bar:
        order = torch.randperm(len(train), generator=generator).tolist()
        for b in range(0, len(order), options.batch_size):
            batch = order[b : b + options.batch_size]
            optimizer.zero_grad(set_to_none=True)
            with shared_weights(modules.values()):
                for i in batch:
                    ids = train[i][None].to(device)
                    loss = kl_to_teacher(student, model, ids, autocast) / len(batch)
                    loss.backward()
            optimizer.step()
        score = validation()
        history.append(score)
        bar.set_postfix(kl=f"{score:.4f}")
        if score < best:
            best, best_params, best_epoch = score, snapshot(), epoch + 1
        if state_file is not None:
            state = {
                "options": key,
                "epoch": epoch + 1,
                "params": snapshot(),
                "optimizer": optimizer.state_dict(),
                "generator": generator.get_state(),
                "start": start,
                "best": best,
                "best_epoch": best_epoch,
                "best_params": best_params,
                "history": history,
                "elapsed": elapsed + time.time() - t0,
            }
            tmp = state_file.with_suffix(".tmp")
            torch.save(state, tmp)
            tmp.replace(state_file)
    # The best epoch's values, rounded as the checkpoint stores them.
    with torch.no_grad():
        for name, p in trainable.items():
            leaf = name.rpartition(".")[2]
            dtype = {"SV": torch.float32, "tlut": torch.float16}.get(leaf, store_dtype)
            p.copy_(best_params[name].to(dtype).float())
    student.requires_grad_(False)
    final = validation()
    student.eval()
    linears: dict[int, dict[str, QuantizedLinear]] = {}
    for i, layer in quantized.items():
        linears[i] = {}
        for path, q in layer.items():
            module = modules[f"model.layers.{i}.{path}"]
            linears[i][path] = QuantizedLinear(
                states=q.states,
                SU=module.SU.detach().cpu(),
                SV=module.SV.detach().cpu(),
                tlut=None if module.tlut is None else module.tlut.detach().cpu(),
                rcp=q.rcp,
                tp_rank=q.tp_rank,
                proxy=q.proxy,
            )
    norms = {
        name: student.get_parameter(name).detach().cpu()
        for name in norm_names(len(student.model.layers))
    }
    stats = {
        "kl_before": start,
        "kl_best": best,
        "kl_after": final,
        "kl_history": history,
        "best_epoch": best_epoch,
        "train_seqs": len(train),
        "valid_seqs": len(valid),
        "e2e_s": elapsed + time.time() - t0,
    }
    return E2EResult(linears, norms, stats, student)
