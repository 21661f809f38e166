# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""Read a HF Llama model one decoder layer at a time; write a checkpoint in shards.

``SourceModel`` maps every tensor name to its safetensors shard (from
``model.safetensors.index.json`` or the files' headers) and reads tensors
with ``safe_open`` as they are needed, so no step holds more than one
decoder layer of the original model. ``decoder_layer`` builds transformers'
own ``LlamaDecoderLayer`` from such a layer (no weights are initialised
first), so the layer computes exactly what the whole HF model computes.
``ShardWriter`` writes the output checkpoint shard by shard.
"""

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .codec import qtip_checkpoint

# A decoder layer's RMSNorms (its projections: in
# qtip_checkpoint.llama_projection_shapes).
LAYER_NORMS = ("input_layernorm", "post_attention_layernorm")


def load_config(model_dir: str | Path) -> Any:
    """The model's HF config, with SDPA attention (as from_pretrained picks)."""
    from transformers import AutoConfig

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").exists():
        raise ValueError(f"{model_dir}: no config.json (not a HF model directory)")
    config = AutoConfig.from_pretrained(model_dir)
    config._attn_implementation = "sdpa"
    return config


class SourceModel:
    """The tensors of a HF model directory, read one at a time."""

    def __init__(self, model_dir: str | Path) -> None:
        self.dir = Path(model_dir)
        index = self.dir / "model.safetensors.index.json"
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.files = {name: self.dir / file for name, file in weight_map.items()}
            missing = sorted({str(f) for f in self.files.values() if not f.exists()})
            if missing:
                raise ValueError(f"{index} names shards that do not exist: {missing}")
        else:
            shards = sorted(self.dir.glob("*.safetensors"))
            if not shards:
                raise ValueError(
                    f"{self.dir}: no *.safetensors files; the quantizer reads "
                    "safetensors checkpoints (save the model with "
                    "save_pretrained(safe_serialization=True))"
                )
            self.files = {}
            for shard in shards:
                with safe_open(str(shard), framework="pt") as f:
                    self.files.update(dict.fromkeys(f.keys(), shard))

    def names(self) -> list[str]:
        return list(self.files)

    def shape(self, name: str) -> tuple[int, ...]:
        with safe_open(str(self._file(name)), framework="pt") as f:
            return tuple(f.get_slice(name).get_shape())

    def _file(self, name: str) -> Path:
        if name not in self.files:
            raise ValueError(f"{self.dir}: the checkpoint has no tensor {name!r}")
        return self.files[name]

    def tensors(self, names: list[str]) -> dict[str, torch.Tensor]:
        """The named tensors (CPU, stored dtype), each shard opened once."""
        by_file: dict[Path, list[str]] = defaultdict(list)
        for name in names:
            by_file[self._file(name)].append(name)
        out = {}
        for file, file_names in by_file.items():
            with safe_open(str(file), framework="pt") as f:
                for name in file_names:
                    out[name] = f.get_tensor(name)
        return {name: out[name] for name in names}

    def tensor(self, name: str) -> torch.Tensor:
        return self.tensors([name])[name]

    def layer_names(self, index: int) -> list[str]:
        prefix = f"model.layers.{index}."
        return [n for n in self.files if n.startswith(prefix)]

    def check(self, config: Any) -> None:
        """Raise ValueError naming every tensor that is missing or misshapen."""
        h = config.hidden_size
        expected: dict[str, tuple[int, ...]] = {
            "model.embed_tokens.weight": (config.vocab_size, h),
            "model.norm.weight": (h,),
        }
        if not getattr(config, "tie_word_embeddings", False):
            expected["lm_head.weight"] = (config.vocab_size, h)
        shapes = qtip_checkpoint.llama_projection_shapes(config)
        for i in range(config.num_hidden_layers):
            for path, shape in shapes.items():
                expected[f"model.layers.{i}.{path}.weight"] = shape
            for norm in LAYER_NORMS:
                expected[f"model.layers.{i}.{norm}.weight"] = (h,)
        missing = [name for name in expected if name not in self.files]
        if missing:
            shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
            raise ValueError(
                f"{self.dir}: {len(missing)} tensor(s) of a Llama model with "
                f"{config.num_hidden_layers} layers are missing: {shown}"
            )
        by_file: dict[Path, list[str]] = defaultdict(list)
        for name in expected:
            by_file[self.files[name]].append(name)
        for file, names in by_file.items():
            with safe_open(str(file), framework="pt") as f:
                for name in names:
                    shape = tuple(f.get_slice(name).get_shape())
                    if shape != expected[name]:
                        raise ValueError(
                            f"{file.name}: {name} has shape {shape}, config.json "
                            f"implies {expected[name]}"
                        )


def decoder_layer(
    config: Any,
    index: int,
    state: dict[str, torch.Tensor],
    device: torch.device,
    dtype: torch.dtype,
) -> torch.nn.Module:
    """transformers' LlamaDecoderLayer holding ``state`` (names without the
    ``model.layers.<i>.`` prefix), on device, in dtype, frozen."""
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    with torch.device("meta"):
        layer = LlamaDecoderLayer(config, index)
    wanted = layer.state_dict().keys()
    layer.load_state_dict(
        {k: state[k].to(device=device, dtype=dtype) for k in wanted},
        assign=True,
        strict=True,
    )
    return layer.eval().requires_grad_(False)


def rotary_embedding(config: Any, device: torch.device) -> torch.nn.Module:
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    return LlamaRotaryEmbedding(config=config).to(device)


class ShardWriter:
    """Write tensors into safetensors shards of at most ``max_shard_bytes``.

    Tensors are added in order and written as soon as a shard is full, so
    at most one shard is held in memory. ``close()`` names the files as
    save_pretrained does (one ``model.safetensors``, or
    ``model-0000i-of-0000N.safetensors`` with an index).
    """

    def __init__(self, out_dir: Path, max_shard_bytes: int) -> None:
        self.dir = out_dir
        self.max_bytes = max_shard_bytes
        out_dir.mkdir(parents=True, exist_ok=True)
        # A run killed while writing leaves shards behind.
        for stale in [*out_dir.glob("*.safetensors"), *out_dir.glob("*.part")]:
            stale.unlink()
        (out_dir / "model.safetensors.index.json").unlink(missing_ok=True)
        self.shard: dict[str, torch.Tensor] = {}
        self.size = 0
        self.written: list[tuple[Path, list[str], int]] = []

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self.shard and self.size + nbytes > self.max_bytes:
            self._flush()
        # safetensors wants contiguous tensors that share no storage.
        self.shard[name] = tensor.detach().cpu().contiguous().clone()
        self.size += nbytes

    def _flush(self) -> None:
        file = self.dir / f"shard-{len(self.written):05d}.part"
        save_file(self.shard, str(file), {"format": "pt"})
        self.written.append((file, list(self.shard), self.size))
        self.shard, self.size = {}, 0

    def close(self) -> list[Path]:
        if self.shard or not self.written:
            self._flush()
        if len(self.written) == 1:
            target = self.dir / "model.safetensors"
            self.written[0][0].replace(target)
            return [target]
        count = len(self.written)
        weight_map, total, files = {}, 0, []
        for i, (file, names, size) in enumerate(self.written):
            target = self.dir / f"model-{i + 1:05d}-of-{count:05d}.safetensors"
            file.replace(target)
            weight_map.update(dict.fromkeys(names, target.name))
            total += size
            files.append(target)
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (self.dir / "model.safetensors.index.json").write_text(
            json.dumps(index, indent=2) + "\n"
        )
        return files
