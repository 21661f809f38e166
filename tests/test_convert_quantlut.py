# SPDX-License-Identifier: Apache-2.0
"""scripts/convert_quantlut.py: a torch.save lookup table to safetensors.

Round trips of a shared table and of per-projection tables, refusal of
anything torch.load(weights_only=True) or the table layout rejects, and
vLLM's QTIPConfig accepting the converted file as quantlut_path.
"""

import re
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))

import convert_quantlut  # noqa: E402


def test_shared_table_round_trip(tmp_path, capsys):
    table = torch.randn(1 << 16, 2).half()
    torch.save(table, tmp_path / "quantlut.pt")
    target = tmp_path / "quantlut.safetensors"
    assert convert_quantlut.main([str(tmp_path / "quantlut.pt"), str(target)]) == 0
    out = load_file(str(target))
    assert list(out) == ["tlut"]
    assert out["tlut"].dtype == torch.float16
    assert torch.equal(out["tlut"], table)
    assert capsys.readouterr().out == (
        f"tlut: torch.float16 (65536, 2)\nwrote {target}\n"
    )


def test_per_projection_tables_round_trip(tmp_path):
    # A table sliced out of a bigger tensor (a view) is written on its own.
    stacked = torch.randn(2, 512, 2)
    tables = {
        "model.layers.0.self_attn.q_proj.tlut": stacked[0],
        "model.layers.0.mlp.down_proj.tlut": stacked[1].half(),
    }
    torch.save(tables, tmp_path / "quantlut.pth")
    out = convert_quantlut.convert(
        tmp_path / "quantlut.pth", tmp_path / "quantlut.safetensors"
    )
    assert out.keys() == tables.keys()
    written = load_file(str(tmp_path / "quantlut.safetensors"))
    assert written.keys() == tables.keys()
    for name, table in tables.items():
        assert written[name].dtype == table.dtype
        assert torch.equal(written[name], table)


class Payload:
    """Creates a marker file when unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize(
    "content, message",
    [
        ("payload", "Weights only load failed"),
        ({"tlut": [1.0, 2.0]}, "entry 'tlut' is a list, expected tensors"),
        ({"lut": torch.zeros(4, 2)}, "tensor 'lut' is not named 'tlut'"),
        (
            {"tlut": torch.zeros(4, 2), "m.q_proj.tlut": torch.zeros(4, 2)},
            "holds both a shared 'tlut' table and per-projection tables",
        ),
        (torch.zeros(4, 2, dtype=torch.int32), "expected a 2-D float table"),
        (torch.zeros(8), "tensor 'tlut' is torch.float32 of shape (8,)"),
        ([torch.zeros(4, 2)], "holds a list, expected a tensor or a dict"),
    ],
    ids=["pickle-code", "list-entry", "name", "mixed", "int", "1-d", "list"],
)
def test_refused_content(tmp_path, capsys, content, message):
    marker = tmp_path / "unpickled"
    if content == "payload":
        content = {"tlut": Payload(marker)}
    source = tmp_path / "quantlut.pt"
    torch.save(content, source)
    target = tmp_path / "quantlut.safetensors"
    assert convert_quantlut.main([str(source), str(target)]) == 1
    assert message in capsys.readouterr().err
    assert not target.exists()
    assert not marker.exists()


def test_refused_target(tmp_path):
    torch.save(torch.zeros(4, 2), tmp_path / "quantlut.pt")
    with pytest.raises(ValueError, match="must be a .safetensors file"):
        convert_quantlut.convert(tmp_path / "quantlut.pt", tmp_path / "quantlut.pt2")
    (tmp_path / "quantlut.safetensors").write_bytes(b"keep")
    with pytest.raises(ValueError, match="exists"):
        convert_quantlut.convert(
            tmp_path / "quantlut.pt", tmp_path / "quantlut.safetensors"
        )
    assert (tmp_path / "quantlut.safetensors").read_bytes() == b"keep"


def test_converted_table_is_a_quantlut_path(tmp_path):
    """The converted file is what vLLM's QTIPConfig loads as quantlut_path."""
    qtip = pytest.importorskip("vllm.model_executor.layers.quantization.qtip")
    model = tmp_path / "model"
    (model / "qtip").mkdir(parents=True)
    torch.save(torch.randn(512, 2), model / "qtip" / "quantlut.pt")
    config = {
        "quant_method": "qtip",
        "L": 16,
        "K": 2,
        "V": 2,
        "tlut_bits": 9,
        "decode_mode": "quantlut",
    }
    # vLLM refuses the .pt and names this command.
    cfg = qtip.QTIPConfig.from_config({**config, "quantlut_path": "qtip/quantlut.pt"})
    command = (
        "python scripts/convert_quantlut.py qtip/quantlut.pt qtip/quantlut.safetensors"
    )
    with pytest.raises(ValueError, match=re.escape(command)):
        cfg.maybe_update_config(str(model))
    argv = command.split()[2:]
    assert convert_quantlut.main([str(model / arg) for arg in argv]) == 0
    cfg = qtip.QTIPConfig.from_config(
        {**config, "quantlut_path": "qtip/quantlut.safetensors"}
    )
    cfg.maybe_update_config(str(model))
    assert cfg.quantlut_file == (model / "qtip" / "quantlut.safetensors").resolve()
