# SPDX-License-Identifier: Apache-2.0
"""scripts/ab_kernels.py's summary of interleaved rounds: medians of each
build and the median and range of the per-round ratios."""

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))
import ab_kernels  # noqa: E402


def test_change_is_the_median_per_round_ratio():
    # The clock drifts over the rounds (base 10 -> 12 us); the variant is 5%
    # faster in every round, which the medians of each build alone blur.
    base = [10.0, 11.0, 12.0, 10.5, 11.5]
    variant = [b * 0.95 for b in base]
    s = ab_kernels.summarize(base, variant)
    assert s["base_us"] == 11.0 and s["variant_us"] == pytest.approx(10.45)
    assert s["change"] == pytest.approx(-0.05)
    assert s["change_lo"] == pytest.approx(-0.05)
    assert s["change_hi"] == pytest.approx(-0.05)


def test_range_over_rounds():
    s = ab_kernels.summarize([10.0, 10.0, 10.0], [9.0, 10.5, 10.0])
    assert (s["change"], s["change_lo"], s["change_hi"]) == pytest.approx(
        (0.0, -0.1, 0.05)
    )
    with pytest.raises(ValueError):  # rounds must pair up
        ab_kernels.summarize([1.0, 2.0], [1.0])


def test_layers_cover_the_benchmark_shapes_and_fused_layers():
    names = {name: (rows, n) for name, rows, n in ab_kernels.layers()}
    assert names["4096x11008"] == ([4096], 11008)
    assert names["14336x4096"] == ([14336], 4096)
    assert names["Llama-3.1-8B qkv_proj"] == ([4096, 1024, 1024], 4096)
    assert len(names) == len(ab_kernels.layers())  # no shape twice
    table = ab_kernels.markdown(
        [dict(layer="4096x4096", K=2, batch=1, base_us=9.0, variant_us=8.5,
              change=-0.0556, change_lo=-0.07, change_hi=-0.04, max_rel_diff=0.0)]
    )  # fmt: skip
    assert "| 4096x4096 | 2 | 1 | 9.0 | 8.5 | -5.6% | -7.0% .. -4.0% | 0 |" in table
    # Outputs further apart than a change of summation order are marked.
    off = ab_kernels.markdown(
        [dict(layer="4096x4096", K=2, batch=1, base_us=9.0, variant_us=8.5,
              change=-0.0556, change_lo=-0.07, change_hi=-0.04, max_rel_diff=0.05)]
    )  # fmt: skip
    assert off.endswith("| 0.05 **differs** |")
