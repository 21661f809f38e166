# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""The QTIP config a user writes by hand: quantlut_path and the guide's example.

quantlut_path is never unpickled: codes without a table never open it, the
table codes read a safetensors file inside the model folder, and pickles or
paths that leave the folder are refused. The integration guide's
quantize_config.json loads checkpoints written by qtip_checkpoint, whose
layers match the reference codec, on CPU.

Run `pytest tests/quantization/test_qtip_config.py`.
"""

import json
import os
from pathlib import Path

import pytest
import regex as re
import torch
from safetensors.torch import save_file

from tests.quantization.reference_qtip import (
    LLAMA_PROJECTIONS,
    TinyLlamaSpec,
    random_llama_tensors,
    read_checkpoint,
    write_checkpoint,
)
from tests.quantization.test_qtip import (
    assert_matches_reference,
    cpu_attention,  # noqa: F401 (a fixture)
    load_vllm_llama,
)
from vllm.config import DeviceConfig, ModelConfig, VllmConfig
from vllm.distributed import cleanup_dist_env_and_memory
from vllm.model_executor.layers.quantization.qtip import QTIPConfig
from vllm.model_executor.layers.quantization.utils.qtip_utils import QTIPCodeParams

# The quantize_config.json of the integration guide, verbatim.
GUIDE_EXAMPLE = {
    "quant_method": "qtip",
    "L": 16,
    "K": 2,
    "V": 2,
    "tlut_bits": 16,
    "decode_mode": "1mad",
    "quantlut_path": "checkpoints/llama/qtip/quantlut.pt",
}
# quantlut_path of a table converted with scripts/convert_quantlut.py.
CONVERTED = "checkpoints/llama/qtip/quantlut.safetensors"


def table_config(**overrides) -> QTIPConfig:
    """The guide's config with a table code (quantlut, 2**16 x 2 table)."""
    return QTIPConfig.from_config(
        {**GUIDE_EXAMPLE, "decode_mode": "quantlut", **overrides}
    )


def table(rows: int = 1 << 16, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(rows, 2, generator=gen).half()


def write_table_file(path: Path, tables: dict[str, torch.Tensor]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tables, str(path))
    return path


def write_evil_pickle(path: Path, marker: Path) -> Path:
    """A torch.save file that creates `marker` when unpickled."""

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"tlut": Payload()}, path)
    return path


def test_hand_written_config_keys():
    # The guide's file has no tile keys: every QTIP checkpoint has 16 x 16.
    cfg = QTIPConfig.from_config({**GUIDE_EXAMPLE, "V": 1})
    assert cfg.params == QTIPCodeParams(K=2, V=1, tlut_bits=16, decode_mode="1mad")
    assert (cfg.params.td_x, cfg.params.td_y) == (16, 16)
    assert cfg.quantlut_path == "checkpoints/llama/qtip/quantlut.pt"
    assert QTIPConfig.from_config({**GUIDE_EXAMPLE, "V": 1, "td_y": 16}).params == (
        cfg.params
    )
    with pytest.raises(ValueError, match=r"td_x=32 is not supported"):
        QTIPConfig.from_config({**GUIDE_EXAMPLE, "V": 1, "td_x": 32})
    with pytest.raises(ValueError, match=r"missing the key\(s\) \['decode_mode'\]"):
        QTIPConfig.from_config(
            {"quant_method": "qtip", "L": 16, "K": 2, "V": 1, "tlut_bits": 16}
        )
    with pytest.raises(ValueError, match=r"QTIP quantlut_path=3 must be a file name"):
        QTIPConfig.from_config({**GUIDE_EXAMPLE, "V": 1, "quantlut_path": 3})


# ---------------------------------------------------------------------------
# quantlut_path
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["1mad", "3inst"])
def test_lut_free_code_never_opens_quantlut_path(tmp_path, caplog_vllm, mode):
    marker = tmp_path / "unpickled"
    # A per-test name, since the log line is logged once per process.
    name = f"checkpoints/{tmp_path.name}/quantlut.pt"
    write_evil_pickle(tmp_path / "model" / name, marker)
    cfg = QTIPConfig.from_config(
        {**GUIDE_EXAMPLE, "V": 1, "decode_mode": mode, "quantlut_path": name}
    )
    for _ in range(2):
        cfg.maybe_update_config(str(tmp_path / "model"))
    assert cfg.quantlut_file is None
    assert not marker.exists()
    unused = [
        r.getMessage() for r in caplog_vllm.records if "is not used" in r.getMessage()
    ]
    assert unused == [
        (
            f"QTIP decode_mode={mode!r} uses no lookup table: quantlut_path "
            f"{name!r} is not used"
        )
    ]


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".bin", ".pkl"])
def test_pickle_quantlut_path_is_refused(tmp_path, suffix):
    marker = tmp_path / "unpickled"
    name = f"tables/quantlut{suffix}"
    write_evil_pickle(tmp_path / "model" / name, marker)
    cfg = table_config(quantlut_path=name)
    with pytest.raises(ValueError) as error:
        cfg.maybe_update_config(str(tmp_path / "model"))
    assert str(error.value) == (
        f"QTIP quantlut_path={name!r} is a pickle file, which vLLM does not "
        "load (unpickling can run arbitrary code). Convert it once, from a file "
        "you trust, in the model folder: `python scripts/convert_quantlut.py "
        f"{name} tables/quantlut.safetensors`, then set "
        '"quantlut_path": "tables/quantlut.safetensors"'
    )
    assert not marker.exists()


def test_pickle_named_safetensors_is_not_unpickled(tmp_path):
    marker = tmp_path / "unpickled"
    file = write_evil_pickle(tmp_path / "model" / CONVERTED, marker)
    with pytest.raises(
        ValueError,
        match=re.escape(
            f"QTIP quantlut_path {file} is not a readable safetensors file"
        ),
    ):
        table_config(quantlut_path=CONVERTED).maybe_update_config(
            str(tmp_path / "model")
        )
    assert not marker.exists()


@pytest.mark.parametrize("how", ["absolute", "dotdot", "symlink", "symlink-dir"])
def test_quantlut_path_leaving_model_folder_is_refused(tmp_path, how):
    model = tmp_path / "model"
    model.mkdir()
    outside = write_table_file(
        tmp_path / "outside" / "quantlut.safetensors", {"tlut": table()}
    )
    if how == "absolute":
        name = str(outside)
    elif how == "dotdot":
        name = "tables/../../outside/quantlut.safetensors"
    elif how == "symlink":
        name = "quantlut.safetensors"
        os.symlink(outside, model / name)
    else:
        name = "tables/quantlut.safetensors"
        os.symlink(outside.parent, model / "tables")
    cfg = table_config(quantlut_path=name)
    if how in ("absolute", "dotdot"):
        message = (
            f"QTIP quantlut_path={name!r} must be a relative path inside the "
            f"model folder {model}"
        )
    else:
        message = (
            f"QTIP quantlut_path={name!r} resolves to {outside.resolve()}, "
            f"outside the model folder {model.resolve()}"
        )
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        cfg.maybe_update_config(str(model))
    assert cfg.quantlut_file is None


def test_quantlut_path_links_inside_model_or_hub_cache(tmp_path):
    # A link that stays in the folder is followed.
    model = tmp_path / "model"
    real = write_table_file(model / "tables" / "v1.safetensors", {"tlut": table()})
    os.symlink("tables/v1.safetensors", model / "quantlut.safetensors")
    cfg = table_config(quantlut_path="quantlut.safetensors")
    cfg.maybe_update_config(str(model))
    assert cfg.quantlut_file == real.resolve()
    # A Hugging Face cache snapshot links its files to the repo's blobs.
    repo = tmp_path / "hub" / "models--org--llama-qtip"
    blob = write_table_file(repo / "blobs" / "0123abcd", {"tlut": table()})
    snapshot = repo / "snapshots" / "f00d"
    (snapshot / "checkpoints" / "llama" / "qtip").mkdir(parents=True)
    os.symlink(blob, snapshot / CONVERTED)
    cfg = table_config(quantlut_path=CONVERTED)
    cfg.maybe_update_config(str(snapshot))
    assert cfg.quantlut_file == blob.resolve()


@pytest.mark.parametrize(
    "name, tables, message",
    [
        (
            "quantlut.npy",
            None,
            "QTIP quantlut_path='quantlut.npy' must be a .safetensors file",
        ),
        ("missing.safetensors", None, "missing.safetensors does not exist"),
        (
            CONVERTED,
            {"lut": table()},
            (
                "holds a tensor named 'lut'; expected one tensor 'tlut' or tensors "
                "named '<projection>.tlut'"
            ),
        ),
        (
            CONVERTED,
            {"tlut": table(512)},
            (
                "tensor tlut is F16 of shape (512, 2), expected a float tensor of "
                "shape (65536, 2) (2**tlut_bits, V)"
            ),
        ),
        (
            CONVERTED,
            {"model.layers.0.mlp.up_proj.tlut": torch.zeros(1 << 16, 2).int()},
            "tensor model.layers.0.mlp.up_proj.tlut is I32 of shape (65536, 2)",
        ),
        (
            CONVERTED,
            {"tlut": table(), "model.layers.0.mlp.up_proj.tlut": table()},
            "holds both a shared 'tlut' table and per-projection tables",
        ),
    ],
    ids=["suffix", "missing", "name", "shape", "dtype", "shared-and-per-projection"],
)
def test_quantlut_file_is_checked(tmp_path, name, tables, message):
    model = tmp_path / "model"
    model.mkdir()
    if tables is not None:
        write_table_file(model / name, tables)
    with pytest.raises(ValueError, match=re.escape(message)):
        table_config(quantlut_path=name).maybe_update_config(str(model))


# ---------------------------------------------------------------------------
# The guide's example, through vLLM's loader and model classes
# ---------------------------------------------------------------------------


def write_guide_checkpoint(
    path: Path, config: dict, drop_tlut: tuple[str, ...] = ()
) -> TinyLlamaSpec:
    """A one-layer Llama in the form of `config` (a quantize_config.json).

    Written by qtip_checkpoint beside a config.json with neither
    quantization_config nor quip_params. ``drop_tlut`` lists the projections
    (e.g. "self_attn.k_proj") of layer 0 stored without their own tlut.
    """
    spec = TinyLlamaSpec(
        num_hidden_layers=1,
        K=config["K"],
        V=config["V"],
        tlut_bits=config["tlut_bits"],
        decode_mode=config["decode_mode"],
        layout="quantize_config",
    )
    tensors = random_llama_tensors(spec)
    for module in drop_tlut:
        del tensors[f"model.layers.0.{module}.tlut"]
    params = {k: v for k, v in config.items() if k != "quant_method"}
    write_checkpoint(path, spec.hf_config(), tensors, params, layout=spec.layout)
    assert json.loads((path / "quantize_config.json").read_text()) == config
    assert "quantization_config" not in (path / "config.json").read_text()
    return spec


def test_guide_example_verbatim_names_its_v(tmp_path):
    # 1MAD (like 2MAD and 3INST) emits one weight per trellis state, so the
    # guide's "V": 2 is not a code any QTIP quantizer writes.
    path = tmp_path / "ckpt"
    write_checkpoint(
        path,
        TinyLlamaSpec(num_hidden_layers=1).hf_config(),
        {},
        {k: v for k, v in GUIDE_EXAMPLE.items() if k != "quant_method"},
        layout="quantize_config",
    )
    model_config = ModelConfig(str(path), skip_tokenizer_init=True, dtype="float16")
    assert model_config.quantization == "qtip"
    with pytest.raises(
        ValueError,
        match=re.escape(
            "QTIP V=2 is not supported with decode_mode='1mad' (needs V=1)"
        ),
    ):
        VllmConfig(model_config=model_config, device_config=DeviceConfig(device="cpu"))


@pytest.mark.parametrize(
    "overrides, flag",
    [
        ({"V": 1}, None),
        ({"V": 1}, "qtip"),
        ({"V": 1, "decode_mode": "3inst"}, None),
        ({"decode_mode": "quantlut", "quantlut_path": CONVERTED}, "qtip"),
    ],
    ids=["1mad", "1mad-q-qtip", "3inst", "quantlut-q-qtip"],
)
@pytest.mark.usefixtures("cpu_attention")
def test_guide_example_loads_and_matches_reference(tmp_path, overrides, flag):
    config = {**GUIDE_EXAMPLE, **overrides}
    path = tmp_path / "ckpt"
    drop: tuple[str, ...] = ()
    if config["decode_mode"] == "quantlut":
        # Every projection takes the converted table but q_proj, whose own
        # tlut in the checkpoint wins.
        drop = tuple(m for m, _, _ in LLAMA_PROJECTIONS if m != "self_attn.q_proj")
        write_table_file(path / CONVERTED, {"tlut": table(seed=1)})
    spec = write_guide_checkpoint(path, config, drop_tlut=drop)
    # The .pt of the LUT-free codes is never opened: it does not even exist.
    assert not (path / GUIDE_EXAMPLE["quantlut_path"]).exists()
    model = load_vllm_llama(path, tmp_path, quantization=flag)
    try:
        qkv = model.model.layers[0].self_attn.qkv_proj
        assert qkv.quant_method.quant_config.params.decode_mode == config["decode_mode"]
        assert hasattr(qkv, "tlut") == (config["decode_mode"] == "quantlut")
        if drop:
            assert not torch.equal(qkv.tlut[0], table(seed=1))
            assert torch.equal(qkv.tlut[1], table(seed=1))
        assert_matches_reference(model, path, spec)
    finally:
        cleanup_dist_env_and_memory()


@pytest.mark.usefixtures("cpu_attention")
def test_per_projection_tables_and_checkpoint_tlut(tmp_path):
    # A per-projection quantlut_path file fills the projections the
    # checkpoint stores without a tlut; the checkpoint's own tlut wins.
    config = {**GUIDE_EXAMPLE, "decode_mode": "quantlut", "quantlut_path": CONVERTED}
    path = tmp_path / "ckpt"
    drop = ("self_attn.k_proj", "mlp.down_proj")
    files = {
        f"model.layers.0.{module}.tlut": table(seed=10 + i)
        for i, (module, _, _) in enumerate(LLAMA_PROJECTIONS)
    }
    write_table_file(path / CONVERTED, files)
    spec = write_guide_checkpoint(path, config, drop_tlut=drop)
    _, ckpt = read_checkpoint(path)
    model = load_vllm_llama(path, tmp_path)
    try:
        block = model.model.layers[0]
        qkv, down = block.self_attn.qkv_proj, block.mlp.down_proj
        base = "model.layers.0"
        assert torch.equal(qkv.tlut[0], ckpt[f"{base}.self_attn.q_proj.tlut"])
        assert torch.equal(qkv.tlut[1], files[f"{base}.self_attn.k_proj.tlut"])
        assert torch.equal(qkv.tlut[2], ckpt[f"{base}.self_attn.v_proj.tlut"])
        assert torch.equal(down.tlut[0], files[f"{base}.mlp.down_proj.tlut"])
        assert_matches_reference(model, path, spec)
    finally:
        cleanup_dist_env_and_memory()


@pytest.mark.usefixtures("cpu_attention")
def test_missing_table_names_projection_and_file(tmp_path):
    config = {**GUIDE_EXAMPLE, "decode_mode": "quantlut", "quantlut_path": CONVERTED}
    path = tmp_path / "ckpt"
    write_table_file(
        path / CONVERTED, {"model.layers.0.mlp.up_proj.tlut": table(seed=3)}
    )
    write_guide_checkpoint(path, config, drop_tlut=("self_attn.v_proj",))
    message = (
        "QTIP layer model.layers.0.self_attn.qkv_proj: checkpoint tensor "
        "model.layers.0.self_attn.v_proj.tlut was not found, nor in "
        f"quantlut_path {(path / CONVERTED).resolve()}"
    )
    default_dtype = torch.get_default_dtype()
    try:
        with pytest.raises(ValueError, match=re.escape(message)):
            load_vllm_llama(path, tmp_path)
    finally:
        # vLLM's set_default_torch_dtype does not restore it on an error.
        torch.set_default_dtype(default_dtype)
        cleanup_dist_env_and_memory()
