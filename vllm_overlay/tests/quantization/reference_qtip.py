# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""Test-side QTIP helpers: the encoder, checkpoints and an HF reference model.

vLLM only decodes QTIP weights (qtip_utils); the tests also need the other
direction and a model to compare with:

* :func:`pack_trellis` packs trellis states into a checkpoint's int16 words
  (the inverse of ``unpack_trellis``) and :func:`dequantize_weight` gives the
  dense weight a QTIP layer computes with.
* :func:`write_checkpoint` writes a model directory in one of the three
  ways QTIP is declared: the layout of the published relaxml checkpoints
  (``config.json`` with a top-level ``quip_params`` dict), with
  ``quantization_config: {"quant_method": "qtip", ...}``, or with a
  hand-written ``quantize_config.json`` beside a plain ``config.json``.
  Each quantized projection ``<prefix>`` is stored as
  ``<prefix>.trellis`` (2-D ``(m*n/256, 16K)`` or flat int16), ``<prefix>.SU``,
  ``<prefix>.SV``, ``<prefix>.tlut`` and optionally ``<prefix>.rcp`` /
  ``<prefix>.tp_rank`` (a missing rcp is the one ``split_for_tp`` implies);
  skip-listed projections as a plain ``<prefix>.weight``.
* :func:`random_llama_checkpoint` makes a random but valid tiny Llama QTIP
  checkpoint (random trellis bits, Gaussian-like lookup table, scales chosen
  so that every linear roughly preserves the RMS of its input).
* :func:`build_reference_model` loads such a directory into a
  HF-transformers ``LlamaForCausalLM`` whose quantized linears run the
  reference forward ``qtip_linear_forward``; it is the ground truth for the
  model tests.

The qtip-vllm quantizer (scripts/qtip_quant) writes its checkpoints with the
same functions.
"""

import dataclasses
import json
import math
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from vllm.model_executor.layers.quantization.utils.qtip_utils import (
    TLUT_DECODE_MODES,
    QTIPCodeParams,
    _block_sizes,
    _check_dims,
    _layer_dims,
    decode_weight,
    hadamard_transform,
    qtip_linear_forward,
    trellis_shape,
)

# ---------------------------------------------------------------------------
# Encoder and dense weights
# ---------------------------------------------------------------------------


def _trellis_from_tile_streams(
    streams: torch.Tensor, m: int, n: int, params: QTIPCodeParams
) -> torch.Tensor:
    """Inverse of qtip_utils._tile_streams_from_trellis: int16 (tiles, words/tile)."""
    if params.uses_kernel_layout:
        k = params.K
        mem = streams.reshape(m // 32, 2, n // 32, 2, 32, k)
        mem = mem.permute(0, 2, 4, 3, 1, 5).flip(-1).reshape(-1, 2)
        words = mem[:, 0] | (mem[:, 1] << 8)
    else:
        pairs = streams.reshape(-1, 2)
        words = (pairs[:, 0] << 8) | pairs[:, 1]
    words = torch.where(words >= 0x8000, words - 0x10000, words)
    return words.to(torch.int16).reshape(trellis_shape(m, n, params))


def _natural_to_sequence(
    states: torch.Tensor, m: int, n: int, params: QTIPCodeParams
) -> torch.Tensor:
    """Inverse of qtip_utils._sequence_to_natural."""
    mt, nt = m // params.td_x, n // params.td_y
    if params.uses_kernel_layout:
        s = states.reshape(mt, 2, 8, nt, 2, 4)  # (.., a, g, .., d, q)
        return s.permute(0, 3, 2, 5, 4, 1).reshape(mt, nt, -1)
    s = states.reshape(mt, params.td_x, nt, params.td_y // params.V)
    return s.permute(0, 2, 1, 3).reshape(mt, nt, -1)


def _word_field_plan(
    params: QTIPCodeParams, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Which stream fields land in each 16-bit word of a tile, and where.

    Returns (field index, left shift (negative: right shift), valid), each
    (words per tile, fields per word) int32.
    """
    L, kv = params.L, params.K * params.V
    num_states = params.tile_size // params.V
    num_words = params.tile_size * params.K // 16
    starts = [0] + [L + (t - 1) * kv for t in range(1, num_states)]
    lengths = [L] + [kv] * (num_states - 1)
    plan = []
    for w in range(num_words):
        lo, hi = 16 * w, 16 * w + 16
        plan.append(
            [
                # The field's last bit sits at word bit hi - start - length.
                (t, hi - start - length)
                for t, (start, length) in enumerate(zip(starts, lengths))
                if start < hi and start + length > lo
            ]
        )
    width = max(len(row) for row in plan)
    idx = [[t for t, _ in row] + [0] * (width - len(row)) for row in plan]
    shift = [[sh for _, sh in row] + [0] * (width - len(row)) for row in plan]
    valid = [[1] * len(row) + [0] * (width - len(row)) for row in plan]

    def tensor(a: list[list[int]]) -> torch.Tensor:
        return torch.tensor(a, dtype=torch.int32, device=device)

    return tensor(idx), tensor(shift), tensor(valid)


def pack_trellis(
    states: torch.Tensor, m: int, n: int, params: QTIPCodeParams
) -> torch.Tensor:
    """Pack states (m, n // V) into the int16 trellis (m*n/T, T*K/16).

    As in the reference, each tile's stream is the first state's L bits
    followed by the low K*V bits of every later state, cut to T*K bits; for
    tail-biting sequences this is the exact inverse of unpack_trellis.
    """
    params.validate()
    _check_dims(m, n, params)
    if tuple(states.shape) != (m, n // params.V):
        raise ValueError(
            f"states has shape {tuple(states.shape)}, expected "
            f"{(m, n // params.V)} (m, n // V)"
        )
    seq = _natural_to_sequence(states.to(torch.int32), m, n, params)
    L, kv = params.L, params.K * params.V
    # Stream fields: state 0 (L bits) at bit 0, then the low kv bits of
    # state t at bit L + (t-1)*kv; bits past T*K are dropped.
    fields = seq & ((1 << kv) - 1)
    fields[..., 0] = seq[..., 0] & ((1 << L) - 1)
    idx, shift, valid = _word_field_plan(params, states.device)
    vals = fields[..., idx]
    placed = torch.where(
        shift >= 0, vals << shift.clamp(min=0), vals >> (-shift).clamp(min=0)
    )
    # Fields cover disjoint bits, so the sum is their bitwise OR.
    words = ((placed & 0xFFFF) * valid).sum(-1, dtype=torch.int32)
    streams = torch.stack((words >> 8, words & 0xFF), dim=-1).flatten(-2)
    return _trellis_from_tile_streams(streams, m, n, params)


def dequantize_weight(
    trellis: torch.Tensor,
    SU: torch.Tensor,
    SV: torch.Tensor,
    tlut: torch.Tensor | None,
    params: QTIPCodeParams,
    *,
    rcp: int = 0,
    tp_rank: int = 8,
) -> torch.Tensor:
    """Dense W = diag(SV) @ Hm @ W_hat @ Hn^T @ diag(SU): float32 (m, n).

    ``y = x @ W.T`` then matches qtip_linear_forward up to its fp16 rounding.
    """
    m, n = _layer_dims(SU, SV)
    in_block, out_block = _block_sizes(int(rcp), int(tp_rank), m, n)
    w = decode_weight(trellis, tlut, m, n, params)
    # Rows of W_hat @ Hn^T are Hn applied to rows of W_hat.
    w = hadamard_transform(w, block_size=in_block)
    w = hadamard_transform(w.T, block_size=out_block).T
    return SV.float()[:, None] * w * SU.float()[None, :]


# ---------------------------------------------------------------------------
# Checkpoint files
# ---------------------------------------------------------------------------


CheckpointLayout = Literal["relaxml", "quantization_config", "quantize_config"]

# Llama projections: checkpoint module, skip_list key, TP split (rcp) used by
# split_for_tp checkpoints (2: output blocks, 1: input blocks).
LLAMA_PROJECTIONS = (
    ("self_attn.q_proj", "q", 2),
    ("self_attn.k_proj", "k", 2),
    ("self_attn.v_proj", "v", 2),
    ("self_attn.o_proj", "o", 1),
    ("mlp.gate_proj", "gate", 2),
    ("mlp.up_proj", "up", 2),
    ("mlp.down_proj", "down", 1),
)
# tp_rank of split_for_tp checkpoints: the number of Hadamard blocks.
SPLIT_TP_RANK = 8
# Standard deviation of QTIP's initial HYB lookup table, sqrt(15/16).
TLUT_STD = 0.9682458365518543


def llama_projection_shapes(config: Any) -> dict[str, tuple[int, int]]:
    """(out_features, in_features) of each projection of a Llama layer.

    ``config`` is an HF LlamaConfig or anything with its size attributes.
    """
    h, i = config.hidden_size, config.intermediate_size
    head_dim = getattr(config, "head_dim", None) or h // config.num_attention_heads
    q = config.num_attention_heads * head_dim
    kv = config.num_key_value_heads * head_dim
    return {
        "self_attn.q_proj": (q, h),
        "self_attn.k_proj": (kv, h),
        "self_attn.v_proj": (kv, h),
        "self_attn.o_proj": (h, q),
        "mlp.gate_proj": (i, h),
        "mlp.up_proj": (i, h),
        "mlp.down_proj": (h, i),
    }


def quip_params(
    params: QTIPCodeParams,
    *,
    split_for_tp: bool = False,
    skip_list: Sequence[str] | None = None,
    K_v_proj: int | None = None,
) -> dict[str, Any]:
    """The ``quip_params`` dict of a checkpoint, as the reference writes it."""
    out: dict[str, Any] = {
        "codebook": "bitshift",
        "codebook_version": 0,
        **dataclasses.asdict(params),
        "split_for_tp": split_for_tp,
        "skip_list": list(skip_list) if skip_list else None,
    }
    if K_v_proj is not None:
        out["K_v_proj"] = K_v_proj
    return out


def linear_tensors(
    prefix: str,
    trellis: torch.Tensor,
    SU: torch.Tensor,
    SV: torch.Tensor,
    tlut: torch.Tensor | None,
    *,
    rcp: int | None = None,
    tp_rank: int | None = None,
    flat_trellis: bool = False,
) -> dict[str, torch.Tensor]:
    """Checkpoint tensors of one quantized projection, named under prefix.

    ``rcp`` / ``tp_rank`` of None are left out, as in checkpoints made before
    the TP split existed.
    """
    out = {
        f"{prefix}.trellis": trellis.reshape(-1) if flat_trellis else trellis,
        f"{prefix}.SU": SU,
        f"{prefix}.SV": SV,
    }
    if tlut is not None:
        out[f"{prefix}.tlut"] = tlut
    if rcp is not None:
        out[f"{prefix}.rcp"] = torch.tensor(rcp, dtype=torch.int64)
    if tp_rank is not None:
        out[f"{prefix}.tp_rank"] = torch.tensor(tp_rank, dtype=torch.int64)
    return out


def write_config(
    path: str | Path,
    config: dict[str, Any],
    qtip_params: dict[str, Any],
    layout: CheckpointLayout = "relaxml",
) -> None:
    """config.json of a QTIP model directory, declaring QTIP as ``layout``
    says: ``quip_params``, ``quantization_config`` or a quantize_config.json
    beside it."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = {k: v for k, v in config.items() if k != "quantization_config"}
    config.pop("quip_params", None)
    if layout == "relaxml":
        config["quip_params"] = dict(qtip_params)
    elif layout == "quantization_config":
        config["quantization_config"] = {"quant_method": "qtip", **qtip_params}
    elif layout == "quantize_config":
        quant_config = {"quant_method": "qtip", **qtip_params}
        (path / "quantize_config.json").write_text(json.dumps(quant_config, indent=2))
    else:
        raise ValueError(f"unknown QTIP checkpoint layout {layout!r}")
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def write_checkpoint(
    path: str | Path,
    config: dict[str, Any],
    tensors: dict[str, torch.Tensor],
    qtip_params: dict[str, Any],
    *,
    layout: CheckpointLayout = "relaxml",
    max_shard_bytes: int | None = None,
) -> Path:
    """Write config.json and safetensors file(s) of a QTIP model directory.

    ``config`` is the HF model config (e.g. a LlamaConfig dict) and
    ``qtip_params`` the quip_params dict (see :func:`quip_params`; any other
    key, such as ``quantlut_path``, is written along). With
    ``max_shard_bytes`` the tensors are split over several files with a
    ``model.safetensors.index.json``, as ``save_pretrained`` does.
    """
    path = Path(path)
    write_config(path, config, qtip_params, layout)

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if (
            max_shard_bytes is not None
            and shards[-1]
            and size + nbytes > max_shard_bytes
        ):
            shards.append({})
            size = 0
        # safetensors wants contiguous tensors that share no storage.
        shards[-1][name] = tensor.detach().cpu().contiguous().clone()
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(path / "model.safetensors"), {"format": "pt"})
        return path
    weight_map = {}
    total = 0
    for i, shard in enumerate(shards):
        filename = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(path / filename), {"format": "pt"})
        weight_map.update(dict.fromkeys(shard, filename))
        total += sum(t.numel() * t.element_size() for t in shard.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return path


def iterate_checkpoint(path: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of every tensor of a model directory, file by file."""
    for file in sorted(Path(path).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118
                yield name, f.get_tensor(name)


def read_checkpoint(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """config.json and all tensors of a model directory."""
    config = json.loads((Path(path) / "config.json").read_text())
    return config, dict(iterate_checkpoint(path))


def checkpoint_qtip_params(
    config: dict[str, Any], path: str | Path | None = None
) -> dict[str, Any]:
    """The QTIP parameters of a config.json, or of model directory ``path``.

    Takes config.json's quantization_config, else its quip_params, else (with
    ``path``) the quantize_config.json or quant_config.json there.
    """
    from vllm.transformers_utils.config import QTIP_CONFIG_FILES

    if isinstance(config.get("quantization_config"), dict):
        return config["quantization_config"]
    if isinstance(config.get("quip_params"), dict):
        return {"quant_method": "qtip", **config["quip_params"]}
    for name in QTIP_CONFIG_FILES:
        file = None if path is None else Path(path) / name
        if file is not None and file.is_file():
            return json.loads(file.read_text())
    raise ValueError(
        "config.json has neither quantization_config nor quip_params, and no "
        f"{' or '.join(QTIP_CONFIG_FILES)} is beside it"
    )


def read_quantlut(path: str | Path, params: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The tables of a model directory's ``quantlut_path`` file (or none).

    A file of one tensor ``tlut`` is the table of every projection; others
    hold ``<projection>.tlut`` tensors. Codes without a table read nothing.
    """
    name = params.get("quantlut_path")
    if name is None or params["decode_mode"] not in TLUT_DECODE_MODES:
        return {}
    with safe_open(str(Path(path) / name), framework="pt") as f:
        return {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118


# ---------------------------------------------------------------------------
# Random but valid checkpoints
# ---------------------------------------------------------------------------


def random_tlut(params: QTIPCodeParams, generator: torch.Generator) -> torch.Tensor:
    """A lookup table like QTIP's initial one: fp16 (2**tlut_bits, V).

    Gaussian points rescaled to the reference's std sqrt(15/16).
    """
    table = torch.randn((1 << params.tlut_bits, params.V), generator=generator)
    table = table / table.std() * TLUT_STD
    return table.half()


def random_qtip_linear(
    m: int,
    n: int,
    params: QTIPCodeParams,
    *,
    generator: torch.Generator,
    dtype: torch.dtype = torch.float16,
    gain: float = 1.0,
) -> dict[str, torch.Tensor]:
    """Random trellis, SU, SV and tlut of an m x n projection.

    Any bit pattern is a valid tail-biting trellis. SU is +-1 with a little
    noise (what fine-tuning makes of the random signs) in ``dtype``; SV (fp32)
    makes the output RMS about ``gain`` times the input RMS, since W_hat has
    entries of std ~TLUT_STD and the Hadamard transforms are orthonormal.
    """
    trellis = torch.randint(
        -(1 << 15), 1 << 15, trellis_shape(m, n, params), generator=generator
    ).to(torch.int16)

    def signs(size: int) -> torch.Tensor:
        return torch.randint(0, 2, (size,), generator=generator).float() * 2 - 1

    noise_u = 1 + 0.05 * torch.randn(n, generator=generator)
    noise_v = 1 + 0.05 * torch.randn(m, generator=generator)
    SU = (signs(n) * noise_u).to(dtype)
    SV = signs(m) * noise_v * (gain / (TLUT_STD * math.sqrt(n)))
    out = {"trellis": trellis, "SU": SU, "SV": SV}
    if params.uses_tlut:
        out["tlut"] = random_tlut(params, generator)
    return out


@dataclasses.dataclass
class TinyLlamaSpec:
    """Shape and QTIP options of a random tiny Llama checkpoint."""

    hidden_size: int = 192
    intermediate_size: int = 384
    num_attention_heads: int = 6
    num_key_value_heads: int = 2
    head_dim: int = 32
    num_hidden_layers: int = 2
    vocab_size: int = 256
    max_position_embeddings: int = 256
    # lm_head std times sqrt(hidden_size): the logits' std. Larger values
    # make peaked next-token distributions, with fewer near-ties.
    logit_scale: float = 2.0
    K: int = 2
    V: int = 2
    tlut_bits: int = 9
    decode_mode: str = "quantlut_sym"
    K_v_proj: int | None = None
    skip_list: Sequence[str] = ()
    split_for_tp: bool = False
    # Projections whose trellis is written flat (1-D); the others are 2-D.
    # "all" flattens every trellis.
    flat_trellis: Sequence[str] | str = ()
    # Write rcp/tp_rank (checkpoints made after the TP split existed; the
    # reference's end-to-end fine-tuning saves without them).
    with_rcp: bool = True
    # Write each projection's tlut (table codes); without them the tables
    # must come from a quantlut_path file.
    with_tlut: bool = True
    # Written into the QTIP parameters as is (the file is not written).
    quantlut_path: str | None = None
    dtype: torch.dtype = torch.float16
    # SV in `dtype`, as the end-to-end fine-tuning saves it (fp32 otherwise).
    sv_in_model_dtype: bool = False
    layout: CheckpointLayout = "relaxml"
    seed: int = 0

    @property
    def code_params(self) -> QTIPCodeParams:
        return QTIPCodeParams(
            K=self.K, V=self.V, tlut_bits=self.tlut_bits, decode_mode=self.decode_mode
        )

    def hf_config(self) -> dict[str, Any]:
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "num_hidden_layers": self.num_hidden_layers,
            "vocab_size": self.vocab_size,
            "max_position_embeddings": self.max_position_embeddings,
            "hidden_act": "silu",
            "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0,
            "tie_word_embeddings": False,
            "attention_bias": False,
            "mlp_bias": False,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "torch_dtype": str(self.dtype).removeprefix("torch."),
        }

    def projection_shape(self, module: str) -> tuple[int, int]:
        """(out_features, in_features) of a Llama projection."""
        return llama_projection_shapes(self)[module]


def random_llama_tensors(spec: TinyLlamaSpec) -> dict[str, torch.Tensor]:
    """All tensors of a random tiny Llama QTIP checkpoint."""
    gen = torch.Generator().manual_seed(spec.seed)
    h, vocab = spec.hidden_size, spec.vocab_size

    def randn(*shape: int, std: float) -> torch.Tensor:
        return (torch.randn(shape, generator=gen) * std).to(spec.dtype)

    tensors = {"model.embed_tokens.weight": randn(vocab, h, std=1.0)}
    for layer in range(spec.num_hidden_layers):
        base = f"model.layers.{layer}"
        for norm in ("input_layernorm", "post_attention_layernorm"):
            weight = 1 + 0.1 * torch.randn(h, generator=gen)
            tensors[f"{base}.{norm}.weight"] = weight.to(spec.dtype)
        for module, key, split_rcp in LLAMA_PROJECTIONS:
            prefix = f"{base}.{module}"
            m, n = spec.projection_shape(module)
            if f"{layer}_{key}" in spec.skip_list:
                tensors[f"{prefix}.weight"] = randn(m, n, std=1 / math.sqrt(n))
                continue
            k = spec.K_v_proj if key == "v" and spec.K_v_proj else spec.K
            params = dataclasses.replace(spec.code_params, K=k)
            t = random_qtip_linear(m, n, params, generator=gen, dtype=spec.dtype)
            if spec.sv_in_model_dtype:
                t["SV"] = t["SV"].to(spec.dtype)
            flat = spec.flat_trellis == "all" or key in spec.flat_trellis
            rcp = tp_rank = None
            if spec.with_rcp:
                rcp = split_rcp if spec.split_for_tp else 0
                tp_rank = SPLIT_TP_RANK
            tensors.update(
                linear_tensors(
                    prefix,
                    t["trellis"],
                    t["SU"],
                    t["SV"],
                    t.get("tlut") if spec.with_tlut else None,
                    rcp=rcp,
                    tp_rank=tp_rank,
                    flat_trellis=flat,
                )
            )
    tensors["model.norm.weight"] = (1 + 0.1 * torch.randn(h, generator=gen)).to(
        spec.dtype
    )
    tensors["lm_head.weight"] = randn(vocab, h, std=spec.logit_scale / math.sqrt(h))
    return tensors


def random_llama_checkpoint(
    path: str | Path, spec: TinyLlamaSpec | None = None, **overrides: Any
) -> Path:
    """Write a random tiny Llama QTIP checkpoint; returns its directory.

    There is no tokenizer: use token ids (``skip_tokenizer_init=True``).
    """
    spec = dataclasses.replace(spec or TinyLlamaSpec(), **overrides)
    params = quip_params(
        spec.code_params,
        split_for_tp=spec.split_for_tp,
        skip_list=spec.skip_list,
        K_v_proj=spec.K_v_proj,
    )
    if spec.quantlut_path is not None:
        params["quantlut_path"] = spec.quantlut_path
    return write_checkpoint(
        path,
        spec.hf_config(),
        random_llama_tensors(spec),
        params,
        layout=spec.layout,
    )


# ---------------------------------------------------------------------------
# Reference model (HF transformers + the reference codec)
# ---------------------------------------------------------------------------


class QTIPReferenceLinear(torch.nn.Module):
    """nn.Linear stand-in that runs the reference QTIP forward."""

    def __init__(
        self,
        tensors: dict[str, torch.Tensor],
        params: QTIPCodeParams,
        default_rcp: int = 0,
    ) -> None:
        super().__init__()
        self.params = params
        self.register_buffer("trellis", tensors["trellis"])
        self.register_buffer("SU", tensors["SU"].float())
        self.register_buffer("SV", tensors["SV"].float())
        tlut = tensors.get("tlut")
        self.register_buffer("tlut", None if tlut is None else tlut.half())
        self.rcp = int(tensors["rcp"]) if "rcp" in tensors else default_rcp
        self.tp_rank = int(tensors["tp_rank"]) if "tp_rank" in tensors else 8
        self.in_features = self.SU.numel()
        self.out_features = self.SV.numel()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return qtip_linear_forward(
            x,
            self.trellis,
            self.SU,
            self.SV,
            self.tlut,
            self.params,
            rcp=self.rcp,
            tp_rank=self.tp_rank,
        )


def _projection_tensors(
    tensors: dict[str, torch.Tensor], prefix: str
) -> dict[str, torch.Tensor]:
    return {
        name.removeprefix(f"{prefix}."): t
        for name, t in tensors.items()
        if name.startswith(f"{prefix}.")
    }


def build_reference_model(
    path: str | Path,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> torch.nn.Module:
    """HF ``LlamaForCausalLM`` of a QTIP checkpoint, for reference outputs.

    Quantized projections become :class:`QTIPReferenceLinear`, skip-listed
    ones keep their dense weight, and everything runs in ``dtype`` (the QTIP
    layers compute in fp32 with the kernel's fp16 rounding of the
    transformed input).
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    from vllm.model_executor.layers.quantization.qtip import QTIPConfig

    config_dict, tensors = read_checkpoint(path)
    qtip_params = checkpoint_qtip_params(config_dict, path)
    qtip = QTIPConfig.from_config(qtip_params)
    assert qtip.params is not None and qtip.v_params is not None
    # A projection's own tlut wins over the quantlut_path file's tables.
    tables = read_quantlut(path, qtip_params)
    hf_config = LlamaConfig(
        **{
            k: v
            for k, v in config_dict.items()
            if k not in ("quip_params", "quantization_config", "torch_dtype")
        }
    )
    hf_config._attn_implementation = "eager"
    model = LlamaForCausalLM(hf_config)
    dense = {}
    for layer_index, layer in enumerate(model.model.layers):
        for module, key, split_rcp in LLAMA_PROJECTIONS:
            prefix = f"model.layers.{layer_index}.{module}"
            parent_name, _, attr = module.partition(".")
            parent = getattr(layer, parent_name)
            if f"{layer_index}_{key}" in qtip.skip_list:
                dense[f"{prefix}.weight"] = tensors[f"{prefix}.weight"]
                continue
            params = qtip.v_params if key == "v" else qtip.params
            own = _projection_tensors(tensors, prefix)
            if params.uses_tlut and "tlut" not in own:
                own["tlut"] = tables.get("tlut", tables.get(f"{prefix}.tlut"))
            reference = QTIPReferenceLinear(
                own, params, default_rcp=split_rcp if qtip.split_for_tp else 0
            )
            setattr(parent, attr, reference)
    names = [
        "model.embed_tokens.weight",
        "model.norm.weight",
        *(
            f"model.layers.{i}.{norm}.weight"
            for i in range(hf_config.num_hidden_layers)
            for norm in ("input_layernorm", "post_attention_layernorm")
        ),
    ]
    # With tied embeddings lm_head is embed_tokens (as in vLLM's loader): a
    # stored lm_head.weight is not read, and none is needed.
    if not hf_config.tie_word_embeddings:
        names.append("lm_head.weight")
    for name in names:
        if name not in tensors:
            raise ValueError(f"checkpoint {path} lacks {name}")
        dense[name] = tensors[name]
    missing, unexpected = model.load_state_dict(dense, strict=False)
    assert not unexpected, unexpected
    model_params = {name for name, _ in model.named_parameters()}
    not_loaded = model_params & set(missing)
    if not_loaded:
        raise ValueError(f"checkpoint {path} lacks {sorted(not_loaded)}")
    # Float tensors follow dtype; the QTIP buffers keep their own dtypes.
    for module in model.modules():
        if not isinstance(module, QTIPReferenceLinear):
            for p in module.parameters(recurse=False):
                p.data = p.data.to(dtype)
    return model.to(device).eval()


def reference_logprobs(
    model: torch.nn.Module, token_ids: Iterable[int]
) -> torch.Tensor:
    """Log-softmax over the vocabulary at every position: fp32 (len, vocab)."""
    ids = torch.tensor([list(token_ids)], device=next(model.buffers()).device)
    with torch.inference_mode():
        logits = model(input_ids=ids).logits[0]
    return torch.log_softmax(logits.float(), dim=-1)
