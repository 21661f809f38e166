# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""Quantize a Llama-family HF model into a QTIP checkpoint, one decoder layer
at a time.

Pipeline (qtip_format.md §4): per decoder layer, in order: the calibration
sequences' hidden states go through the original layer (its input Hessians
are accumulated and saved) -> per group of projections sharing an input:
random signs + Hadamards + Wscale -> BlockLDLQ with the tail-biting Viterbi
-> optional per-layer fine-tuning -> the layer's tensors are saved. Then
optional end-to-end fine-tuning, and the relaxml checkpoint layout, written
shard by shard.

Memory: the original model is read from its safetensors shards one layer at
a time (model_io.SourceModel), the calibration activations exist for the
current layer only (host memory, in the model dtype), Hessians go to disk;
the GPU holds one layer (or ``layers_per_step`` layers) and its work.

Work files (``--work-dir``) make the run resumable after a kill at any
point: Hessians are stored per layer, each finished layer's tensors are
saved as soon as it is done, end-to-end fine-tuning saves its state every
epoch; a resumed run recomputes the activations entering the first
unfinished layer by running the finished original layers (no Hessians, no
quantization) and continues.
"""

import dataclasses
import json
import shutil
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .codebook import initial_tlut
from .codec import QTIPCodeParams, qtip_checkpoint, qtip_utils
from .e2e import E2EOptions, E2EResult, finetune_e2e
from .finetune import FinetuneOptions, QuantizedLinear, finetune_layer
from .hessian import (
    LLAMA_GROUPS,
    CalibrationStream,
    hessian_file_bytes,
    hessians_ok,
    load_hessians,
    save_hessians,
)
from .ldlq import (
    LDLQJob,
    block_ldlq,
    check_hadamard_dim,
    hadamard_matrix,
    safe_block_ldl,
)
from .model_io import (
    ShardWriter,
    SourceModel,
    decoder_layer,
    load_config,
)
from .resources import (
    GiB,
    auto_layers_per_step,
    check_disk,
    check_gpu_memory,
    checkpoint_bytes,
    e2e_memory,
    layer_file_bytes,
    layer_memory,
)
from .viterbi import BACKENDS, checked_backend, default_backend

# TP split of split_for_tp checkpoints (qtip_format.md §6.1): output blocks
# (rcp=2) for the column-parallel groups, input blocks (rcp=1) for the
# row-parallel ones.
GROUP_RCP = {"qkv": 2, "o": 1, "gate_up": 2, "down": 1}
# tp_rank written when the transforms are not split (the reference default).
DEFAULT_TP_RANK = 8
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "chat_template.jinja",
    "generation_config.json",
)


@dataclass
class QuantizeOptions:
    """Every option that changes the result (saved in the work dir)."""

    K: int = 2
    hessian: bool = True
    finetune: bool = False
    seed: int = 0
    sigma_reg: float = 1e-2
    scale_override: float = 0.9
    tp_split: int = 0
    tlut_samples: int = 1 << 20
    tlut_iters: int = 25
    ft: FinetuneOptions = field(default_factory=FinetuneOptions)
    ft_seqs: int = 64
    # End-to-end fine-tuning runs after the last layer and is kept apart in
    # the work dir, so these two are not part of the per-layer fingerprint.
    e2e_finetune: bool = False
    e2e: E2EOptions = field(default_factory=E2EOptions)

    @property
    def code(self) -> QTIPCodeParams:
        return QTIPCodeParams(K=self.K)


@dataclass
class RunOptions:
    """Options that only change speed or where files go."""

    device: str = "cpu"
    batch_size: int = 4
    # Layers quantized together (their BlockLDLQ blocks share Viterbi
    # calls); None: as many as fill the Viterbi batches within half the GPU.
    layers_per_step: int | None = None
    viterbi_mem_gb: float | None = None
    viterbi: str | None = None  # viterbi.BACKENDS; None: the device's default
    layout: str = "relaxml"
    # Continue a work dir that holds a run with the same options (the CLI
    # asks for --resume); False refuses such a work dir.
    resume: bool = True
    # Treat the GPU as having at most this much memory (checks, budgets).
    gpu_mem_gb: float | None = None
    max_shard_gb: float = 5.0
    # Keep every layer's Hessians (shareable between runs: 153 GiB for a
    # 70B model); False deletes each once its layer is saved.
    keep_hessians: bool = True


def check_model(config: Any, tp_split: int = 0) -> None:
    """Raise ValueError for an architecture or shape QTIP cannot quantize."""
    archs = getattr(config, "architectures", None) or []
    if config.model_type != "llama" or (archs and "LlamaForCausalLM" not in archs):
        raise ValueError(
            f"unsupported architecture: model_type={config.model_type!r}, "
            f"architectures={archs}; the QTIP quantizer supports Llama-family "
            "models (model_type 'llama', LlamaForCausalLM)"
        )
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise ValueError(
            "unsupported model: projections with bias (attention_bias/mlp_bias)"
        )
    for group, projections in LLAMA_GROUPS.items():
        for path in projections:
            m, n = qtip_checkpoint.llama_projection_shapes(config)[path]
            if m % 32 or n % 32:
                raise ValueError(
                    f"{path} ({m}x{n}): QTIP's kernel layout needs out_features "
                    "and in_features to be multiples of 32"
                )
            rcp = GROUP_RCP[group] if tp_split else 0
            check_hadamard_dim(n, f"{path} in_features={n}")
            check_hadamard_dim(m, f"{path} out_features={m}")
            if rcp:
                dim = n if rcp == 1 else m
                if dim % (32 * tp_split):
                    raise ValueError(
                        f"{path}: --tp-split {tp_split} cuts "
                        f"{'in' if rcp == 1 else 'out'}_features={dim} into "
                        "blocks that are not multiples of 32"
                    )
                check_hadamard_dim(
                    dim, f"{path} with --tp-split {tp_split}", dim // tp_split
                )


class _Hadamards:
    """Dense float64 Hadamard matrices, built once per (size, block)."""

    def __init__(self, device: torch.device | str) -> None:
        self.device = device
        self.cache: dict[tuple[int, int | None], torch.Tensor] = {}

    def __call__(self, n: int, block: int | None) -> torch.Tensor:
        if (n, block) not in self.cache:
            self.cache[(n, block)] = hadamard_matrix(n, block, self.device)
        return self.cache[(n, block)]


def _signs(size: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randint(0, 2, (size,), generator=generator).double() * 2 - 1


@dataclass
class _GroupWork:
    """A group of projections sharing an input, prepared for BlockLDLQ."""

    layer: int
    paths: tuple[str, ...]
    job: LDLQJob
    rotated: list[torch.Tensor]  # Wr per projection, float64
    hessian: torch.Tensor | None  # Hr, float64
    su: torch.Tensor  # (n,) SU0 * column scale
    sv: list[torch.Tensor]  # (m,) SV0 * row scale per projection
    row_scale: list[torch.Tensor]
    col_scale: torch.Tensor
    rcp: int
    tp_rank: int


def _prepare_group(
    layer: int,
    group_index: int,
    paths: tuple[str, ...],
    weights: list[torch.Tensor],
    hessian: torch.Tensor | None,
    options: QuantizeOptions,
    lut_rms: float,
    hadamards: _Hadamards,
    rcp: int,
) -> _GroupWork:
    """Random signs, Hadamards and Wscale of a group (§3.3).

    ``hessian`` (float64, on the device) is overwritten: wide layers have
    Hessians of several GiB, so no copy of it is made.
    """
    device = hadamards.device
    n = weights[0].shape[1]
    tp = options.tp_split or DEFAULT_TP_RANK
    # Seeded per layer and group, so a resumed run draws the same signs.
    generator = torch.Generator().manual_seed(
        options.seed * 1_000_003 + layer * 16 + group_index
    )
    su0 = _signs(n, generator).to(device)
    h_in = hadamards(n, n // tp if rcp == 1 else None)
    rotated, sv0s, row_scales = [], [], []
    for w in weights:
        m = w.shape[0]
        sv0 = _signs(m, generator).to(device)
        h_out = hadamards(m, m // tp if rcp == 2 else None)
        wr = h_out.T @ (sv0[:, None] * w.to(device).double() * su0[None, :]) @ h_in
        rotated.append(wr)
        sv0s.append(sv0)
    target_rms = lut_rms * options.scale_override
    col_scale = torch.ones(n, dtype=torch.float64, device=device)
    if rcp == 1:
        # One Wscale per input block, folded into SU.
        (wr,) = rotated
        chunks = wr.reshape(wr.shape[0], tp, n // tp)
        rms = chunks.pow(2).mean(dim=(0, 2)).sqrt() / target_rms
        col_scale = rms.repeat_interleave(n // tp)
    for wr in rotated:
        m = wr.shape[0]
        if rcp == 2:
            # One Wscale per output block, folded into SV.
            rms = wr.reshape(tp, -1).pow(2).mean(-1).sqrt() / target_rms
            row_scales.append(rms.repeat_interleave(m // tp))
        elif rcp == 1:
            row_scales.append(torch.ones(m, dtype=torch.float64, device=device))
        else:
            rms = wr.pow(2).mean().sqrt() / target_rms
            row_scales.append(rms.expand(m).clone())
    h_rot = None
    feedback = None
    if hessian is not None:
        # h_in^T diag(su0) H diag(su0) h_in, without extra n x n copies.
        h = hessian.mul_(su0[:, None]).mul_(su0[None, :])
        h = h_in.T @ h
        del hessian
        h_rot = h @ h_in
        del h
        # Scaling by ones is exact: only rcp=1 needs the scaled copy.
        scaled = col_scale[:, None] * h_rot * col_scale[None, :] if rcp == 1 else h_rot
        feedback = safe_block_ldl(scaled, options.code.td_y, options.sigma_reg)
        feedback = feedback.float()
        del scaled
    target = torch.cat(
        [wr / r[:, None] / col_scale[None, :] for wr, r in zip(rotated, row_scales)]
    )
    return _GroupWork(
        layer=layer,
        paths=paths,
        job=LDLQJob(target.float(), feedback),
        rotated=rotated,
        hessian=h_rot,
        su=su0 * col_scale,
        sv=[sv0 * r for sv0, r in zip(sv0s, row_scales)],
        row_scale=row_scales,
        col_scale=col_scale,
        rcp=rcp,
        tp_rank=tp,
    )


def _proxy_error(
    wr: torch.Tensor,
    w_hat: torch.Tensor,
    row: torch.Tensor,
    col: torch.Tensor,
    h: torch.Tensor | None,
) -> float:
    """tr(dW Hr dW^T) / tr(Wr Hr Wr^T) in the rotated domain (MSE ratio if no H)."""
    diff = wr - row[:, None] * w_hat.double() * col[None, :]
    if h is None:
        return float(diff.pow(2).sum() / wr.pow(2).sum())
    return float(((diff @ h) * diff).sum() / ((wr @ h) * wr).sum())


def _finish_group(
    work: _GroupWork,
    states: torch.Tensor,
    w_hat: torch.Tensor,
    tlut: torch.Tensor,
) -> dict[str, QuantizedLinear]:
    """Split a group's stacked result into its projections."""
    sizes = [wr.shape[0] for wr in work.rotated]
    out = {}
    for i, (path, s, w) in enumerate(
        zip(work.paths, states.split(sizes), w_hat.split(sizes))
    ):
        out[path] = QuantizedLinear(
            states=s.cpu(),
            SU=work.su.float().cpu(),
            SV=work.sv[i].float().cpu(),
            tlut=tlut.clone(),
            rcp=work.rcp,
            tp_rank=work.tp_rank,
            proxy=_proxy_error(
                work.rotated[i],
                w,
                work.row_scale[i],
                work.col_scale,
                work.hessian,
            ),
        )
    return out


class WorkDir:
    """Resumable state of one quantization run."""

    def __init__(self, path: Path, hessian_dir: Path | None) -> None:
        self.path = path
        self.hessian_dir = hessian_dir or path / "hessians"

    def create(self) -> None:
        (self.path / "layers").mkdir(parents=True, exist_ok=True)
        self.hessian_dir.mkdir(parents=True, exist_ok=True)

    def check_options(self, fingerprint: dict[str, Any], resume: bool) -> None:
        """Refuse a work dir of another run; without resume, any earlier run."""
        file = self.path / "options.json"
        if file.exists():
            saved = json.loads(file.read_text())
            if saved != fingerprint:
                changed = sorted(
                    k
                    for k in fingerprint.keys() | saved.keys()
                    if saved.get(k) != fingerprint.get(k)
                )
                raise ValueError(
                    f"work dir {self.path} holds a run with other options "
                    f"(differs in {changed}); use another --work-dir or delete it"
                )
            if not resume:
                done = len(list((self.path / "layers").glob("layer_*.pt")))
                raise ValueError(
                    f"work dir {self.path} holds an earlier run of this command "
                    f"({done} layer(s) done): pass --resume to continue it, or "
                    "delete it to start again"
                )

    def save_options(self, fingerprint: dict[str, Any]) -> None:
        file = self.path / "options.json"
        if not file.exists():
            file.write_text(json.dumps(fingerprint, indent=2))

    def hessian_file(self, layer: int) -> Path:
        return self.hessian_dir / f"layer_{layer:03d}.pt"

    def layer_file(self, layer: int) -> Path:
        return self.path / "layers" / f"layer_{layer:03d}.pt"

    def save_layer(self, layer: int, data: dict[str, Any]) -> None:
        _save(data, self.layer_file(layer))

    @property
    def e2e_file(self) -> Path:
        return self.path / "e2e.pt"

    @property
    def e2e_state_file(self) -> Path:
        """End-to-end fine-tuning's state after its last finished epoch."""
        return self.path / "e2e_state.pt"

    def load_e2e(self, fingerprint: dict[str, Any]) -> dict[str, Any] | None:
        """The saved end-to-end result if it was made with these options."""
        if not self.e2e_file.exists():
            return None
        data = torch.load(self.e2e_file)
        return data if data["options"] == fingerprint else None


def _save(data: Any, file: Path) -> None:
    tmp = file.with_suffix(".tmp")
    torch.save(data, tmp)
    tmp.replace(file)


def _load_quantized(
    work: WorkDir, num_layers: int, params: QTIPCodeParams
) -> dict[int, dict[str, QuantizedLinear]]:
    """Every layer's saved projections, trellis states unpacked."""
    out: dict[int, dict[str, QuantizedLinear]] = {}
    for i in range(num_layers):
        data = torch.load(work.layer_file(i))
        out[i] = {}
        for path, t in data["linears"].items():
            m, n = t["SV"].numel(), t["SU"].numel()
            states = qtip_utils.unpack_trellis(t["trellis"], m, n, params).long()
            out[i][path] = QuantizedLinear(
                states=states,
                SU=t["SU"].float(),
                SV=t["SV"].float(),
                tlut=None if t["tlut"] is None else t["tlut"].float(),
                rcp=t["rcp"],
                tp_rank=t["tp_rank"],
                proxy=data["stats"]["proxy"][path],
            )
    return out


def options_fingerprint(
    options: QuantizeOptions,
    model_dir: Path,
    sequences_shape: list[int],
    calibration_id: str,
) -> dict[str, dict[str, Any]]:
    """What a run's result depends on: {"layers": ..., "e2e": ... or None}.

    "layers" is checked against the work dir's options.json; "e2e" is kept
    with the end-to-end result (a change redoes only that stage).
    """
    layers = dataclasses.asdict(options)
    e2e = layers.pop("e2e")
    layers.pop("e2e_finetune")
    layers |= {
        "model": str(model_dir.resolve()),
        "calibration": calibration_id,
        "calibration_shape": list(sequences_shape),
    }
    if not options.e2e_finetune:
        return {"layers": layers, "e2e": None}
    return {"layers": layers, "e2e": e2e | {"calibration": calibration_id}}


def _layer_tensors(quantized: dict[str, QuantizedLinear], params: QTIPCodeParams):
    """Checkpoint tensors of a layer's projections (without the layer prefix)."""
    out = {}
    for path, q in quantized.items():
        m, n = q.shape
        out[path] = {
            "trellis": qtip_checkpoint.pack_trellis(q.states, m, n, params),
            "SU": q.SU,
            "SV": q.SV,
            "tlut": q.tlut,
            "rcp": q.rcp,
            "tp_rank": q.tp_rank,
        }
    return out


def gpu_available(run: RunOptions) -> int:
    """Bytes the run may use on its GPU (free memory, capped by gpu_mem_gb)."""
    device = torch.device(run.device)
    free, _ = torch.cuda.mem_get_info(device)
    if run.gpu_mem_gb is not None:
        free = min(free, int(run.gpu_mem_gb * GiB))
    return free


def _viterbi_memory(run: RunOptions) -> int:
    if run.viterbi_mem_gb is not None:
        return int(run.viterbi_mem_gb * GiB)
    if torch.device(run.device).type == "cuda":
        return int(gpu_available(run) * 0.4)
    return 2 * GiB


@dataclass
class _Plan:
    """What the checks decided before any work."""

    layers_per_step: int
    viterbi: str
    model_dtype: torch.dtype
    memory: Any


def _plan_run(
    config: Any,
    options: QuantizeOptions,
    run: RunOptions,
    sequences: torch.Tensor,
    work: WorkDir,
    out_dir: Path,
    calibration_id: str,
    pending: list[int],
) -> _Plan:
    """Check disk and GPU memory (ValueError naming what is short) and pick
    the layers per step and the Viterbi backend."""
    device = torch.device(run.device)
    # fp16 matmuls are slow or missing on CPUs.
    dtype = torch.float32 if device.type == "cpu" else config.dtype
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        dtype = torch.float16
    backend = run.viterbi or default_backend(device)
    if backend not in BACKENDS:
        raise ValueError(f"--viterbi {backend!r}: choose one of {BACKENDS}")
    if backend == "triton" and device.type != "cuda":
        raise ValueError("--viterbi triton needs a CUDA device")
    memory = layer_memory(
        config,
        K=options.K,
        finetune=options.finetune,
        batch_size=run.batch_size,
        seqlen=sequences.shape[1],
        model_bytes=torch.finfo(dtype).bits // 8,
    )
    k = run.layers_per_step
    if device.type == "cuda":
        available = gpu_available(run)
        what = (
            f"{config.num_hidden_layers} layers of hidden {config.hidden_size}, "
            f"intermediate {config.intermediate_size}"
        )
        check_gpu_memory(memory, available, what, layers_per_step=k or 1)
        if options.e2e_finetune:
            need = e2e_memory(config, seqlen=sequences.shape[1])
            if need > available:
                raise ValueError(
                    f"end-to-end fine-tuning keeps the original model and an fp32 "
                    f"student on the GPU: about {need / GiB:.1f} GiB for this "
                    f"model, but the GPU has {available / GiB:.1f} GiB available; "
                    "drop --e2e-finetune (per-layer --finetune works at any size)"
                )
        if k is None:
            k = auto_layers_per_step(config, memory, available)
    elif k is None:
        k = config.num_hidden_layers
    missing_h = [
        i
        for i in pending
        if options.hessian and not hessians_ok(work.hessian_file(i), calibration_id)
    ]
    layer_bytes = layer_file_bytes(config, options.K)
    e2e_bytes = config.num_hidden_layers * layer_bytes if options.e2e_finetune else 0
    # Without keep_hessians only the current chunk's are on disk at once.
    hessian_layers = len(missing_h) if run.keep_hessians else min(k, len(missing_h))
    check_disk(
        [
            (work.hessian_dir, hessian_layers * hessian_file_bytes(config), "Hessians"),
            (work.path, len(pending) * layer_bytes + e2e_bytes, "layer files"),
            (out_dir, checkpoint_bytes(config, options.K), "the checkpoint"),
        ]
    )
    return _Plan(k, backend, dtype, memory)


def _chunks(pending: list[int], size: int) -> list[list[int]]:
    """Runs of consecutive pending layers, cut to at most size layers."""
    chunks: list[list[int]] = []
    for i in pending:
        if chunks and chunks[-1][-1] == i - 1 and len(chunks[-1]) < size:
            chunks[-1].append(i)
        else:
            chunks.append([i])
    return chunks


def quantize_model(
    model_dir: str | Path,
    out_dir: str | Path,
    sequences: torch.Tensor,
    options: QuantizeOptions,
    run: RunOptions,
    *,
    work_dir: str | Path | None = None,
    hessian_dir: str | Path | None = None,
    calibration_id: str = "",
) -> dict[str, Any]:
    """Quantize model_dir into out_dir; returns the run's statistics.

    sequences: calibration token ids (N, seqlen). ``calibration_id`` names
    the calibration data in the Hessian files, so Hessians shared through
    ``hessian_dir`` are never mixed across data sets. Every check (model
    family, shapes, tensors, disk, GPU memory) runs before any work.
    """
    t_start = time.time()
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    config = load_config(model_dir)
    check_model(config, options.tp_split)
    source = SourceModel(model_dir)
    source.check(config)
    params = options.code
    params.validate()
    if not params.uses_kernel_layout:
        raise ValueError(f"only the HYB kernel code is supported here, got {params}")
    device = torch.device(run.device)
    work = WorkDir(
        Path(work_dir) if work_dir else out_dir.with_name(out_dir.name + ".work"),
        Path(hessian_dir) if hessian_dir else None,
    )
    fingerprints = options_fingerprint(
        options, model_dir, list(sequences.shape), calibration_id
    )
    work.check_options(fingerprints["layers"], run.resume)
    num_layers = config.num_hidden_layers
    pending = [i for i in range(num_layers) if not work.layer_file(i).exists()]
    plan = _plan_run(
        config, options, run, sequences, work, out_dir, calibration_id, pending
    )
    work.create()
    work.save_options(fingerprints["layers"])
    stats: dict[str, Any] = {
        "options": fingerprints["layers"],
        "e2e_options": fingerprints["e2e"],
        "run": {
            "layers_per_step": plan.layers_per_step,
            "viterbi": plan.viterbi,
            "device": str(device),
            "estimated_layer_gpu_gib": plan.memory.peak(plan.layers_per_step) / GiB,
        },
        "layers": {},
    }
    if pending:
        # End-to-end results are only valid for the layers they started from.
        work.e2e_file.unlink(missing_ok=True)
        work.e2e_state_file.unlink(missing_ok=True)

    # 1. The initial lookup table (k-means), once per work dir.
    tlut_file = work.path / "tlut.pt"
    if tlut_file.exists():
        tlut = torch.load(tlut_file)
    else:
        print("stage 1/4: k-means lookup table", flush=True)
        t0 = time.time()
        tlut = initial_tlut(
            params,
            samples=options.tlut_samples,
            iters=options.tlut_iters,
            seed=options.seed,
            device=device,
        )
        _save(tlut, tlut_file)
        stats["tlut_s"] = time.time() - t0
    # The checkpoint stores the table in fp16: quantize against that.
    tlut = tlut.half().float()

    # 2. Layers, one chunk of consecutive layers at a time.
    if pending:
        print(
            f"stage 2/4: {len(pending)} of {num_layers} layers "
            f"({plan.layers_per_step} per step, Viterbi: {plan.viterbi})",
            flush=True,
        )
        stats["run"]["viterbi"] = _quantize_layers(
            source,
            config,
            sequences,
            options,
            run,
            plan,
            work,
            params,
            tlut,
            pending,
            calibration_id,
        )

    # 3. End-to-end fine-tuning of all layers together, once.
    e2e = None
    if fingerprints["e2e"] is not None:
        e2e = work.load_e2e(fingerprints["e2e"])
        if e2e is None:
            print("stage 3/4: end-to-end fine-tuning", flush=True)
            result = _run_e2e(model_dir, work, params, sequences, options, plan, device)
            e2e = {
                "options": fingerprints["e2e"],
                "linears": {
                    i: _layer_tensors(layer, params)
                    for i, layer in result.linears.items()
                },
                "norms": result.norms,
                "stats": result.stats,
            }
            _save(e2e, work.e2e_file)
            work.e2e_state_file.unlink(missing_ok=True)
        stats["e2e"] = e2e["stats"]

    # 4. The checkpoint.
    print(f"stage 4/4: writing {out_dir}", flush=True)
    t0 = time.time()
    write_qtip_checkpoint(source, model_dir, out_dir, work, params, options, run, e2e)
    stats["write_s"] = time.time() - t0
    stats["total_s"] = time.time() - t_start
    stats["layers"] = {
        i: torch.load(work.layer_file(i))["stats"] for i in range(num_layers)
    }
    (out_dir / "quantize_stats.json").write_text(json.dumps(stats, indent=2))
    return stats


def _quantize_layers(
    source: SourceModel,
    config: Any,
    sequences: torch.Tensor,
    options: QuantizeOptions,
    run: RunOptions,
    plan: _Plan,
    work: WorkDir,
    params: QTIPCodeParams,
    tlut: torch.Tensor,
    pending: list[int],
    calibration_id: str,
) -> str:
    """Quantize the pending layers in order, saving each when it is done.

    Returns the Viterbi backend used (after checked_backend)."""
    device = torch.device(run.device)
    num_layers = config.num_hidden_layers
    table = qtip_utils.decode_table(params, tlut.to(device), device=device)
    backend = checked_backend(table, params.L, params.K * params.V, plan.viterbi)
    hadamards = _Hadamards(device)
    mem_bytes = _viterbi_memory(run)
    stream = CalibrationStream(
        source,
        config,
        sequences,
        batch_size=run.batch_size,
        device=device,
        dtype=plan.model_dtype,
    )
    bar = tqdm(
        total=num_layers, initial=num_layers - len(pending), desc="layers", unit="layer"
    )

    def load_layer(i: int) -> torch.nn.Module:
        state = source.tensors(source.layer_names(i))
        prefix = f"model.layers.{i}."
        state = {k.removeprefix(prefix): v for k, v in state.items()}
        return decoder_layer(config, i, state, device, plan.model_dtype)

    for chunk in _chunks(pending, plan.layers_per_step):
        # Activations entering the chunk: run the layers finished earlier.
        while stream.index < chunk[0]:
            i = stream.index
            bar.set_postfix_str(f"layer {i}: forward (done earlier)")
            stream.advance(load_layer(i), hessians=False, desc=f"layer {i} forward")
        layers, inputs, layer_stats = {}, {}, {}
        for i in chunk:
            t0 = time.time()
            layers[i] = load_layer(i)
            need_h = options.hessian and not hessians_ok(
                work.hessian_file(i), calibration_id
            )
            bar.set_postfix_str(f"layer {i}: calibration")
            result = stream.advance(
                layers[i],
                hessians=need_h,
                keep_sequences=options.ft_seqs if options.finetune else 0,
                desc=f"layer {i} calibration",
            )
            if need_h:
                assert result.hessians is not None
                save_hessians(
                    work.hessian_file(i), result.hessians, result.tokens, calibration_id
                )
            inputs[i] = result.inputs
            layer_stats[i] = {"calibration_s": time.time() - t0}
            del result

        t0 = time.time()
        bar.set_postfix_str(f"layers {chunk[0]}-{chunk[-1]}: BlockLDLQ")
        quantized = _quantize_chunk(
            {i: layers[i] for i in chunk},
            options,
            work,
            params,
            tlut,
            table,
            hadamards,
            mem_bytes,
            backend,
        )
        t_quant = (time.time() - t0) / len(chunk)

        for i in chunk:
            t1 = time.time()
            stats = layer_stats[i] | {
                "quantize_s": t_quant,
                "proxy": {p: q.proxy for p, q in quantized[i].items()},
            }
            if options.finetune:
                bar.set_postfix_str(f"layer {i}: fine-tuning")
                quantized[i], ft_stats = finetune_layer(
                    layers[i],
                    quantized[i],
                    params,
                    inputs.pop(i),
                    stream.layer_kwargs,
                    options.ft,
                    desc=f"finetune layer {i}",
                )
                stats.update(ft_stats, finetune_s=time.time() - t1)
            linears = _layer_tensors(quantized[i], params)
            # Everything this layer took: reading and calibrating it, its share
            # of the chunk's BlockLDLQ, fine-tuning and packing.
            stats["layer_s"] = stats["calibration_s"] + t_quant + time.time() - t1
            work.save_layer(i, {"linears": linears, "stats": stats})
            if not run.keep_hessians:
                work.hessian_file(i).unlink(missing_ok=True)
            del layers[i], quantized[i]
            bar.update(1)
            proxy = sum(stats["proxy"].values()) / len(stats["proxy"])
            ft = f", fine-tuning {stats['finetune_s']:.1f}" if options.finetune else ""
            bar.write(
                f"layer {i + 1}/{num_layers}: {stats['layer_s']:.1f} s "
                f"(calibration {stats['calibration_s']:.1f}, BlockLDLQ "
                f"{t_quant:.1f}{ft}), mean proxy error {proxy:.4f}"
            )
        if device.type == "cuda":
            torch.cuda.empty_cache()
    bar.close()
    return backend


def _quantize_chunk(
    layers: dict[int, torch.nn.Module],
    options: QuantizeOptions,
    work: WorkDir,
    params: QTIPCodeParams,
    tlut: torch.Tensor,
    table: torch.Tensor,
    hadamards: _Hadamards,
    mem_bytes: int,
    backend: str,
) -> dict[int, dict[str, QuantizedLinear]]:
    """BlockLDLQ of the projections of a chunk of layers: groups with the
    same in_features share the Viterbi calls of each column block."""
    lut_rms = float(table.pow(2).mean().sqrt())
    by_n: dict[int, list[_GroupWork]] = defaultdict(list)
    for i, layer in layers.items():
        hessians = (
            load_hessians(work.hessian_file(i), table.device) if options.hessian else {}
        )
        for g, (group, paths) in enumerate(LLAMA_GROUPS.items()):
            weights = [layer.get_submodule(p).weight for p in paths]
            gw = _prepare_group(
                i,
                g,
                paths,
                weights,
                hessians.pop(group, None),
                options,
                lut_rms,
                hadamards,
                GROUP_RCP[group] if options.tp_split else 0,
            )
            by_n[weights[0].shape[1]].append(gw)
    first, last = min(layers), max(layers)
    quantized: dict[int, dict[str, QuantizedLinear]] = defaultdict(dict)
    for n, works in by_n.items():
        results = block_ldlq(
            [w.job for w in works],
            table,
            params,
            mem_bytes=mem_bytes,
            backend=backend,
            desc=f"LDLQ layers {first}-{last} n={n}",
        )
        for w, (states, w_hat) in zip(works, results):
            quantized[w.layer].update(_finish_group(w, states, w_hat, tlut))
    return quantized


def _run_e2e(
    model_dir: Path,
    work: WorkDir,
    params: QTIPCodeParams,
    sequences: torch.Tensor,
    options: QuantizeOptions,
    plan: _Plan,
    device: torch.device,
) -> E2EResult:
    """End-to-end fine-tuning needs the whole original model (the teacher)."""
    from transformers import AutoModelForCausalLM

    config = json.loads((model_dir / "config.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=plan.model_dtype)
    model.to(device).eval()
    result = finetune_e2e(
        model,
        _load_quantized(work, config["num_hidden_layers"], params),
        params,
        sequences,
        options.e2e,
        _store_dtype(config),
        state_file=work.e2e_state_file,
    )
    del result.student  # only the tensors are kept
    return result


def _store_dtype(config: dict[str, Any]) -> torch.dtype:
    """Dtype of SU and the unquantized tensors: the model's (fp16 if unnamed)."""
    return getattr(torch, config.get("dtype") or config.get("torch_dtype") or "float16")


def write_qtip_checkpoint(
    source: SourceModel,
    model_dir: Path,
    out_dir: Path,
    work: WorkDir,
    params: QTIPCodeParams,
    options: QuantizeOptions,
    run: RunOptions,
    e2e: dict[str, Any] | None = None,
) -> None:
    """Write the saved layers and the unquantized tensors shard by shard;
    copy the tokenizer.

    With an end-to-end result, its projections and norms replace the
    per-layer ones.
    """
    config = json.loads((model_dir / "config.json").read_text())
    dtype = _store_dtype(config)
    tied = config.get("tie_word_embeddings", False)
    num_layers = config["num_hidden_layers"]
    norms = e2e["norms"] if e2e is not None else {}
    writer = ShardWriter(out_dir, int(run.max_shard_gb * GiB))

    def copy(names: list[str]) -> None:
        for name, tensor in source.tensors(names).items():
            writer.add(name, norms.get(name, tensor).to(dtype))

    quantized_weights = set()
    for i in tqdm(range(num_layers), desc="writing", unit="layer", leave=False):
        if e2e is not None:
            linears = e2e["linears"][i]
        else:
            linears = torch.load(work.layer_file(i))["linears"]
        for path, t in linears.items():
            prefix = f"model.layers.{i}.{path}"
            quantized_weights.add(f"{prefix}.weight")
            for name, tensor in qtip_checkpoint.linear_tensors(
                prefix,
                t["trellis"],
                t["SU"].to(dtype),
                t["SV"].float(),
                t["tlut"].half(),
                rcp=t["rcp"],
                tp_rank=t["tp_rank"],
            ).items():
                writer.add(name, tensor)
        copy(
            [
                n
                for n in source.layer_names(i)
                if n not in quantized_weights and "rotary_emb" not in n
            ]
        )
    rest = [n for n in source.names() if not n.startswith("model.layers.")]
    copy([n for n in rest if not (tied and n == "lm_head.weight")])
    writer.close()
    qtip_checkpoint.write_config(
        out_dir,
        config,
        qtip_checkpoint.quip_params(params, split_for_tp=options.tp_split > 0),
        run.layout,  # type: ignore[arg-type]
    )
    for name in TOKENIZER_FILES:
        if (model_dir / name).exists():
            shutil.copy2(model_dir / name, out_dir / name)


def bits_per_weight(config: Any, params: QTIPCodeParams) -> float:
    """K plus the per-linear SU, SV and tlut overhead, over the linears."""
    shapes = qtip_checkpoint.llama_projection_shapes(config).values()
    weights = sum(m * n for m, n in shapes)
    table = 16 * (1 << params.tlut_bits) * params.V
    extra = sum(16 * n + 32 * m + table for m, n in shapes)
    return params.K + extra / weights
