# SPDX-License-Identifier: Apache-2.0
"""Layer times of the prefill-GEMM experiments with parts of the kernel left out.

The experiment patches `prefill-mc.patch` and `prefill-w256.patch` read
QTIP_PF_MODE on every call (bit 0: no decode, the A operand is the raw trellis
words; bit 1: no wgmma). Mode 3 is then the bare pipeline: x~ stages, barriers
and trellis loads. Times are whole `qtip_matmul` calls (both transforms
included), CUDA events over 10 calls, median of 5. Run on the GPU host after
the patch is built, with PYTHONPATH as in scripts/gpu_kernel_run.sh:

    python3 benchmarks/experiments/prefill_modes.py --modes 0 1 2 3
"""

import argparse
import os
import sys
from pathlib import Path

import torch

from vllm import _qtip_ops as ops

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
from bench_kernels import factor, random_trellises  # noqa: E402

SHAPES = [
    (4096, 4096, 2048),
    (14336, 4096, 2048),
    (4096, 14336, 2048),
    (4096, 4096, 512),
]


def layer_us(args: tuple, calls: int = 10, repeats: int = 5) -> float:
    for _ in range(3):
        ops.qtip_matmul(*args)
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            ops.qtip_matmul(*args)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1000 / calls)
    return sorted(times)[repeats // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--modes", type=int, nargs="+", default=[0, 3])
    parser.add_argument("--K", type=int, default=2)
    args = parser.parse_args()
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    for m, n, rows in SHAPES:
        trellis = random_trellises(m, n, args.K)[0].view(m // 32, n // 32, 64 * args.K)
        tlut = torch.randn(512, 2, device=dev, generator=gen).half()
        su = torch.randn(n, device=dev, generator=gen)
        sv = torch.randn(m, device=dev, generator=gen)
        x = torch.randn(rows, n, device=dev, generator=gen).half()
        call = (x, trellis, tlut, su, sv, factor(n), factor(m), args.K)
        for mode in args.modes:
            os.environ["QTIP_PF_MODE"] = str(mode)
            print(
                f"{m}x{n} rows {rows} mode {mode}: layer {layer_us(call):.1f} us",
                flush=True,
            )


if __name__ == "__main__":
    main()
