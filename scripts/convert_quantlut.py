# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""Convert a QTIP lookup table saved with torch.save to safetensors.

vLLM never unpickles a ``quantlut_path`` file (unpickling can run arbitrary
code), so a table saved as ``.pt``/``.pth`` is converted once, from a file
you trust, and the config points at the result:

    python scripts/convert_quantlut.py quantlut.pt quantlut.safetensors

The input is read with ``torch.load(weights_only=True)``, which refuses
anything but tensors and plain containers. It holds either one tensor, the
table of every projection (written as ``tlut``), or a dict of tensors named
``<projection>.tlut`` (e.g. ``model.layers.0.self_attn.q_proj.tlut``), one
table per projection, written under the same names. A table is
(2**tlut_bits, V) floats; vLLM checks the shape against the config.
"""

import argparse
import pickle
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

SHARED_TABLE = "tlut"


def tables_from(obj: object, source: Path) -> dict[str, torch.Tensor]:
    """The tables of a torch.load result, by their safetensors names."""
    if isinstance(obj, torch.Tensor):
        tables = {SHARED_TABLE: obj}
    elif isinstance(obj, dict) and obj:
        tables = {}
        for name, value in obj.items():
            if not isinstance(name, str) or not isinstance(value, torch.Tensor):
                raise ValueError(
                    f"{source}: entry {name!r} is a {type(value).__name__}, "
                    "expected tensors keyed by name"
                )
            if name != SHARED_TABLE and not name.endswith(f".{SHARED_TABLE}"):
                raise ValueError(
                    f"{source}: tensor {name!r} is not named {SHARED_TABLE!r} "
                    f"or '<projection>.{SHARED_TABLE}'"
                )
            tables[name] = value
        if SHARED_TABLE in tables and len(tables) > 1:
            raise ValueError(
                f"{source}: holds both a shared {SHARED_TABLE!r} table and "
                "per-projection tables"
            )
    else:
        raise ValueError(
            f"{source}: holds a {type(obj).__name__}, expected a tensor or a "
            "dict of tensors"
        )
    for name, table in tables.items():
        if table.dim() != 2 or not table.is_floating_point():
            raise ValueError(
                f"{source}: tensor {name!r} is {table.dtype} of shape "
                f"{tuple(table.shape)}, expected a 2-D float table "
                "(2**tlut_bits, V)"
            )
    return tables


def convert(source: Path, target: Path) -> dict[str, torch.Tensor]:
    """Write the tables of ``source`` to ``target``; returns them."""
    if target.suffix != ".safetensors":
        raise ValueError(f"{target}: the output must be a .safetensors file")
    if target.exists():
        raise ValueError(f"{target} exists; remove it or choose another name")
    obj = torch.load(source, map_location="cpu", weights_only=True)
    tables = tables_from(obj, source)
    save_file(
        {name: t.detach().contiguous() for name, t in tables.items()},
        str(target),
        {"format": "pt"},
    )
    return tables


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=Path, help="trusted .pt/.pth table file")
    parser.add_argument("target", type=Path, help="the .safetensors file to write")
    args = parser.parse_args(argv)
    try:
        tables = convert(args.source, args.target)
    except (ValueError, OSError, pickle.UnpicklingError) as e:
        # UnpicklingError: content that weights_only refuses to load.
        print(f"error: {e}", file=sys.stderr)
        return 1
    for name, table in tables.items():
        print(f"{name}: {table.dtype} {tuple(table.shape)}")
    print(f"wrote {args.target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
