# SPDX-License-Identifier: Apache-2.0
"""scripts/profile_decode.py's per-step sums: the difference of a long and a
short window by kernel kind, from Chrome traces (the TP > 1 path, where vLLM's
profiler writes one trace per rank)."""

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))
import profile_decode  # noqa: E402

KERNELS = {
    "void vllm::qtip::kernels::qtip_mma_kernel<2, 6, 32, void, false>": 10.0,
    "void vllm::qtip::kernels::qtip_prefill_kernel<2, 64>": 7.0,
    "void vllm::qtip::kernels::qtip_hk64_in_kernel<__half>": 3.0,
    "void vllm::qtip::kernels::qtip_hk512_kernel<float, __half>": 2.5,
    "void vllm::cross_device_reduce_1stage<float, 2>": 4.0,
    "ncclDevKernel_AllGather_RING_LL": 6.0,
    "triton_poi_fused_mul_silu_slice_1": 1.0,
}


def write_trace(path: Path, launches: int) -> Path:
    events = [
        {"cat": "kernel", "name": name, "dur": dur}
        for name, dur in KERNELS.items()
        for _ in range(launches)
    ]
    # CPU-side events are not kernel time.
    events.append({"cat": "cpu_op", "name": "aten::add", "dur": 500.0})
    path.write_text(json.dumps({"traceEvents": events}))
    return path


def test_per_step_from_traces(tmp_path):
    long = profile_decode.trace_totals(write_trace(tmp_path / "long.json", 11))
    short = profile_decode.trace_totals(write_trace(tmp_path / "short.json", 3))
    result = profile_decode.per_step(long, short, steps=4)
    rows = {r["kind"]: (r["us"], r["launches"]) for r in result["rows"]}
    # 8 more launches of each kernel over 4 steps: 2 per step.
    assert rows["qtip_mma"] == (20.0, 2.0)
    assert rows["qtip_prefill"] == (14.0, 2.0)
    assert rows["qtip_hadamard"] == (11.0, 4.0)
    assert rows["collective"] == (20.0, 4.0)
    assert rows["other"] == (2.0, 2.0)
    assert rows["attention"] == (0.0, 0.0)
    assert result["kernel_ms"] == 0.067
    assert result["top_kernels"][0]["name"].endswith(
        "qtip_mma_kernel<2, 6, 32, void, false>"
    )
    assert result["top_kernels"][0]["us_per_step"] == 20.0


def test_linear_layers_by_difference():
    # Overlapping kernels (8 ms in kernels, a 7 ms step): the layers' share is
    # the step minus attention, collectives and the rest, not their own sum.
    result = {
        "step_ms": 7.0,
        "rows": [
            {"kind": "qtip_prefill", "us": 4000.0, "launches": 128.0},
            {"kind": "qtip_hadamard", "us": 1500.0, "launches": 256.0},
            {"kind": "attention", "us": 2200.0, "launches": 97.0},
            {"kind": "gemm", "us": 70.0, "launches": 1.0},
            {"kind": "other", "us": 300.0, "launches": 150.0},
        ],
    }
    assert profile_decode.linear_layers_us(result) == 4500.0
