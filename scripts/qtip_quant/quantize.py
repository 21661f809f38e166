# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""Quantize a Llama-family HF model into a QTIP checkpoint.

Pipeline (qtip_format.md §4): Hessians on calibration text -> per group of
projections sharing an input: random signs + Hadamards + Wscale ->
BlockLDLQ with the tail-biting Viterbi -> optional per-layer fine-tuning ->
optional end-to-end fine-tuning -> the relaxml checkpoint layout through the
project's writer.

Work files (``--work-dir``) make the run resumable: Hessians are stored per
layer, each finished layer's tensors are saved before the next chunk
starts, and the end-to-end result once it is done, so a restarted run skips
what is done.
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
from .finetune import (
    FinetuneOptions,
    QuantizedLinear,
    finetune_layer,
    hadamard_blocks,
)
from .hessian import LLAMA_GROUPS, calibrate
from .ldlq import (
    LDLQJob,
    block_ldlq,
    check_hadamard_dim,
    hadamard_matrix,
    safe_block_ldl,
)

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
    layers_per_step: int = 8
    viterbi_mem_gb: float | None = None
    compile_viterbi: bool | None = None
    layout: str = "relaxml"


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
    """Dense Hadamard matrices, built once per (size, block, device)."""

    def __init__(
        self, device: torch.device | str, dtype: torch.dtype = torch.float64
    ) -> None:
        self.device = device
        self.dtype = dtype
        self.cache: dict[tuple[int, int | None], torch.Tensor] = {}

    def __call__(self, n: int, block: int | None) -> torch.Tensor:
        if (n, block) not in self.cache:
            h = hadamard_matrix(n, block, self.device).to(self.dtype)
            self.cache[(n, block)] = h
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
    """Random signs, Hadamards and Wscale of a group (§3.3)."""
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
        h = hessian.to(device)
        h_rot = h_in.T @ (su0[:, None] * h * su0[None, :]) @ h_in
        scaled = col_scale[:, None] * h_rot * col_scale[None, :]
        feedback = safe_block_ldl(scaled, options.code.td_y, options.sigma_reg)
    target = torch.cat(
        [wr / r[:, None] / col_scale[None, :] for wr, r in zip(rotated, row_scales)]
    )
    return _GroupWork(
        layer=layer,
        paths=paths,
        job=LDLQJob(target.float(), None if feedback is None else feedback.float()),
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
        (path / "layers").mkdir(parents=True, exist_ok=True)
        self.hessian_dir.mkdir(parents=True, exist_ok=True)

    def check_options(self, fingerprint: dict[str, Any]) -> None:
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
        else:
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


def _viterbi_memory(run: RunOptions) -> int:
    if run.viterbi_mem_gb is not None:
        return int(run.viterbi_mem_gb * 2**30)
    if torch.device(run.device).type == "cuda":
        free, _ = torch.cuda.mem_get_info(torch.device(run.device))
        return int(free * 0.4)
    return 2 * 2**30


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
    ``hessian_dir`` are never mixed across data sets.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    config = AutoConfig.from_pretrained(model_dir)
    check_model(config, options.tp_split)
    params = options.code
    params.validate()
    if not params.uses_kernel_layout:
        raise ValueError(f"only the HYB kernel code is supported here, got {params}")
    device = torch.device(run.device)
    compile_viterbi = (
        device.type == "cuda" if run.compile_viterbi is None else run.compile_viterbi
    )
    work = WorkDir(
        Path(work_dir) if work_dir else out_dir.with_name(out_dir.name + ".work"),
        Path(hessian_dir) if hessian_dir else None,
    )
    fingerprints = options_fingerprint(
        options, model_dir, list(sequences.shape), calibration_id
    )
    work.check_options(fingerprints["layers"])
    stats: dict[str, Any] = {
        "options": fingerprints["layers"],
        "e2e_options": fingerprints["e2e"],
        "layers": {},
    }
    t_start = time.time()

    # fp16 matmuls are slow or missing on CPUs.
    dtype = torch.float32 if device.type == "cpu" else config.dtype
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    model.to(device).eval()
    num_layers = config.num_hidden_layers
    pending = [i for i in range(num_layers) if not work.layer_file(i).exists()]
    if pending:
        # End-to-end results are only valid for the layers they started from.
        work.e2e_file.unlink(missing_ok=True)

    # 1. Calibration: Hessians that are missing, and fine-tuning inputs.
    calibration = None
    need_h = [
        i
        for i in pending
        if options.hessian and not _hessian_ok(work.hessian_file(i), calibration_id)
    ]
    if need_h or (options.finetune and pending):
        t0 = time.time()
        calibration = calibrate(
            model,
            sequences,
            batch_size=run.batch_size,
            hessian_layers=set(need_h),
            input_layers=set(pending) if options.finetune else set(),
            input_sequences=options.ft_seqs,
        )
        for i in need_h:
            data = {g: calibration.hessians[(i, g)].cpu() for g in LLAMA_GROUPS}
            torch.save(
                {"hessians": data, "tokens": calibration.tokens, "id": calibration_id},
                work.hessian_file(i),
            )
        stats["calibration_s"] = time.time() - t0

    # 2. The initial lookup table (k-means), once per work dir.
    tlut_file = work.path / "tlut.pt"
    if tlut_file.exists():
        tlut = torch.load(tlut_file)
    else:
        t0 = time.time()
        tlut = initial_tlut(
            params,
            samples=options.tlut_samples,
            iters=options.tlut_iters,
            seed=options.seed,
            device=device,
        )
        torch.save(tlut, tlut_file)
        stats["tlut_s"] = time.time() - t0
    # The checkpoint stores the table in fp16: quantize against that.
    tlut = tlut.half().float()
    table = qtip_utils.decode_table(params, tlut, device=device)
    lut_rms = float(table.pow(2).mean().sqrt())
    hadamards = _Hadamards(device)
    mem_bytes = _viterbi_memory(run)

    # 3. Layers, a chunk at a time.
    layers = model.model.layers
    for c in tqdm(range(0, len(pending), run.layers_per_step), desc="layer chunks"):
        chunk = pending[c : c + run.layers_per_step]
        t0 = time.time()
        by_n: dict[int, list[_GroupWork]] = defaultdict(list)
        for i in chunk:
            hessians = (
                torch.load(work.hessian_file(i))["hessians"] if options.hessian else {}
            )
            for g, (group, paths) in enumerate(LLAMA_GROUPS.items()):
                weights = [layers[i].get_submodule(p).weight.detach() for p in paths]
                gw = _prepare_group(
                    i,
                    g,
                    paths,
                    weights,
                    hessians.get(group),
                    options,
                    lut_rms,
                    hadamards,
                    GROUP_RCP[group] if options.tp_split else 0,
                )
                by_n[weights[0].shape[1]].append(gw)
        quantized: dict[int, dict[str, QuantizedLinear]] = defaultdict(dict)
        for n, works in by_n.items():
            results = block_ldlq(
                [w.job for w in works],
                table,
                params,
                mem_bytes=mem_bytes,
                compile_step=compile_viterbi,
                desc=f"LDLQ layers {chunk[0]}-{chunk[-1]} n={n}",
            )
            for w, (states, w_hat) in zip(works, results):
                quantized[w.layer].update(_finish_group(w, states, w_hat, tlut))
        t_quant = (time.time() - t0) / len(chunk)
        for i in chunk:
            layer_stats: dict[str, Any] = {
                "quantize_s": t_quant,
                "proxy": {p: q.proxy for p, q in quantized[i].items()},
            }
            if options.finetune:
                assert calibration is not None
                t1 = time.time()
                had = {}
                for path, q in quantized[i].items():
                    in_block, out_block = hadamard_blocks(q)
                    m, n = q.shape
                    had[path] = (hadamards(n, in_block), hadamards(m, out_block))
                quantized[i], ft_stats = finetune_layer(
                    layers[i],
                    quantized[i],
                    params,
                    had,
                    calibration.inputs[i],
                    calibration.layer_kwargs,
                    options.ft,
                    desc=f"finetune layer {i}",
                )
                layer_stats.update(ft_stats, finetune_s=time.time() - t1)
            linears = _layer_tensors(quantized[i], params)
            work.save_layer(i, {"linears": linears, "stats": layer_stats})
            stats["layers"][i] = layer_stats

    # 4. End-to-end fine-tuning of all layers together, once.
    calibration = None  # the per-layer inputs are no longer needed
    e2e = None
    if fingerprints["e2e"] is not None:
        e2e = work.load_e2e(fingerprints["e2e"])
        if e2e is None:
            result = _run_e2e(model, model_dir, work, params, sequences, options)
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
        stats["e2e"] = e2e["stats"]

    # 5. The checkpoint.
    write_qtip_checkpoint(model, model_dir, out_dir, work, params, options, run, e2e)
    stats["total_s"] = time.time() - t_start
    stats["layers"] = {
        i: torch.load(work.layer_file(i))["stats"] for i in range(num_layers)
    }
    (out_dir / "quantize_stats.json").write_text(json.dumps(stats, indent=2))
    return stats


def _run_e2e(
    model: torch.nn.Module,
    model_dir: Path,
    work: WorkDir,
    params: QTIPCodeParams,
    sequences: torch.Tensor,
    options: QuantizeOptions,
) -> E2EResult:
    config = json.loads((model_dir / "config.json").read_text())
    device = next(model.parameters()).device
    result = finetune_e2e(
        model,
        _load_quantized(work, config["num_hidden_layers"], params),
        params,
        _Hadamards(device, torch.float32),
        sequences,
        options.e2e,
        _store_dtype(config),
    )
    del result.student  # only the tensors are kept
    return result


def _store_dtype(config: dict[str, Any]) -> torch.dtype:
    """Dtype of SU and the unquantized tensors: the model's (fp16 if unnamed)."""
    return getattr(torch, config.get("dtype") or config.get("torch_dtype") or "float16")


def _hessian_ok(file: Path, calibration_id: str) -> bool:
    if not file.exists():
        return False
    return torch.load(file)["id"] == calibration_id


def write_qtip_checkpoint(
    model: torch.nn.Module,
    model_dir: Path,
    out_dir: Path,
    work: WorkDir,
    params: QTIPCodeParams,
    options: QuantizeOptions,
    run: RunOptions,
    e2e: dict[str, Any] | None = None,
) -> None:
    """Assemble the saved layers and the unquantized tensors; copy the tokenizer.

    With an end-to-end result, its projections and norms replace the
    per-layer ones.
    """
    config = json.loads((model_dir / "config.json").read_text())
    dtype = _store_dtype(config)
    tied = config.get("tie_word_embeddings", False)
    tensors: dict[str, torch.Tensor] = {}
    quantized_prefixes = set()
    for i in range(config["num_hidden_layers"]):
        if e2e is not None:
            linears = e2e["linears"][i]
        else:
            linears = torch.load(work.layer_file(i))["linears"]
        for path, t in linears.items():
            prefix = f"model.layers.{i}.{path}"
            quantized_prefixes.add(prefix)
            tensors.update(
                qtip_checkpoint.linear_tensors(
                    prefix,
                    t["trellis"],
                    t["SU"].to(dtype),
                    t["SV"].float(),
                    t["tlut"].half(),
                    rcp=t["rcp"],
                    tp_rank=t["tp_rank"],
                )
            )
    for name, tensor in model.state_dict().items():
        if name.removesuffix(".weight") in quantized_prefixes:
            continue
        if tied and name == "lm_head.weight":
            continue
        if e2e is not None and name in e2e["norms"]:
            tensor = e2e["norms"][name]
        tensors[name] = tensor.to(dtype)
    qtip_checkpoint.write_checkpoint(
        out_dir,
        config,
        tensors,
        qtip_checkpoint.quip_params(params, split_for_tp=options.tp_split > 0),
        layout=run.layout,  # type: ignore[arg-type]
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
