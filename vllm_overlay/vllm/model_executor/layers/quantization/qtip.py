# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""QTIP: trellis-coded weight quantization (Tseng et al., NeurIPS 2024).

A QTIP linear computes ``y = SV * (Hm @ W_hat @ Hn^T @ (SU * x))`` where
``W_hat`` is decoded on the fly from a packed bitshift trellis (``trellis``,
K bits per weight) through a per-layer lookup table (``tlut``), Hn and Hm are
randomized Hadamard transforms and SU/SV are per-channel scales.

Checkpoints (e.g. ``relaxml/*-QTIP-*Bit``) store q/k/v/o/gate/up/down as
separate projections, each with its own trellis, SU, SV and tlut, while vLLM
fuses q/k/v and gate/up. Every logical projection ("shard") of a fused layer
therefore keeps its own tensors and its own input transform.

Under tensor parallelism every rank holds whole 32 x 32 trellis blocks of its
slice. The block-diagonal transforms of ``split_for_tp`` checkpoints stay on
the rank; the whole-matrix transforms of the others (rcp = 0) take one
gather per layer (utils/qtip_parallel.py).
"""

import dataclasses
import zlib
from collections.abc import Callable
from pathlib import Path, PurePath
from typing import TYPE_CHECKING, Any

import regex as re
import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from torch.nn.parameter import Parameter
from transformers import PretrainedConfig

from vllm import _qtip_ops as qtip_ops
from vllm.config import get_current_vllm_config_or_none
from vllm.logger import init_logger
from vllm.model_executor.layers.linear import (
    ColumnParallelLinear,
    LinearBase,
    LinearMethodBase,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
    UnquantizedLinearMethod,
)
from vllm.model_executor.layers.quantization import QuantizationMethods
from vllm.model_executor.layers.quantization.base_config import (
    QuantizationConfig,
    QuantizeMethodBase,
)
from vllm.model_executor.layers.quantization.utils.qtip_hadamard import (
    hadamard_factor,
)
from vllm.model_executor.layers.quantization.utils.qtip_parallel import (
    GATHER_INPUT,
    GATHER_OUTPUT,
    qtip_gathered_apply,
)
from vllm.model_executor.layers.quantization.utils.qtip_utils import (
    DECODE_MODES,
    QTIPCodeParams,
    get_hadamard_factor,
    qtip_linear_forward,
)
from vllm.model_executor.parameter import BasevLLMParameter, ModelWeightParameter
from vllm.model_executor.utils import set_weight_attrs
from vllm.transformers_utils.config import QTIP_CONFIG_FILES
from vllm.transformers_utils.repo_utils import hf_api

if TYPE_CHECKING:
    from vllm.model_executor.models.utils import WeightsMapper

logger = init_logger(__name__)

# Keys of quip_params / quantization_config that define the trellis code.
_CODE_KEYS = ("L", "K", "V", "tlut_bits", "decode_mode")
# Tile size keys: every checkpoint has 16 x 16 tiles, so a hand-written
# config may leave them out.
_TILE_KEYS = ("td_x", "td_y")
_DEFAULT_TILE = 16
# Projections named by skip_list entries "{layer}_{projection}".
_SKIP_ENTRY = re.compile(r"^(\d+)_(q|k|v|o|up|gate|down)$")
_LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)\.")
# Layer parameter holding the checkpoint's "<proj>.tp_rank" (renamed on
# load, see QTIPConfig.get_cache_scale_mapper).
TP_RANK_PARAM = "qtip_tp_rank"
# Parameters of a quantized projection. rcp and tp_rank are missing from
# checkpoints made before the TP split existed, and from those saved by the
# reference's end-to-end fine-tuning.
_QUANT_TENSORS = ("trellis", "SU", "SV", "tlut", "rcp", TP_RANK_PARAM)
_OPTIONAL_TENSORS = ("rcp", TP_RANK_PARAM)
# Default of a missing tp_rank, as in the reference. A missing rcp is the one
# split_for_tp implies for the layer (QTIPLinearMethod.create_weights).
_DEFAULT_TP_RANK = 8
# rcp values: the block-diagonal transform is on the input (row-parallel
# split) or on the output (column-parallel split).
_RCP_ROW = 1
_RCP_COL = 2
# Shards one kernel call takes (kMaxShards in csrc/libtorch_stable/quantization/qtip).
_MAX_FUSED_SHARDS = 8
# quantlut_path files that are pickles: never loaded, since unpickling can run
# arbitrary code. The converter turns a trusted one into safetensors.
_PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".pkl", ".pickle", ".ckpt")
_QUANTLUT_CONVERTER = "scripts/convert_quantlut.py"
# Name of the one table of a quantlut_path file shared by all projections;
# per-projection tables are named like the checkpoint's "<projection>.tlut".
_SHARED_TLUT = "tlut"
# safetensors dtypes a table may have (it is cast to fp16).
_TABLE_DTYPES = ("F16", "BF16", "F32", "F64")


def _validate_code_params(params: QTIPCodeParams, k_key: str = "K") -> None:
    """Reject trellis codes vLLM cannot run, naming the key and value."""
    if params.decode_mode not in DECODE_MODES:
        raise ValueError(
            f"QTIP decode_mode={params.decode_mode!r} is not supported; "
            f"expected one of {DECODE_MODES}"
        )
    for key in ("L", "td_x", "td_y"):
        if getattr(params, key) != 16:
            raise ValueError(
                f"QTIP {key}={getattr(params, key)!r} is not supported (must be 16)"
            )
    if params.decode_mode == "quantlut_sym":
        if params.K not in (2, 3, 4):
            raise ValueError(
                f"QTIP {k_key}={params.K!r} is not supported with "
                "decode_mode='quantlut_sym' (HYB needs 2, 3 or 4 bits)"
            )
        if params.V != 2:
            raise ValueError(
                f"QTIP V={params.V!r} is not supported with "
                "decode_mode='quantlut_sym' (HYB decodes V=2 weights per state)"
            )
    try:
        params.validate()
    except ValueError as e:
        if k_key != "K":
            raise ValueError(f"{e} (for {k_key}={params.K!r})") from e
        raise


class QTIPConfig(QuantizationConfig):
    """Config of a QTIP checkpoint.

    Accepts the reference checkpoints' ``quip_params`` keys, the same keys
    written as a ``quantization_config`` or in a hand-written
    ``quantize_config.json`` (merged into one ``quantization_config`` with
    ``quant_method="qtip"`` at config load, see
    ``vllm.transformers_utils.config._get_qtip_quantization_config``).

    ``quantlut_path`` optionally names a safetensors file in the model folder
    holding lookup tables for the table codes: either one tensor ``tlut`` of
    shape (2**tlut_bits, V) used by every projection, or tensors named like
    the checkpoint's ``<projection>.tlut``. A projection's own ``tlut`` in
    the checkpoint wins; the file only fills in missing ones.
    """

    # Per-projection scalars that a checkpoint may hold for layers vLLM
    # runs unquantized (tp_rank is renamed by get_cache_scale_mapper first).
    _ignore_unexpected_suffixes = (
        *QuantizationConfig._ignore_unexpected_suffixes,
        ".rcp",
        f".{TP_RANK_PARAM}",
    )

    def __init__(
        self,
        params: QTIPCodeParams | None = None,
        split_for_tp: bool = False,
        skip_list: list[str] | None = None,
        K_v_proj: int | None = None,
        quantlut_path: str | None = None,
    ) -> None:
        super().__init__()
        if quantlut_path is not None and (
            not isinstance(quantlut_path, str) or not quantlut_path
        ):
            raise ValueError(
                f"QTIP quantlut_path={quantlut_path!r} must be a file name"
            )
        if not isinstance(split_for_tp, bool):
            raise ValueError(
                f"QTIP split_for_tp={split_for_tp!r} must be true or false"
            )
        if skip_list is None:
            skip_list = []
        if not isinstance(skip_list, (list, tuple)):
            raise ValueError(
                f"QTIP skip_list={skip_list!r} must be a list of entries like '0_v'"
            )
        for entry in skip_list:
            if not isinstance(entry, str) or not _SKIP_ENTRY.match(entry):
                raise ValueError(
                    f"QTIP skip_list entry {entry!r} is not of the form "
                    "'{layer}_{q|k|v|o|up|gate|down}'"
                )
        self.params = params
        self.split_for_tp = split_for_tp
        self.skip_list = list(skip_list)
        self.K_v_proj = K_v_proj
        self.quantlut_path = quantlut_path
        # The resolved quantlut_path file (set by maybe_update_config when the
        # code uses a table) and its tables, read on first use.
        self.quantlut_file: Path | None = None
        self._quantlut_tables: dict[str, torch.Tensor] | None = None
        self.v_params: QTIPCodeParams | None = None
        if params is not None:
            self._set_params(params)
        # Hadamard factors shared by all layers, keyed by (K, device).
        self._hadamard_factors: dict[tuple[int, torch.device], torch.Tensor] = {}

    def _set_params(self, params: QTIPCodeParams) -> None:
        _validate_code_params(params)
        k_v = params.K if self.K_v_proj is None else self.K_v_proj
        v_params = dataclasses.replace(params, K=k_v)
        _validate_code_params(v_params, k_key="K_v_proj")
        self.params = params
        self.v_params = v_params

    def __repr__(self) -> str:
        return (
            f"QTIPConfig(params={self.params}, split_for_tp={self.split_for_tp}, "
            f"skip_list={self.skip_list}, K_v_proj={self.K_v_proj}, "
            f"quantlut_path={self.quantlut_path!r})"
        )

    @classmethod
    def get_name(cls) -> QuantizationMethods:
        return "qtip"

    @classmethod
    def get_supported_act_dtypes(cls) -> list[torch.dtype]:
        return [torch.float16, torch.bfloat16]

    @classmethod
    def get_min_capability(cls) -> int:
        # The decode kernels use mma.m16n8k16 with fp16 operands.
        return 80

    @staticmethod
    def get_config_filenames() -> list[str]:
        # A hand-written config beside config.json, as for GPTQ/AWQ. It is
        # read here (with `-q qtip`) when it does not say quant_method "qtip";
        # otherwise get_config has already merged it into quantization_config.
        return list(QTIP_CONFIG_FILES)

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "QTIPConfig":
        method = config.get("quant_method", "qtip")
        if str(method).lower() != "qtip":
            raise ValueError(
                f"QTIP config has quant_method={method!r}, expected 'qtip'"
            )
        codebook = config.get("codebook", "bitshift")
        if codebook != "bitshift":
            raise ValueError(
                f"QTIP codebook={codebook!r} is not supported; QTIP checkpoints "
                "use the 'bitshift' trellis codebook (QuIP# codebooks such as "
                "E8P are a different format)"
            )
        missing = [key for key in _CODE_KEYS if key not in config]
        if missing:
            raise ValueError(f"QTIP config is missing the key(s) {missing}")
        code = {key: config[key] for key in _CODE_KEYS}
        code.update({key: config.get(key, _DEFAULT_TILE) for key in _TILE_KEYS})
        split_for_tp = config.get("split_for_tp")
        return cls(
            params=QTIPCodeParams(**code),
            split_for_tp=False if split_for_tp is None else split_for_tp,
            skip_list=config.get("skip_list"),
            K_v_proj=config.get("K_v_proj"),
            quantlut_path=config.get("quantlut_path"),
        )

    def maybe_update_config(
        self,
        model_name: str,
        hf_config: PretrainedConfig | None = None,
        revision: str | None = None,
    ) -> None:
        # Check quantlut_path while the config is built, so that a bad path
        # fails before the model is; the tables are read at weight loading.
        if self.quantlut_path is None or self.params is None:
            return
        if not self.params.uses_tlut:
            logger.info_once(
                "QTIP decode_mode=%r uses no lookup table: quantlut_path %r "
                "is not used",
                self.params.decode_mode,
                self.quantlut_path,
            )
            return
        file = self._resolve_quantlut_path(model_name, revision)
        expected = (1 << self.params.tlut_bits, self.params.V)
        try:
            with safe_open(str(file), framework="pt") as f:
                slices = {name: f.get_slice(name) for name in f.keys()}  # noqa: SIM118
                tables = {
                    name: (tuple(s.get_shape()), s.get_dtype())
                    for name, s in slices.items()
                }
        except (SafetensorError, OSError) as e:
            raise ValueError(
                f"QTIP quantlut_path {file} is not a readable safetensors file: {e}"
            ) from e
        if not tables:
            raise ValueError(f"QTIP quantlut_path {file} holds no tensor")
        for name, (shape, dtype) in tables.items():
            if name != _SHARED_TLUT and not name.endswith(f".{_SHARED_TLUT}"):
                raise ValueError(
                    f"QTIP quantlut_path {file} holds a tensor named {name!r}; "
                    f"expected one tensor {_SHARED_TLUT!r} or tensors named "
                    f"'<projection>.{_SHARED_TLUT}'"
                )
            if shape != expected or dtype not in _TABLE_DTYPES:
                raise ValueError(
                    f"QTIP quantlut_path {file}: tensor {name} is {dtype} of "
                    f"shape {shape}, expected a float tensor of shape {expected} "
                    "(2**tlut_bits, V)"
                )
        if _SHARED_TLUT in tables and len(tables) > 1:
            raise ValueError(
                f"QTIP quantlut_path {file} holds both a shared {_SHARED_TLUT!r} "
                "table and per-projection tables"
            )
        self.quantlut_file = file

    def _resolve_quantlut_path(self, model_name: str, revision: str | None) -> Path:
        """quantlut_path as a safetensors file inside the model, or raise."""
        assert self.quantlut_path is not None
        name = self.quantlut_path
        path = PurePath(name)
        if path.is_absolute() or ".." in path.parts:
            raise ValueError(
                f"QTIP quantlut_path={name!r} must be a relative path inside "
                f"the model folder {model_name}"
            )
        suffix = path.suffix.lower()
        if suffix in _PICKLE_SUFFIXES:
            converted = path.with_suffix(".safetensors").as_posix()
            raise ValueError(
                f"QTIP quantlut_path={name!r} is a pickle file, which vLLM does "
                "not load (unpickling can run arbitrary code). Convert it once, "
                "from a file you trust, in the model folder: "
                f"`python {_QUANTLUT_CONVERTER} {path.as_posix()} {converted}`, "
                f'then set "quantlut_path": "{converted}"'
            )
        if suffix != ".safetensors":
            raise ValueError(f"QTIP quantlut_path={name!r} must be a .safetensors file")
        model_dir = Path(model_name)
        if not model_dir.is_dir():
            # A Hub repository: the download stays inside it.
            return Path(
                hf_api().hf_hub_download(model_name, path.as_posix(), revision=revision)
            )
        root = model_dir.resolve()
        file = (model_dir / path).resolve()
        allowed = [root]
        if root.parent.name == "snapshots":
            # A Hub cache snapshot: its files link to the repository's blobs.
            allowed.append(root.parent.parent / "blobs")
        if not any(file.is_relative_to(folder) for folder in allowed):
            raise ValueError(
                f"QTIP quantlut_path={name!r} resolves to {file}, outside the "
                f"model folder {root}"
            )
        if not file.is_file():
            raise ValueError(f"QTIP quantlut_path={name!r}: {file} does not exist")
        return file

    def fill_missing_tlut(self, layer: torch.nn.Module, prefix: str) -> None:
        """Give quantized projections without a checkpoint tlut the file's."""
        if self.quantlut_file is None or not hasattr(layer, "tlut"):
            return
        if self._quantlut_tables is None:
            with safe_open(str(self.quantlut_file), framework="pt") as f:
                tables = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
            self._quantlut_tables = tables
        for shard in layer.qtip_shards:
            if shard.params is None or ("tlut", shard.name) in layer.qtip_loaded:
                continue
            name = f"{_checkpoint_name(prefix, shard.name)}.{_SHARED_TLUT}"
            table = self._quantlut_tables.get(
                _SHARED_TLUT, self._quantlut_tables.get(name)
            )
            if table is None:
                raise ValueError(
                    f"QTIP layer {prefix}: checkpoint tensor {name} was not found, "
                    f"nor in quantlut_path {self.quantlut_file}"
                )
            layer.tlut.data[shard.index].copy_(table)
            layer.qtip_loaded.add(("tlut", shard.name))

    @staticmethod
    def get_cache_scale_mapper() -> "WeightsMapper":
        # A checkpoint's "<proj>.tp_rank" would resolve to the int attribute
        # LinearBase.tp_rank (fused layers look names up with getattr), so it
        # is loaded under another name. This is the one checkpoint-name mapper
        # a quantization config contributes to AutoWeightsLoader (it is named
        # for KV-cache scales, whose mapping is kept).
        from vllm.model_executor.models.utils import WeightsMapper

        return QuantizationConfig.get_cache_scale_mapper() | WeightsMapper(
            orig_to_new_suffix={".tp_rank": f".{TP_RANK_PARAM}"}
        )

    def get_quant_method(
        self, layer: torch.nn.Module, prefix: str
    ) -> QuantizeMethodBase | None:
        if not isinstance(layer, LinearBase):
            return None
        if self.params is None:
            raise ValueError(
                "QTIP parameters are unknown: the checkpoint has no QTIP "
                "quantization_config, quip_params or quantize_config.json"
            )
        layer_name = prefix.rsplit(".", 1)[-1]
        # The model registers its fused layers' projections (SupportsQuant).
        shard_names = self.packed_modules_mapping.get(layer_name, [layer_name])
        indices = _LAYER_INDEX.findall(prefix)
        layer_index = indices[-1] if indices else None
        specs: list[tuple[str, QTIPCodeParams | None]] = []
        for name in shard_names:
            key = name.removesuffix("_proj")
            if f"{layer_index}_{key}" in self.skip_list:
                specs.append((name, None))
            else:
                specs.append((name, self.v_params if key == "v" else self.params))
        if all(params is None for _, params in specs):
            return UnquantizedLinearMethod()
        return QTIPLinearMethod(self, specs)

    def shared_hadamard_factor(self, k: int, device: torch.device) -> torch.Tensor:
        """H_K as fp32 on device, one tensor shared by every layer."""
        if (k, device) not in self._hadamard_factors:
            self._hadamard_factors[(k, device)] = hadamard_factor(k, device=device)
        return self._hadamard_factors[(k, device)]


@dataclasses.dataclass(frozen=True)
class QTIPShard:
    """One logical projection of a (possibly fused) linear layer on this rank.

    Rows are counted on this rank (``out_size``) and in the checkpoint
    (``out_full``); this rank holds checkpoint rows ``out_rank * out_size``
    onwards. ``params`` is None for a skip-listed (dense) projection.
    """

    name: str
    params: QTIPCodeParams | None
    out_size: int
    out_full: int
    out_rank: int
    # Index among the quantized (or dense) shards: row of SU/tlut/rcp/tp_rank.
    index: int
    # First row in SV (quantized) or in the dense weight (dense).
    row_offset: int
    # First int16 word in the flat trellis (quantized shards).
    word_offset: int
    # Words per trellis block of (block_rows x block_cols) weights.
    block_rows: int
    block_cols: int

    @property
    def block_words(self) -> int:
        assert self.params is not None
        return self.block_rows * self.block_cols * self.params.K // 16

    def num_words(self, in_size: int) -> int:
        assert self.params is not None
        return self.out_size * in_size * self.params.K // 16


@dataclasses.dataclass(frozen=True)
class QTIPTransform:
    """Static shape of a quantized shard's Hadamard transforms.

    ``rcp`` and ``blocks`` are passed to the reference forward as its rcp
    and tp_rank: ``blocks`` is the number of block-diagonal Hadamard blocks
    within this rank's slice of the split dimension. ``in_block`` and
    ``out_block`` are the transforms' block sizes on this rank, and
    ``in_factor`` / ``out_factor`` the K of their H_K factors (1: none).
    """

    rcp: int
    blocks: int
    in_block: int
    out_block: int
    in_factor: int
    out_factor: int


class QTIPLinearMethod(LinearMethodBase):
    """Linear method for QTIP checkpoints.

    Parameters of a layer with shards s (q/k/v, gate/up or a single one):

    - ``trellis``: int16, every quantized shard's words back to back; shard s
      is viewed as (m_s / b, n / b, b*b*K_s/16) with b = 32 (kernel layout)
      or 16 (generic layout), so TP slices are whole blocks.
    - ``SU``: fp32 (quantized shards, n), one input scale per shard; all
      input features for a row-parallel layer that gathers its input.
    - ``SV``: fp32 (sum of quantized m_s,), output scales concatenated.
    - ``tlut``: fp16 (quantized shards, 2**tlut_bits, V).
    - ``rcp``, ``qtip_tp_rank``: int64 (quantized shards,), the checkpoint's
      rcp and tp_rank.
    - ``weight``: dense rows of skip-listed shards, in the model dtype.

    Every parameter has its own shard-aware loader, and the loaders record
    what arrived so that process_weights_after_loading can name what is
    missing.
    """

    def __init__(
        self,
        quant_config: QTIPConfig,
        shard_specs: list[tuple[str, QTIPCodeParams | None]],
    ) -> None:
        self.quant_config = quant_config
        self.shard_specs = shard_specs

    def create_weights(
        self,
        layer: torch.nn.Module,
        input_size_per_partition: int,
        output_partition_sizes: list[int],
        input_size: int,
        output_size: int,
        params_dtype: torch.dtype,
        **extra_weight_attrs,
    ):
        prefix = getattr(layer, "prefix", "")
        if len(output_partition_sizes) != len(self.shard_specs):
            raise ValueError(
                f"QTIP layer {prefix}: {len(output_partition_sizes)} output "
                f"partitions but {len(self.shard_specs)} projections "
                f"{[name for name, _ in self.shard_specs]}"
            )
        tp_rank = getattr(layer, "tp_rank", 0)
        tp_size = getattr(layer, "tp_size", 1)
        is_row = isinstance(layer, RowParallelLinear)
        is_column = isinstance(layer, ColumnParallelLinear)
        quantized = [p for _, p in self.shard_specs if p is not None]
        # Without split_for_tp the transforms span whole matrices: a split
        # layer all-gathers the side its slice does not cover (qtip_parallel).
        gather = None
        if tp_size > 1 and not self.quant_config.split_for_tp:
            gather = GATHER_INPUT if is_row else GATHER_OUTPUT if is_column else None
        if not self.quant_config.split_for_tp:
            expected_rcp = 0
        elif is_row:
            expected_rcp = _RCP_ROW
        elif is_column:
            expected_rcp = _RCP_COL
        else:
            expected_rcp = 0

        in_rank = tp_rank if is_row else 0
        shards: list[QTIPShard] = []
        sv_rows = dense_rows = words = 0
        for s, ((name, params), out_size) in enumerate(
            zip(self.shard_specs, output_partition_sizes)
        ):
            out_full, out_rank = _shard_extent(layer, s, out_size, is_column)
            if params is None:
                index = sum(1 for sh in shards if sh.params is None)
                row_offset, word_offset, block = dense_rows, 0, (1, 1)
                dense_rows += out_size
            else:
                index = sum(1 for sh in shards if sh.params is not None)
                row_offset, word_offset = sv_rows, words
                block = (32, 32) if params.uses_kernel_layout else (16, 16)
                _check_tiles(
                    prefix, name, out_size, input_size_per_partition, block, tp_size
                )
                if gather == GATHER_OUTPUT and (tp_size * out_size) % out_full:
                    raise ValueError(
                        f"QTIP layer {prefix} ({name}): {out_size} of {out_full} "
                        f"output rows per rank do not split over "
                        f"tensor_parallel_size={tp_size}"
                    )
                sv_rows += out_size
                words += out_size * input_size_per_partition * params.K // 16
            shards.append(
                QTIPShard(
                    name=name,
                    params=params,
                    out_size=out_size,
                    out_full=out_full,
                    out_rank=out_rank,
                    index=index,
                    row_offset=row_offset,
                    word_offset=word_offset,
                    block_rows=block[0],
                    block_cols=block[1],
                )
            )

        layer.qtip_shards = shards
        layer.qtip_in_size = input_size_per_partition
        layer.qtip_in_full = input_size
        layer.qtip_in_rank = in_rank
        layer.qtip_expected_rcp = expected_rcp
        layer.qtip_gather = gather
        layer.qtip_loaded = set()
        # Checked here so that unsupported dimensions fail when the model is
        # built; rechecked once the checkpoint's rcp/tp_rank are known.
        layer.qtip_transforms = [
            _shard_transform(layer, shard, expected_rcp, _DEFAULT_TP_RANK, prefix)
            for shard in shards
            if shard.params is not None
        ]

        num_q = len(quantized)
        # The input transform of a gathered row-parallel layer spans all of SU.
        su_cols = input_size if gather == GATHER_INPUT else input_size_per_partition
        tensors: dict[str, torch.Tensor] = {
            "trellis": torch.zeros(words, dtype=torch.int16),
            "SU": torch.empty(num_q, su_cols, dtype=torch.float32),
            "SV": torch.empty(sv_rows, dtype=torch.float32),
            # A checkpoint without .rcp gets the rcp split_for_tp implies.
            "rcp": torch.full((num_q,), expected_rcp, dtype=torch.int64),
            TP_RANK_PARAM: torch.full((num_q,), _DEFAULT_TP_RANK, dtype=torch.int64),
        }
        if quantized[0].uses_tlut:
            lut_shape = (num_q, 1 << quantized[0].tlut_bits, quantized[0].V)
            tensors["tlut"] = torch.empty(lut_shape, dtype=torch.float16)
        for name, data in tensors.items():
            param = BasevLLMParameter(
                data=data, weight_loader=_make_loader(layer, name)
            )
            layer.register_parameter(name, param)
        if dense_rows:
            weight = ModelWeightParameter(
                data=torch.empty(
                    dense_rows, input_size_per_partition, dtype=params_dtype
                ),
                input_dim=1,
                output_dim=0,
                weight_loader=_make_loader(layer, "weight"),
            )
            layer.register_parameter("weight", weight)
        extra_weight_attrs.pop("weight_loader", None)
        for param in layer.parameters(recurse=False):
            set_weight_attrs(param, extra_weight_attrs)

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        prefix = getattr(layer, "prefix", "")
        if not layer.qtip_loaded and _loading_dummy_weights():
            _init_dummy_weights(layer, prefix)
        else:
            self.quant_config.fill_missing_tlut(layer, prefix)
            _check_loaded(layer, prefix)
            if self.quant_config.split_for_tp and any(
                ("rcp", shard.name) not in layer.qtip_loaded
                for shard in layer.qtip_shards
                if shard.params is not None
            ):
                logger.info_once(
                    "QTIP checkpoint without .rcp tensors (as the reference's "
                    "end-to-end fine-tuning saves them): split_for_tp=True means "
                    "rcp=%d for column-parallel and rcp=%d for row-parallel layers",
                    _RCP_COL,
                    _RCP_ROW,
                )
        rcps = layer.rcp.tolist()
        tp_ranks = layer.qtip_tp_rank.tolist()
        transforms = []
        for shard in layer.qtip_shards:
            if shard.params is None:
                continue
            rcp, ckpt_tp = int(rcps[shard.index]), int(tp_ranks[shard.index])
            tensor = f"{_checkpoint_name(prefix, shard.name)}.rcp"
            if rcp != layer.qtip_expected_rcp:
                raise ValueError(
                    f"QTIP layer {prefix}: {tensor} is {rcp} but quip_params "
                    f"split_for_tp={self.quant_config.split_for_tp} means "
                    f"rcp={layer.qtip_expected_rcp} for this "
                    f"{type(layer).__name__}"
                )
            transforms.append(_shard_transform(layer, shard, rcp, ckpt_tp, prefix))
        layer.qtip_transforms = transforms

        # H_K factors live in buffers on the weights' device: looking them up
        # inside the forward would copy them from the host, which CUDA graph
        # capture does not allow.
        device = layer.trellis.device
        for i, transform in enumerate(transforms):
            for side, k in (("in", transform.in_factor), ("out", transform.out_factor)):
                factor = self.quant_config.shared_hadamard_factor
                had = factor(k, device) if k > 1 else None
                layer.register_buffer(f"qtip_had_{side}_{i}", had, persistent=False)
        # The CUDA kernels run the HYB code of the published checkpoints; any
        # other code, or a device without them, uses the reference codec.
        quantized = [sh for sh in layer.qtip_shards if sh.params is not None]
        reason = _reference_path_reason(quantized, transforms, device)
        layer.qtip_use_kernels = reason is None
        layer.qtip_fused_call = (
            None if layer.qtip_gather else _fused_call(layer.qtip_shards, transforms)
        )
        _log_path(layer, prefix, reason)

    def apply(
        self,
        layer: torch.nn.Module,
        x: torch.Tensor,
        bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if layer.qtip_gather is not None:
            return qtip_gathered_apply(layer, x, bias)
        call = layer.qtip_fused_call
        if layer.qtip_use_kernels and call is not None:
            # All shards in one kernel call (three launches).
            y = qtip_ops.qtip_matmul(
                x,
                layer.trellis,
                layer.tlut,
                layer.SU,
                layer.SV,
                layer.qtip_had_in_0,
                layer.qtip_had_out_0,
                call.K,
                in_block=call.in_block,
                out_blocks=call.out_blocks,
                shard_rows=call.shard_rows,
            )
            return y if bias is None else y + bias
        outputs = []
        for shard in layer.qtip_shards:
            if shard.params is None:
                rows = slice(shard.row_offset, shard.row_offset + shard.out_size)
                outputs.append(F.linear(x, layer.weight[rows]))
            else:
                outputs.append(self.apply_shard(layer, x, shard))
        y = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=-1)
        if bias is not None:
            y = y + bias
        return y

    def apply_shard(
        self, layer: torch.nn.Module, x: torch.Tensor, shard: QTIPShard
    ) -> torch.Tensor:
        """One quantized shard: input transform, W_hat GEMM, output transform.

        This is the unit a fused decode kernel replaces; the reference codec
        decodes W_hat for the call and frees it, so no dense copy is kept.
        """
        assert shard.params is not None
        start = shard.word_offset
        trellis = layer.trellis[start : start + shard.num_words(layer.qtip_in_size)]
        rows = slice(shard.row_offset, shard.row_offset + shard.out_size)
        tlut = layer.tlut[shard.index] if shard.params.uses_tlut else None
        transform = layer.qtip_transforms[shard.index]
        had_in = getattr(layer, f"qtip_had_in_{shard.index}")
        had_out = getattr(layer, f"qtip_had_out_{shard.index}")
        if layer.qtip_use_kernels:
            return qtip_ops.qtip_matmul(
                x,
                trellis,
                tlut,
                layer.SU[shard.index],
                layer.SV[rows],
                had_in,
                had_out,
                shard.params.K,
                in_block=transform.in_block,
                out_blocks=[transform.out_block],
            )
        return qtip_linear_forward(
            x,
            trellis,
            layer.SU[shard.index],
            layer.SV[rows],
            tlut,
            shard.params,
            rcp=transform.rcp,
            tp_rank=transform.blocks,
            had_in=had_in,
            had_out=had_out,
        )


def _init_dummy_weights(layer: torch.nn.Module, prefix: str) -> None:
    """Random but realistic QTIP tensors, for load_format="dummy" benchmarks.

    vLLM's dummy loader leaves integer tensors at zero and fills floats with
    U(-1e-3, 1e-3), which would decode every weight to the same table entry.
    Here the trellis gets uniform random bits (every state equally likely,
    as in a real checkpoint), the table N(0, 1) codewords like the k-means
    HYB table, SU random signs, and SV random signs scaled so that W has the
    1/sqrt(n) spread of an initialized Llama projection (the Hadamards are
    orthonormal, so W's entries are SV * table values). Seeded from the
    layer name: every rank and every run gets the same model.
    """
    gen = torch.Generator(device=layer.trellis.device)
    gen.manual_seed(zlib.crc32(prefix.encode()))

    def fill(param: torch.Tensor, values: torch.Tensor) -> None:
        param.data.copy_(values.to(param.dtype))

    def signs(shape: torch.Size) -> torch.Tensor:
        bits = torch.randint(0, 2, shape, generator=gen, device=gen.device)
        return bits.float() * 2 - 1

    # In place: randint would make an int64 copy (1.6 GiB for the gate_up_proj
    # of a 2-bit 405B).
    layer.trellis.data.random_(-(1 << 15), 1 << 15, generator=gen)
    if hasattr(layer, "tlut"):
        fill(
            layer.tlut, torch.randn(layer.tlut.shape, generator=gen, device=gen.device)
        )
    fill(layer.SU, signs(layer.SU.shape))
    fill(layer.SV, signs(layer.SV.shape) * layer.qtip_in_full**-0.5)
    # vLLM's dummy loader zeroes integer parameters on ROCm.
    layer.rcp.data.fill_(layer.qtip_expected_rcp)
    layer.qtip_tp_rank.data.fill_(_DEFAULT_TP_RANK)


@dataclasses.dataclass(frozen=True)
class QTIPFusedCall:
    """Static arguments of one qtip_matmul call over all of a layer's shards."""

    K: int
    in_block: int
    out_blocks: list[int]
    shard_rows: list[int]


def _fused_call(
    shards: list[QTIPShard], transforms: list[QTIPTransform]
) -> QTIPFusedCall | None:
    """The whole-layer kernel call, if the shards can share one.

    They can when every shard is quantized with the same K (their trellises
    then form one (m/32, n/32, 64K) array) and their output transforms share
    one H_K factor; skip-listed shards or a different K for v_proj run shard
    by shard.
    """
    params = [sh.params for sh in shards if sh.params is not None]
    if len(params) != len(shards) or len(shards) > _MAX_FUSED_SHARDS:
        return None
    if len({p.K for p in params}) != 1:
        return None
    if len({t.out_factor for t in transforms}) != 1:
        return None
    return QTIPFusedCall(
        K=params[0].K,
        in_block=transforms[0].in_block,
        out_blocks=[t.out_block for t in transforms],
        shard_rows=[sh.out_size for sh in shards],
    )


def _reference_path_reason(
    shards: list[QTIPShard], transforms: list[QTIPTransform], device: torch.device
) -> str | None:
    """Why a layer's quantized shards cannot run the CUDA kernels (None: they can).

    The kernels decode the HYB code (quantlut_sym, L=16, V=2, 9-bit table) in
    the kernel layout, with K in QTIP_KERNEL_K, and take Hadamard blocks that
    fit the device's shared memory.
    """
    reason = qtip_ops.qtip_kernels_unavailable(device)
    if reason is not None:
        return reason
    for shard, transform in zip(shards, transforms):
        params = shard.params
        assert params is not None
        if not (
            params.decode_mode == "quantlut_sym"
            and params.uses_kernel_layout
            and params.K in qtip_ops.QTIP_KERNEL_K
            and params.tlut_bits == 9
        ):
            return (
                f"the QTIP kernels decode the HYB code of the published "
                f"checkpoints (quantlut_sym, L=16, V=2, tlut_bits=9, K in "
                f"{qtip_ops.QTIP_KERNEL_K}), not decode_mode="
                f"{params.decode_mode!r}, L={params.L}, V={params.V}, "
                f"tlut_bits={params.tlut_bits}, K={params.K}"
            )
        for block, factor in (
            (transform.in_block, transform.in_factor),
            (transform.out_block, transform.out_factor),
        ):
            if not qtip_ops.qtip_hadamard_supported(block, factor, device):
                return (
                    f"the QTIP Hadamard kernel does not take {block}-wide "
                    f"blocks (H_{factor}) on this GPU"
                )
    return None


def _log_path(layer: torch.nn.Module, prefix: str, reason: str | None) -> None:
    """Say which path a layer takes (debug), and once why a layer falls back."""
    if reason is not None:
        logger.warning_once(
            "QTIP: %s. Layers run the reference decoder instead, which decodes "
            "the whole weight matrix on every forward (much slower).",
            reason,
        )
        logger.debug("QTIP layer %s: reference decoder (%s)", prefix, reason)
    elif layer.qtip_fused_call is not None:
        logger.debug(
            "QTIP layer %s: CUDA kernels, %d shard(s) in one call",
            prefix,
            len(layer.qtip_shards),
        )
    else:
        logger.debug("QTIP layer %s: CUDA kernels, shard by shard", prefix)


def _loading_dummy_weights() -> bool:
    """Whether the model is being loaded with load_format="dummy".

    The worker sets load_config.load_format to "dummy" for dummy loads
    (also for load_dummy_weights=True), under the current vLLM config.
    """
    config = get_current_vllm_config_or_none()
    return config is not None and config.load_config.load_format == "dummy"


def _shard_extent(
    layer: torch.nn.Module, s: int, out_size: int, is_column: bool
) -> tuple[int, int]:
    """(rows in the checkpoint, index of this rank's slice) of shard s."""
    tp_rank = getattr(layer, "tp_rank", 0)
    if isinstance(layer, QKVParallelLinear):
        if s == 0:
            return layer.total_num_heads * layer.head_size, tp_rank
        head_size = layer.head_size if s == 1 else layer.v_head_size
        # KV heads are replicated when there are fewer of them than ranks.
        return (
            layer.total_num_kv_heads * head_size,
            tp_rank // layer.num_kv_head_replicas,
        )
    if isinstance(layer, MergedColumnParallelLinear):
        return layer.output_sizes[s], tp_rank
    if is_column:
        return layer.output_size, tp_rank
    return out_size, 0


def _check_tiles(
    prefix: str, name: str, m: int, n: int, block: tuple[int, int], tp_size: int
) -> None:
    if m % block[0] != 0 or n % block[1] != 0:
        raise ValueError(
            f"QTIP layer {prefix} ({name}): this rank's {m} x {n} slice "
            f"(tensor_parallel_size={tp_size}) is not made of whole "
            f"{block[0]} x {block[1]} trellis blocks"
        )


def _hadamard_factor_for(
    size: int, block: int, prefix: str, name: str, what: str
) -> int:
    """K of the Hadamard transform of a size-`size` slice in blocks of `block`.

    Raises naming the layer and dimension if QTIP has no transform for it.
    """
    try:
        k, _ = get_hadamard_factor(block)
        if block != size:
            k_full, _ = get_hadamard_factor(size)
            if k_full != k:
                raise ValueError(
                    f"blocks of {block} use factor K={k} but the {size} "
                    f"features of this rank use K={k_full}"
                )
    except ValueError as e:
        raise ValueError(
            f"QTIP layer {prefix} ({name}): unsupported {what} dimension: {e}"
        ) from e
    return k


def _shard_transform(
    layer: torch.nn.Module,
    shard: QTIPShard,
    rcp: int,
    ckpt_tp: int,
    prefix: str,
) -> QTIPTransform:
    """Validate a shard's transforms for (rcp, tp_rank) and describe them.

    rcp=1 (2) makes the input (output) transform block-diagonal with
    tp_rank blocks over the checkpoint's dimension; a dimension this rank
    holds only a slice of must be such a block-diagonal one, or be
    all-gathered (layer.qtip_gather) for a transform over all its features.
    """
    assert shard.params is not None
    tensor = _checkpoint_name(prefix, shard.name)
    if rcp not in (0, _RCP_ROW, _RCP_COL):
        raise ValueError(f"QTIP layer {prefix}: {tensor}.rcp={rcp} must be 0, 1 or 2")
    gather = layer.qtip_gather
    dims = {
        _RCP_ROW: ("input", layer.qtip_in_size, layer.qtip_in_full, GATHER_INPUT),
        _RCP_COL: ("output", shard.out_size, shard.out_full, GATHER_OUTPUT),
    }
    blocks = 1
    block_sizes = {}
    # Features the transform of each side runs over on this rank.
    sizes = {}
    for side, (what, size, full, gathered) in dims.items():
        if rcp != side:
            if size != full and gather != gathered:
                raise ValueError(
                    f"QTIP layer {prefix}: {tensor}.rcp={rcp} has a {what} "
                    f"transform over all {full} {what} features, which cannot "
                    f"be split over tensor parallel ranks ({size} per rank)"
                )
            block_sizes[side] = sizes[side] = full
            continue
        sizes[side] = size
        if ckpt_tp < 1 or full % ckpt_tp != 0 or size % (full // ckpt_tp) != 0:
            raise ValueError(
                f"QTIP layer {prefix}: {tensor}.tp_rank={ckpt_tp} does not split "
                f"the {full} {what} features into blocks that tile this rank's "
                f"{size}"
            )
        block_sizes[side] = full // ckpt_tp
        blocks = size // block_sizes[side]
    in_factor = _hadamard_factor_for(
        sizes[_RCP_ROW], block_sizes[_RCP_ROW], prefix, shard.name, "input"
    )
    out_factor = _hadamard_factor_for(
        sizes[_RCP_COL], block_sizes[_RCP_COL], prefix, shard.name, "output"
    )
    return QTIPTransform(
        rcp=rcp,
        blocks=blocks,
        in_block=block_sizes[_RCP_ROW],
        out_block=block_sizes[_RCP_COL],
        in_factor=in_factor,
        out_factor=out_factor,
    )


def _checkpoint_name(prefix: str, shard_name: str) -> str:
    """Checkpoint name of a shard's projection, e.g. '...self_attn.q_proj'."""
    parent, _, _ = prefix.rpartition(".")
    return f"{parent}.{shard_name}" if parent else shard_name


def _tensor_name(param_name: str) -> str:
    return "tp_rank" if param_name == TP_RANK_PARAM else param_name


def _shard_index(layer: torch.nn.Module, shard_id: str | int | None) -> int:
    shards = layer.qtip_shards
    if shard_id is None:
        if len(shards) == 1:
            return 0
        raise ValueError(
            f"QTIP layer {layer.prefix}: got a tensor for the whole fused layer; "
            "QTIP checkpoints store every projection separately"
        )
    if isinstance(shard_id, str):
        return {"q": 0, "k": 1, "v": 2}[shard_id]
    return shard_id


def _make_loader(
    layer: torch.nn.Module, name: str
) -> Callable[[Parameter, torch.Tensor, str | int | None], None]:
    """Loader of checkpoint tensor `name` for every shard of `layer`."""

    def load(
        param: Parameter, loaded: torch.Tensor, shard_id: str | int | None = None
    ) -> None:
        shard = layer.qtip_shards[_shard_index(layer, shard_id)]
        prefix = layer.prefix
        tensor = f"{_checkpoint_name(prefix, shard.name)}.{_tensor_name(name)}"
        if (shard.params is None) != (name == "weight"):
            why = (
                "is skip-listed (unquantized)"
                if shard.params is None
                else "is quantized (not in skip_list)"
            )
            raise ValueError(
                f"QTIP layer {prefix}: unexpected checkpoint tensor {tensor}: "
                f"{shard.name} {why}"
            )
        n, n_full, in_rank = layer.qtip_in_size, layer.qtip_in_full, layer.qtip_in_rank
        rows = (shard.out_rank * shard.out_size, shard.out_size)
        cols = (in_rank * n, n)
        if name == "trellis":
            _load_trellis(param.data, loaded, shard, n, n_full, rows, cols, tensor)
        elif name == "weight":
            _expect_shape(loaded, (shard.out_full, n_full), tensor)
            dst = param.data[shard.row_offset : shard.row_offset + shard.out_size]
            dst.copy_(loaded.narrow(0, *rows).narrow(1, *cols))
        elif name == "SU":
            _expect_shape(loaded, (n_full,), tensor)
            su_cols = (0, n_full) if layer.qtip_gather == GATHER_INPUT else cols
            param.data[shard.index].copy_(loaded.narrow(0, *su_cols))
        elif name == "SV":
            _expect_shape(loaded, (shard.out_full,), tensor)
            dst = param.data[shard.row_offset : shard.row_offset + shard.out_size]
            dst.copy_(loaded.narrow(0, *rows))
        elif name == "tlut":
            _expect_shape(loaded, tuple(param.shape[1:]), tensor)
            param.data[shard.index].copy_(loaded)
        else:  # rcp, tp_rank: scalars
            if loaded.numel() != 1:
                raise ValueError(
                    f"QTIP layer {prefix}: {tensor} has shape "
                    f"{tuple(loaded.shape)}, expected a scalar"
                )
            param.data[shard.index].copy_(loaded.reshape(()))
        layer.qtip_loaded.add((name, shard.name))

    return load


def _expect_shape(loaded: torch.Tensor, shape: tuple[int, ...], tensor: str) -> None:
    if tuple(loaded.shape) != shape:
        raise ValueError(
            f"QTIP checkpoint tensor {tensor} has shape {tuple(loaded.shape)}, "
            f"expected {shape}"
        )
    if not loaded.is_floating_point():
        raise ValueError(
            f"QTIP checkpoint tensor {tensor} has dtype {loaded.dtype}, "
            "expected a floating-point dtype"
        )


def _load_trellis(
    dst: torch.Tensor,
    loaded: torch.Tensor,
    shard: QTIPShard,
    n: int,
    n_full: int,
    rows: tuple[int, int],
    cols: tuple[int, int],
    tensor: str,
) -> None:
    """Copy this rank's blocks of a 2-D or flat trellis into its slot."""
    assert shard.params is not None
    k = shard.params.K
    expected = shard.out_full * n_full * k // 16
    if loaded.dtype != torch.int16:
        raise ValueError(
            f"QTIP checkpoint tensor {tensor} has dtype {loaded.dtype}, "
            "expected torch.int16"
        )
    if loaded.numel() != expected:
        raise ValueError(
            f"QTIP checkpoint tensor {tensor} has shape {tuple(loaded.shape)} "
            f"({loaded.numel()} elements), expected m*n*K/16 = {expected} "
            f"elements for m={shard.out_full}, n={n_full}, K={k}"
        )
    br, bc, words = shard.block_rows, shard.block_cols, shard.block_words
    blocks = loaded.reshape(shard.out_full // br, n_full // bc, words)
    blocks = blocks.narrow(0, rows[0] // br, rows[1] // br)
    blocks = blocks.narrow(1, cols[0] // bc, cols[1] // bc)
    start = shard.word_offset
    slot = dst[start : start + shard.num_words(n)]
    slot.view(shard.out_size // br, n // bc, words).copy_(blocks)


def _check_loaded(layer: torch.nn.Module, prefix: str) -> None:
    """Raise naming the first checkpoint tensor no loader received."""
    for shard in layer.qtip_shards:
        if shard.params is None:
            names: tuple[str, ...] = ("weight",)
        else:
            names = tuple(
                name
                for name in _QUANT_TENSORS
                if name not in _OPTIONAL_TENSORS
                and (name != "tlut" or shard.params.uses_tlut)
            )
        for name in names:
            if (name, shard.name) not in layer.qtip_loaded:
                raise ValueError(
                    f"QTIP layer {prefix}: checkpoint tensor "
                    f"{_checkpoint_name(prefix, shard.name)}.{_tensor_name(name)} "
                    "was not found"
                )
