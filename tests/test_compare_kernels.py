# SPDX-License-Identifier: Apache-2.0
"""scripts/compare_kernels.py: a variant's change per layer, raw and against
the fp16 GEMM timed next to it (the GPU drifts within one device call)."""

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))
import compare_kernels  # noqa: E402


def layer(m: int, batch: int, qtip_us: float, fp16_us: float) -> dict:
    return dict(m=m, n=4096, K=2, tp_split=1, batch=batch, qtip_us=qtip_us,
                fp16_us=fp16_us)  # fmt: skip


def fused(batch: int, us: float) -> dict:
    return dict(model="Llama-2-7B", layer="qkv_proj", K=2, batch=batch, one_call_us=us)


def test_normalised_by_fp16_and_median_drift():
    base = {
        "rows": [layer(4096, 1, 10.0, 14.0), layer(1024, 1, 8.0, 8.0),
                 layer(4096, 16, 13.0, 14.5)],
        "fused_layers": [fused(1, 20.0)],
    }  # fmt: skip
    variant = {
        # fp16 drifts by 1.0, 1.1 and 1.2: median 1.1.
        "rows": [layer(4096, 1, 8.0, 14.0), layer(1024, 1, 8.8, 8.8),
                 layer(4096, 16, 15.6, 17.4), layer(14336, 1, 5.0, 5.0)],
        "fused_layers": [fused(1, 22.0), fused(2, 1.0)],
    }  # fmt: skip
    drift, rows = compare_kernels.compare(base, variant)
    assert drift == pytest.approx(1.1)
    got = {(r["layer"], r["batch"]): (r["raw"], r["normalised"]) for r in rows}
    # Layers only in one file are left out.
    assert set(got) == {
        ("4096x4096", 1), ("1024x4096", 1), ("4096x4096", 16),
        ("Llama-2-7B qkv_proj", 1),
    }  # fmt: skip
    assert got[("4096x4096", 1)] == pytest.approx((-0.2, -0.2))
    # 10% slower, all of it the GPU's drift.
    assert got[("1024x4096", 1)] == pytest.approx((0.1, 0.0))
    assert got[("4096x4096", 16)] == pytest.approx((0.2, 0.0))
    assert got[("Llama-2-7B qkv_proj", 1)] == pytest.approx((0.1, 0.0))
